"""Inspection benchmarks, peer and us in the same run.

1. Per-layer weight statistics of a ResNet-50-sized state dict: ``circuits.inspect.weight_stats``
   (norms only, ``spectrum=False``) vs a plain per-tensor numpy/scipy loop computing the same
   statistics, and vs WeightWatcher's ``describe`` (layer metadata only).
2. Spectral diagnostics vs WeightWatcher ``analyze`` (ESD, power-law alpha with its KS distance
   and sigma, stable rank, randomised ESD), on the same layers: the bundled trained
   Fashion-MNIST model (every layer printed side by side) and ResNet-50 random init (summary).
   Ours with ``conv="slices"``, WeightWatcher's convention. Both figures printed, and the time ratio.
3. The t-SNE of a 6000 x 5000 layer's units: ours (a seeded sample of 1000 units, PCA to 50
   dimensions first) timed; with ``--tsne-full`` also the old way (t-SNE on all raw rows).

The numpy loop is what one writes by hand: ``scipy.stats.skew``/``kurtosis`` on the flattened
tensor, ``np.linalg.norm(W, 2)`` (an SVD) for the spectral norm, masks for NaN/Inf, near-zero
and dead rows. Ours: one torch pass per tensor (shifted power sums), exact spectral norm from
the smaller Gram matrix when its side is <= 256, else 30 power iterations.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import numpy as np
import torch

from circuits.inspect.stats import weight_stats

from .common import report, timeit


def numpy_stats(state: dict, zero_threshold: float = 1e-6, spectral: bool = True) -> list[dict]:
    """The same statistics as ``weight_stats``, one tensor at a time with numpy/scipy."""
    import scipy.stats

    rows = []
    for name, t in state.items():
        if not t.is_floating_point():
            continue
        x = t.detach().cpu().numpy()
        flat = x.reshape(-1)
        finite = np.isfinite(flat)
        n_nan = int(np.isnan(flat).sum())
        f = flat[finite]
        rec = {"name": name, "mean": float(f.mean()), "std": float(f.std()), "min": float(f.min()),
               "max": float(f.max()), "skew": float(scipy.stats.skew(f)), "kurtosis": float(scipy.stats.kurtosis(f)),
               "fro_norm": float(np.linalg.norm(f)),  # scipy/numpy in float32, as given "near_zero": float((np.abs(f) <= zero_threshold).mean()),
               "n_nan": n_nan, "n_inf": int((~finite).sum()) - n_nan, "spectral_norm": math.nan, "dead_units": []}
        if x.ndim >= 2:
            mat = x.reshape(x.shape[0], -1)
            rec["dead_units"] = np.nonzero(np.all(np.abs(mat) <= zero_threshold, axis=1))[0].tolist()
            if spectral:
                rec["spectral_norm"] = float(np.linalg.norm(mat, 2))
        rows.append(rec)
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--no-weightwatcher", action="store_true")
    p.add_argument("--threads", type=int, default=1,
                   help="torch and BLAS threads for every contender (1: the 2-core test machine is shared)")
    p.add_argument("--only", default="stats,spectral,tsne", help="comma-separated parts: stats, spectral, tsne")
    p.add_argument("--tsne-full", action="store_true", help="also time t-SNE on all 6000 raw rows (minutes)")
    args = p.parse_args(argv)
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    with threadpool_limits(limits=args.threads):
        return _run(args)


def _run(args: argparse.Namespace) -> dict:
    parts = set(args.only.split(","))
    results: dict = {}
    if "stats" in parts:
        results.update(_stats(args))
    if "spectral" in parts:
        results.update(_spectral(args))
    if "tsne" in parts:
        results.update(_tsne(args))
    return results


def _weightwatcher():
    import contextlib
    import io
    import logging

    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            logging.getLogger("weightwatcher").setLevel(logging.ERROR)
            import weightwatcher as ww
    except Exception as exc:  # noqa: BLE001 - any import failure is recorded, not fatal
        print(f"weightwatcher unavailable ({type(exc).__name__}: {exc}); pip install circuits[bench]")
        return None
    return ww


def _stats(args: argparse.Namespace) -> dict:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    state = model.state_dict()
    n_values = sum(t.numel() for t in state.values() if t.is_floating_point())
    print(f"resnet50 random init: {len(state)} tensors, {n_values / 1e6:.1f}M values", flush=True)

    # agreement first (norms only: the numpy loop computes no spectrum diagnostics)
    ours = weight_stats(state, spectrum=False)
    ref = {r["name"]: r for r in numpy_stats(state)}
    worst = {k: 0.0 for k in ("mean", "std", "skew", "kurtosis", "fro_norm", "spectral_norm")}
    power_gap = 0.0
    for r in ours:
        q = ref[r.name]
        for k in worst:
            a, b = getattr(r, k), q[k]
            if math.isnan(b) or math.isnan(a):
                continue
            # skew/kurtosis/mean are ~0 for random init: compare absolutely; others relatively
            err = abs(a - b) / (1.0 if k in ("mean", "skew", "kurtosis") else max(abs(b), 1e-12))
            if k == "spectral_norm" and r.spectral_method == "power":
                power_gap = max(power_gap, (b - a) / b)
                continue
            worst[k] = max(worst[k], err)
        assert r.dead_units == q["dead_units"] and r.n_nan == q["n_nan"]
    print("max difference vs numpy/scipy (absolute for mean/skew/kurtosis, else relative): " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items())
          + f"; power-iteration spectral norms at most {100 * power_gap:.2f}% below the SVD", flush=True)

    results = {}
    t_ours = timeit(lambda: weight_stats(state, spectrum=False), repeat=args.repeat)
    t_np = timeit(lambda: numpy_stats(state), repeat=1, warmup=0)
    results["numpy"] = report("resnet50 weight stats (all, incl. spectral)", "numpy/scipy loop (SVD)", t_np, t_ours)
    t_ours_ns = timeit(lambda: weight_stats(state, spectral="none"), repeat=args.repeat)
    t_np_ns = timeit(lambda: numpy_stats(state, spectral=False), repeat=args.repeat, warmup=0)
    results["numpy_nospectral"] = report("resnet50 weight stats (no spectral norm)", "numpy/scipy loop", t_np_ns, t_ours_ns)

    ww = None if args.no_weightwatcher else _weightwatcher()
    if ww is not None:
        watcher = ww.WeightWatcher(model=model)
        t0 = time.perf_counter()
        desc = watcher.describe()
        t_desc = time.perf_counter() - t0
        results["ww_describe"] = report("resnet50 layer table", "weightwatcher describe (shapes only)", t_desc, t_ours,
                                        extra=f"ww {len(desc)} layers, ours {len(ours)} tensors with full statistics")
    return results


def _analyze(ww, model) -> tuple[object, float]:
    import contextlib
    import io

    t0 = time.perf_counter()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        details = ww.WeightWatcher(model=model).analyze(plot=False, randomize=True)
    return details, time.perf_counter() - t0


def _compare(name: str, model, details, show: bool) -> tuple[float, dict]:
    """Our spectral_stats on WeightWatcher's layers; print both; return (our seconds, summary)."""
    from circuits.inspect import spectral_stats

    modules = dict(model.named_modules())
    worst_sigma, worst_rel, n_fit, n_both, t_ours = 0.0, 0.0, 0, 0, 0.0
    lam_rel = sr_rel = 0.0
    if show:
        print(f"{'layer':40s} {'WW alpha +- sigma':>18s} {'ours alpha':>10s} {'WW D':>6s} {'ours D':>6s} "
              f"{'WW sr':>7s} {'ours sr':>7s}  fit")
    for _, row in details.iterrows():
        w = modules[row["longname"]].weight.detach()
        t0 = time.perf_counter()
        s = spectral_stats(w, conv="slices", randomize=True)
        t_ours += time.perf_counter() - t0
        scale = 0.5 if w.dim() == 4 else 1.0  # WeightWatcher's conv2d_norm scales slices by 1/sqrt(2)
        lam_rel = max(lam_rel, abs(s.lambda_max * scale - row["lambda_max"]) / row["lambda_max"])
        sr_rel = max(sr_rel, abs(s.stable_rank - row["stable_rank"]) / row["stable_rank"])
        if show:
            print(f"{row['longname'][:40]:40s} {row['alpha']:9.3f} +- {row['sigma']:5.3f} {s.alpha:10.3f} "
                  f"{row['D']:6.3f} {s.fit.ks:6.3f} {row['stable_rank']:7.2f} {s.stable_rank:7.2f}  {s.fit.quality}")
        n_both += 1
        if s.alpha == s.alpha:
            n_fit += 1
            worst_sigma = max(worst_sigma, abs(s.alpha - row["alpha"]) / row["sigma"])
            worst_rel = max(worst_rel, abs(s.alpha - row["alpha"]) / row["alpha"])
    print(f"{name}: {n_both} layers; alpha fitted by both on {n_fit} (ours declines below 20 eigenvalues): "
          f"max |alpha diff| = {worst_sigma:.2g} of WeightWatcher's sigma ({worst_rel:.1e} relative); "
          f"lambda_max max rel diff {lam_rel:.1e}, stable rank {sr_rel:.1e}", flush=True)
    return t_ours, {"layers": n_both, "fitted": n_fit, "max_alpha_diff_in_sigma": worst_sigma}


