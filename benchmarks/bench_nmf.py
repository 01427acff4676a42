"""One-sided NMF of many neurons' weights: ``circuits.nmf.nmf`` batched vs a loop of scikit-learn.

**Sweep** (default, ``python -m benchmarks nmf``): for each shape of a preset (neurons,
positions ``kh*kw``, features ``2*in``, ``k``), per neuron ``X = posneg(W_o)`` ``[positions,
features]`` from random conv weights, float32, the same budget and stopping rule for everyone
(``init="nndsvda"``, ``max_iter=200``, ``tol=1e-4``). The peer is
``sklearn.decomposition.NMF(solver="cd")`` (the same algorithm) looped over the neurons, timed
at each thread count (BLAS threads limited with threadpoolctl) and its best time is used;
ours is :func:`circuits.nmf.nmf` on all neurons at once with both backends (``auto``: the
fused numba kernel on the CPU; ``torch``: batched torch ops, what runs on a GPU or without
numba) at each thread count. Printed per shape: the ratio peer ÷ ours per backend and thread
count, and the worst per-neuron error ratio ours ÷ sklearn (errors below 1e-5 of ``||X||``,
exact fits at float32 rounding, count as equal).

Presets: ``cpu`` (neurons 16-1024, positions 1-49, features 18-2048, k 1-8; a few minutes on
2 cores), ``tiny`` (seconds; what the tests run), ``gpu`` (larger batches, for a GPU suite).
Another script calls :func:`run` (e.g. ``run(device="cuda", preset="gpu")``) and gets the
measured ratios back.

**One shape** (``--neurons 512 --in-channels 512 --kernel 5``): the first round's problem,
also against Lucent's ``ChannelReducer(3, "NMF")`` loop (sklearn underneath, channels-last).

``--trained`` instead reports on the bundled trained FashionInception: per layer, the
per-neuron error ratio ours ÷ sklearn (same budget) and the weight-banding score of the
3 NMF spatial maps, beside the same layer at random init.
"""

from __future__ import annotations

import argparse
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from circuits.nmf import nmf, posneg

from .common import report, timeit


@dataclass(frozen=True)
class Shape:
    """One sweep point: ``neurons`` matrices ``[positions, features]``, ``k`` components."""

    neurons: int
    positions: int
    features: int
    k: int

    def __str__(self) -> str:
        return f"{self.neurons} x [{self.positions}, {self.features}] k={self.k}"


PRESETS: dict[str, tuple[Shape, ...]] = {
    # neurons 16-1024, positions 1 (1x1), 9 (3x3), 16, 25 (5x5), 49 (7x7), features 18-2048, k 1-8
    "cpu": (
        Shape(16, 9, 18, 3),
        Shape(16, 49, 2048, 8),
        Shape(64, 1, 64, 1),
        Shape(64, 25, 192, 3),
        Shape(64, 49, 512, 5),
        Shape(256, 9, 96, 6),
        Shape(256, 25, 1024, 3),
        Shape(1024, 9, 64, 3),
        Shape(1024, 16, 256, 4),
    ),
    "tiny": (Shape(8, 9, 18, 2), Shape(16, 25, 64, 3)),
    # a GPU pays off on large batches; the peer loop stays on the CPU, so keep it to minutes
    "gpu": (
        Shape(64, 25, 192, 3),
        Shape(512, 25, 1024, 3),
        Shape(1024, 9, 256, 4),
        Shape(2048, 25, 512, 3),
        Shape(4096, 9, 64, 3),
    ),
}


