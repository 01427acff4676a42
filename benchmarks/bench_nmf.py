"""One-sided NMF of many neurons' weights: ``circuits.nmf.nmf`` batched vs loops of peers.

Problem: 512 neurons of random conv weights ``[512, 512, 5, 5]``; per neuron
``X = posneg(W_o).reshape(1024, 25).T`` ``[25, 1024]``, ``k = 3``, the same iteration
budget for everyone (``max_iter=200``, ``tol=1e-4``, ``init="nndsvda"``), float32 on the CPU.

- circuits: all 512 matrices in one batched HALS problem (``nmf(X, 3)``), with the default
  backend (on the CPU: the fused numba kernel) and, for the record, ``backend="torch"`` (the
  batched torch ops that also run on a GPU).
- peer 1: ``sklearn.decomposition.NMF`` (solver ``cd``, the same algorithm) looped per neuron.
- peer 2: Lucent's ``ChannelReducer(3, "NMF")`` looped per neuron (sklearn underneath, plus
  its reshaping), on channels-last ``[5, 5, 1024]``.

Run: ``python -m benchmarks nmf`` (or ``python -m benchmarks.bench_nmf --neurons 128``).

``--trained`` instead reports on the bundled trained FashionInception: per layer, the
per-neuron error ratio ours ÷ sklearn (same budget) and the weight-banding score of the
3 NMF spatial maps, beside the same layer at random init.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch

from circuits.nmf import nmf, posneg

from .common import report, timeit


def _neuron_matrices(w: torch.Tensor) -> torch.Tensor:
    """Conv weights ``[out, in, kh, kw]`` → per neuron ``posneg(W_o)`` as ``[out, kh*kw, 2*in]``."""
    out_c, in_c, kh, kw = w.shape
    return posneg(w, 1).reshape(out_c, 2 * in_c, kh * kw).mT.contiguous()


def _sklearn_loop(X: np.ndarray, k: int, max_iter: int, tol: float) -> np.ndarray:
    from sklearn.decomposition import NMF

    errs = np.empty(len(X))
    for i, x in enumerate(X):
        est = NMF(k, init="nndsvda", max_iter=max_iter, tol=tol, random_state=0)
        est.fit(x)
        errs[i] = est.reconstruction_err_
    return errs


def _lucent_loop(X: np.ndarray, k: int, max_iter: int, tol: float, kh: int, kw: int) -> np.ndarray:
    from lucent.misc.channel_reducer import ChannelReducer

    errs = np.empty(len(X))
    for i, x in enumerate(X):
        red = ChannelReducer(k, "NMF", init="nndsvda", max_iter=max_iter, tol=tol, random_state=0)
        red.fit_transform(x.reshape(kh, kw, -1))  # channels last, as Lucid/Lucent use it
        errs[i] = red._reducer.reconstruction_err_
    return errs


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--neurons", type=int, default=512)
    p.add_argument("--in-channels", type=int, default=512)
    p.add_argument("--kernel", type=int, default=5)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--max-iter", type=int, default=200)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                   help="torch thread counts to time ours with; the ratio uses the fastest (default: 1 and 2, "
                        "this machine's cores; the peers' loops use one core)")
    p.add_argument("--no-lucent", action="store_true")
    p.add_argument("--device", default="cpu", help="where ours runs (e.g. cuda); the peers always run on the CPU")
    p.add_argument("--trained", action="store_true", help="parity and banding per layer of the bundled trained model")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")  # sklearn ConvergenceWarning at the budget; lucent FutureWarning
    if args.trained:
        return trained_layers(args.k, args.max_iter, args.tol)

    g = torch.Generator().manual_seed(0)
    kh = kw = args.kernel
    w = torch.randn(args.neurons, args.in_channels, kh, kw, generator=g)
    X = _neuron_matrices(w)  # [N, 25, 1024]
    Xn = X.numpy()
    Xd = X.to(args.device)
    print(f"NMF of {args.neurons} neurons: X [{args.neurons}, {kh * kw}, {2 * args.in_channels}] float32, k={args.k}, "
          f"max_iter={args.max_iter}, tol={args.tol}", flush=True)

    default_threads = torch.get_num_threads()
    threads = args.threads
    t0 = time.perf_counter()
    nmf(Xd[:2], args.k, max_iter=2)  # loads the CPU kernel from numba's disk cache, or compiles it
    print(f"first call (kernel load or compile): {time.perf_counter() - t0:.2f} s", flush=True)
    ours: dict[tuple[str, int], tuple[float, object]] = {}
    for backend in ("auto", "torch"):
        for nt in threads:
            torch.set_num_threads(nt)
            res = {}

            def run() -> None:
                res["r"] = nmf(Xd, args.k, max_iter=args.max_iter, tol=args.tol, backend=backend)

            ours[backend, nt] = (timeit(run, repeat=3, warmup=1), res["r"])
            print(f"circuits batched on {args.device}, backend={backend}, {nt} thread(s): "
                  f"{ours[backend, nt][0]:.3f} s", flush=True)
    torch.set_num_threads(default_threads)
    best = {b: min((key for key in ours if key[0] == b), key=lambda key: ours[key][0]) for b in ("auto", "torch")}
    best_nt = best["auto"][1]
    ours_s, r = ours[best["auto"]]
    torch_s = ours[best["torch"]][0]
    our_err = r.reconstruction_err.cpu().numpy()

    _sklearn_loop(Xn[:1], args.k, 2, args.tol)  # warm-up: imports and first-call costs stay out of the timing
    t0 = time.perf_counter()
    sk_err = _sklearn_loop(Xn, args.k, args.max_iter, args.tol)
    sk_s = time.perf_counter() - t0
    ratio = our_err / sk_err
    out = report(
        f"NMF {args.neurons} neurons k={args.k}", "sklearn NMF loop", sk_s, ours_s,
        extra=f"mean err sklearn {sk_err.mean():.4f} vs ours {our_err.mean():.4f}; "
        f"per-neuron ours/sklearn max {ratio.max():.4f} mean {ratio.mean():.4f}; best of threads {threads}: {best_nt}",
    )
    print(f"  (backend=torch, best of threads: {torch_s:.3f} s, x{sk_s / torch_s:.2f} vs the sklearn loop; "
          f"the default backend is x{torch_s / ours_s:.2f} faster than it)")
    out.update(sklearn_err=float(sk_err.mean()), ours_err=float(our_err.mean()), ratio_max=float(ratio.max()),
               ours_by_threads={f"{b}/{t}": v[0] for (b, t), v in ours.items()}, torch_backend_s=torch_s,
               n_iter_mean=float(r.n_iter.float().mean()))
    if not args.no_lucent:
        _lucent_loop(Xn[:1], args.k, 2, args.tol, kh, kw)  # warm-up
        t0 = time.perf_counter()
        lu_err = _lucent_loop(Xn, args.k, args.max_iter, args.tol, kh, kw)
        lu_s = time.perf_counter() - t0
        lr = our_err / lu_err
        lu = report(
            f"NMF {args.neurons} neurons k={args.k}", "lucent ChannelReducer loop", lu_s, ours_s,
            extra=f"mean err lucent {lu_err.mean():.4f} vs ours {our_err.mean():.4f}; per-neuron ours/lucent max {lr.max():.4f}",
        )
        out.update(lucent_s=lu_s, lucent_speedup=lu["speedup"], lucent_err=float(lu_err.mean()))
    return out


TRAINED_LAYERS = ["conv2d2", "mixed3a_3x3", "mixed3b_3x3", "mixed3b_5x5", "mixed4a_3x3", "mixed4a_5x5"]


def trained_layers(k: int, max_iter: int, tol: float) -> dict:
    """Per layer of the trained FashionInception: NMF parity with sklearn and weight banding."""
    from circuits.layers import get_layer
    from circuits.models import FashionInception, load_model
    from circuits.nmf import neuron_factors, banding_score

    trained = load_model()
    torch.manual_seed(0)
    random_init = FashionInception().eval()
    print("| layer | weights | ours ÷ sklearn error (max, mean) | explained (mean) | banding mean | share > 0.5 "
          "| random init: banding mean, share > 0.5 |")
    print("|---|---|---|---|---|---|---|")
    rows = {}
    for name in TRAINED_LAYERS:
        w = get_layer(trained, f"{name}_pre_relu_conv").weight.detach()
        # one factorisation serves both: neuron_factors solves nmf(_neuron_matrices(w)) and
        # reports its error relative to ||W_o|| (= ||X_o||)
        f = neuron_factors(w, k, max_iter=max_iter, tol=tol)
        ours = (f.rel_error * w.flatten(1).norm(dim=1)).numpy()
        ratio = ours / _sklearn_loop(_neuron_matrices(w).numpy(), k, max_iter, tol)
        band = banding_score(f)
        band_random = banding_score(neuron_factors(get_layer(random_init, f"{name}_pre_relu_conv").weight.detach(), k,
                                                    max_iter=max_iter, tol=tol))
        rows[name] = dict(ratio_max=float(ratio.max()), ratio_mean=float(ratio.mean()), explained=float(f.explained.mean()),
                          banding=float(band.mean()), banded=float((band > 0.5).float().mean()),
                          banding_random=float(band_random.mean()), banded_random=float((band_random > 0.5).float().mean()))
        r = rows[name]
        print(f"| {name} | {list(w.shape)} | {r['ratio_max']:.4f}, {r['ratio_mean']:.4f} | {r['explained']:.3f} | "
              f"{r['banding']:+.3f} | {r['banded']:.2f} | {r['banding_random']:+.3f}, {r['banded_random']:.2f} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