def _spectral(args: argparse.Namespace) -> dict:
    import torchvision

    from circuits.models import load_model

    ww = None if args.no_weightwatcher else _weightwatcher()
    if ww is None:
        print("spectral comparison skipped: weightwatcher is not installed")
        return {}
    results = {}
    for name, model in (("fashion-inception (trained)", load_model()),
                        ("resnet50 (random init)", torchvision.models.resnet50(weights=None).eval())):
        torch.manual_seed(0)
        details, t_ww = _analyze(ww, model)
        t_ours, summary = _compare(name, model, details, show=name.startswith("fashion"))
        results[f"spectral_{name.split()[0]}"] = report(
            f"{name} spectral diagnostics", "weightwatcher analyze (randomize=True)", t_ww, t_ours,
            extra=f"{summary['layers']} layers, ours: spectrum + alpha fit + permuted ESD per layer")
    return results


def _tsne(args: argparse.Namespace) -> dict:
    from circuits.inspect.plots import plot_neuron_embedding

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(12, 5000, generator=g)
    w = centres[torch.randint(0, 12, (6000,), generator=g)] + 0.5 * torch.randn(6000, 5000, generator=g)
    t0 = time.perf_counter()
    res = plot_neuron_embedding(w, "fc", method="tsne")
    t_ours = time.perf_counter() - t0
    print(f"t-SNE of a 6000x5000 layer: {t_ours:.1f} s ({res.figure.axes[0].get_title()})", flush=True)
    out = {"tsne_ours_s": t_ours}
    if args.tsne_full:
        from sklearn.manifold import TSNE
        from threadpoolctl import threadpool_limits

        t0 = time.perf_counter()
        with threadpool_limits(limits=args.threads):
            TSNE(n_components=2, perplexity=30, random_state=0, init="pca").fit_transform(w.double().numpy())
        out["tsne"] = report("t-SNE of a 6000x5000 layer", "t-SNE on all raw rows (the old way)",
                             time.perf_counter() - t0, t_ours)
    return out


if __name__ == "__main__":
    main()