def random_matrices(shape: Shape, seed: int = 0) -> torch.Tensor:
    """``posneg`` of random conv weights, per neuron ``[positions, features]`` (features even)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape.neurons, max(1, shape.features // 2), shape.positions, generator=g)
    return posneg(w, 1).mT.contiguous()


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


def _clock(fn: Callable[[], object], sync: bool) -> tuple[float, float]:
    """Wall and process CPU seconds of one ``fn()`` call (CPU time: every thread's, so a
    machine shared with other jobs slows it much less than the wall clock)."""
    if sync:
        torch.cuda.synchronize()
    c0, w0 = time.process_time(), time.perf_counter()
    fn()
    if sync:
        torch.cuda.synchronize()
    return time.perf_counter() - w0, time.process_time() - c0


def _fastest(fn: Callable[[], object], repeat: int, sync: bool = False) -> tuple[float, float]:
    """``(wall, cpu)`` of the fastest of ``repeat`` calls after one warm-up call: on a shared
    machine the least disturbed run is the best estimate of the cost."""
    fn()
    return min((_clock(fn, sync) for _ in range(repeat)), key=lambda wc: wc[0])


def _sklearn_time(Xn: np.ndarray, k: int, max_iter: int, tol: float, threads: int) -> tuple[float, float, np.ndarray]:
    """``(wall, cpu, errors)`` of the scikit-learn loop with BLAS limited to ``threads``."""
    from threadpoolctl import threadpool_limits

    out: dict = {}
    with threadpool_limits(limits=threads):
        _sklearn_loop(Xn[:1], k, 2, tol)  # warm-up: imports and first-call costs stay out of the timing
        wall, cpu = _clock(lambda: out.setdefault("errs", _sklearn_loop(Xn, k, max_iter, tol)), sync=False)
    return wall, cpu, out["errs"]


def _error_ratio(ours: np.ndarray, theirs: np.ndarray, X: np.ndarray) -> np.ndarray:
    """Per matrix ``ours / theirs``, with errors below 1e-5 of ``||X||`` (float32 rounding, an
    exact fit) counted as that floor: two exact fits are equal, whatever their noise."""
    floor = 1e-5 * np.linalg.norm(X.reshape(len(X), -1).astype(np.float64), axis=1)
    floor = np.maximum(floor, np.finfo(np.float64).tiny)
    return np.maximum(ours, floor) / np.maximum(theirs, floor)


def run(
    device: Union[str, torch.device] = "cpu",
    preset: str = "cpu",
    *,
    shapes: Optional[Sequence[Shape]] = None,
    threads: Sequence[int] = (2, 1),
    backends: Optional[Sequence[str]] = None,
    peer_threads: Optional[Sequence[int]] = None,
    max_iter: int = 200,
    tol: float = 1e-4,
    repeat: int = 3,
    peer_neurons: Optional[int] = None,
    verbose: bool = True,
) -> dict:
    """Time ours against the scikit-learn loop on every shape of ``preset`` (or ``shapes``).

    Ours runs on ``device`` with each backend (default: ``auto`` and ``torch`` on the CPU,
    ``torch`` elsewhere) at each torch thread count in ``threads`` (on a GPU the thread count
    only affects the host side), timed as the fastest of ``repeat`` calls; the peer always
    runs on the CPU, once per BLAS thread count in ``peer_threads`` (default ``threads``), and
    its fastest time is the reference. With ``peer_neurons``, the peer loop runs on the first
    ``peer_neurons`` matrices of a shape only and its times are scaled linearly to all of them
    (each neuron is an independent fit; this keeps the GPU suite's large batches to minutes),
    and the error ratio is taken over those matrices. Both wall-clock and process CPU time are measured: on a machine shared with
    other jobs the CPU-time ratio is the steadier measure of the work each side does. Returns
    ``{"device", "preset", "rows": [...], "min_speedup" / "min_cpu_speedup":
    {"<backend>/<threads>": worst wall / CPU ratio over shapes with >= 64 neurons},
    "worst_err_ratio"}``; each row holds the shape, ``sklearn_s``, ``sklearn_cpu_s``, and per
    ``"<backend>/<threads>"`` ``ours_s``, ``ours_cpu_s``, ``speedup`` and ``cpu_speedup``, and
    ``err_ratio_max`` (ours with the first backend ÷ sklearn, worst neuron).

    Example (what a GPU suite calls; on the CPU use ``preset="tiny"``)::

        >>> out = run(device="cuda", preset="gpu")            # doctest: +SKIP
        >>> out["min_speedup"]["auto/2"], out["worst_err_ratio"]  # doctest: +SKIP
    """
    warnings.filterwarnings("ignore")  # sklearn's ConvergenceWarning at the budget
    if shapes is None:
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}; got {preset!r}")
        shapes = PRESETS[preset]
    dev = torch.device(device)
    if backends is None:
        backends = ("auto", "torch") if dev.type == "cpu" else ("torch",)
    peer_threads = tuple(peer_threads or threads)
    before = torch.get_num_threads()
    t0 = time.perf_counter()
    nmf(random_matrices(Shape(2, 9, 18, 2)).to(dev), 2, max_iter=2)  # loads (or compiles) the CPU kernel
    if verbose:
        print(f"NMF sweep on {dev}, preset {preset!r}: float32, init nndsvda, max_iter={max_iter}, tol={tol}; "
              f"first call (kernel load or compile) {time.perf_counter() - t0:.2f} s", flush=True)
    keys = [f"{b}/{t}" for b in backends for t in threads]
    sync = dev.type == "cuda"
    rows = []
    try:
        for shape in shapes:
            X = random_matrices(shape)
            Xn = X.numpy()
            Xd = X.to(dev)
            ours: dict[str, tuple[float, float]] = {}
            errs: Optional[np.ndarray] = None
            for backend in backends:
                for nt in threads:
                    torch.set_num_threads(nt)
                    res: dict = {}

                    def call() -> None:
                        res["r"] = nmf(Xd, shape.k, max_iter=max_iter, tol=tol, backend=backend)

                    ours[f"{backend}/{nt}"] = _fastest(call, repeat, sync)
                    if errs is None:
                        errs = res["r"].reconstruction_err.double().cpu().numpy()
            torch.set_num_threads(before)
            m = shape.neurons if peer_neurons is None else max(1, min(peer_neurons, shape.neurons))
            scale = shape.neurons / m
            peer = {nt: _sklearn_time(Xn[:m], shape.k, max_iter, tol, nt) for nt in peer_threads}
            sk_s = min(v[0] for v in peer.values()) * scale
            sk_cpu = min(v[1] for v in peer.values()) * scale
            assert errs is not None
            ratio = _error_ratio(errs[:m], next(iter(peer.values()))[2], Xn[:m])
            row = dict(asdict(shape), sklearn_s=sk_s, sklearn_cpu_s=sk_cpu, peer_neurons=m,
                       sklearn_s_by_threads={t: v[0] * scale for t, v in peer.items()},
                       ours_s={key: ours[key][0] for key in keys}, ours_cpu_s={key: ours[key][1] for key in keys},
                       speedup={key: sk_s / ours[key][0] for key in keys},
                       cpu_speedup={key: sk_cpu / max(ours[key][1], 1e-9) for key in keys},
                       err_ratio_max=float(ratio.max()))
            rows.append(row)
            if verbose:
                cells = "  ".join(f"{key} x{row['speedup'][key]:.1f} (cpu x{row['cpu_speedup'][key]:.1f})" for key in keys)
                scaled = f" (timed on {m}, scaled)" if m < shape.neurons else ""
                print(f"{str(shape):<28} sklearn {sk_s:7.3f} s{scaled} | {cells} | err ratio max {row['err_ratio_max']:.4f}",
                      flush=True)
    finally:
        torch.set_num_threads(before)
    big = [r for r in rows if r["neurons"] >= 64] or rows
    out = dict(device=str(dev), preset=preset, threads=list(threads), rows=rows,
               min_speedup={key: min(r["speedup"][key] for r in big) for key in keys},
               min_cpu_speedup={key: min(r["cpu_speedup"][key] for r in big) for key in keys},
               worst_err_ratio=max(r["err_ratio_max"] for r in rows))
    if verbose:
        print("worst ratio over shapes with >= 64 neurons, wall clock: "
              + ", ".join(f"{key} x{v:.2f}" for key, v in out["min_speedup"].items())
              + "; CPU time: " + ", ".join(f"{key} x{v:.2f}" for key, v in out["min_cpu_speedup"].items())
              + f"; worst per-neuron error ours/sklearn {out['worst_err_ratio']:.4f}")
    return out


def markdown_table(out: dict) -> str:
    """The sweep of :func:`run` as a markdown table (for benchmarks/RESULTS.md): per shape the
    wall-clock ratio sklearn ÷ ours per backend and thread count, with the CPU-time ratio in
    brackets."""
    keys = list(out["rows"][0]["speedup"])
    head = "| neurons | positions | features | k | sklearn loop (s) | " + " | ".join(f"{k}: s, x wall (x cpu)" for k in keys) \
        + " | worst err ratio |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in out["rows"]:
        cells = []
        for k in keys:
            x = f"x{r['speedup'][k]:.1f}"
            cells.append(f"{r['ours_s'][k]:.4f}, {'**' + x + '**' if k.startswith('auto') else x} (x{r['cpu_speedup'][k]:.1f})")
        lines.append(f"| {r['neurons']} | {r['positions']} | {r['features']} | {r['k']} | {r['sklearn_s']:.3f} | "
                     + " | ".join(cells) + f" | {r['err_ratio_max']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="sweep preset (default cpu)")
    p.add_argument("--device", default="cpu", help="where ours runs (e.g. cuda); the peers always run on the CPU")
    p.add_argument("--neurons", type=int, help="one shape instead of the sweep: this many neurons ...")
    p.add_argument("--in-channels", type=int, help="... of [in, kernel, kernel] weights (default 512)")
    p.add_argument("--kernel", type=int, help="(default 5)")
    p.add_argument("--k", type=int, default=3, help="components for the one-shape run (default 3)")
    p.add_argument("--max-iter", type=int, default=200)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="torch thread counts to time ours with (default: 2 1 for the sweep; 1 2 for one shape, "
                        "where the ratio uses the fastest)")
    p.add_argument("--no-lucent", action="store_true", help="one shape: skip the Lucent loop")
    p.add_argument("--markdown", action="store_true", help="sweep: also print the table for RESULTS.md")
    p.add_argument("--trained", action="store_true", help="parity and banding per layer of the bundled trained model")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")  # sklearn ConvergenceWarning at the budget; lucent FutureWarning
    if args.trained:
        return trained_layers(args.k, args.max_iter, args.tol)
    if args.neurons is None and args.in_channels is None and args.kernel is None:
        out = run(args.device, args.preset, threads=args.threads or (2, 1), max_iter=args.max_iter, tol=args.tol)
        if args.markdown:
            print(markdown_table(out))
        return out
    args.neurons = args.neurons or 512
    args.in_channels = args.in_channels or 512
    args.kernel = args.kernel or 5
    args.threads = args.threads or [1, 2]
    return one_shape(args)


def one_shape(args: argparse.Namespace) -> dict:
    """The first round's benchmark: one shape, both backends, sklearn and Lucent loops."""
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
