"""Per-layer weight statistics of a ResNet-50-sized state dict: ``circuits.inspect.weight_stats``
vs a plain per-tensor numpy/scipy loop computing the same statistics, and vs WeightWatcher's
``describe`` (layer metadata only) and ``analyze`` (SVD-based metrics, which include the
Frobenius and spectral norms) where it is installed.

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
    args = p.parse_args(argv)
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    with threadpool_limits(limits=args.threads):
        return _run(args)


def _run(args: argparse.Namespace) -> dict:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    state = model.state_dict()
    n_values = sum(t.numel() for t in state.values() if t.is_floating_point())
    print(f"resnet50 random init: {len(state)} tensors, {n_values / 1e6:.1f}M values", flush=True)

    # agreement first
    ours = weight_stats(state)
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
    t_ours = timeit(lambda: weight_stats(state), repeat=args.repeat)
    t_np = timeit(lambda: numpy_stats(state), repeat=1, warmup=0)
    results["numpy"] = report("resnet50 weight stats (all, incl. spectral)", "numpy/scipy loop (SVD)", t_np, t_ours)
    t_ours_ns = timeit(lambda: weight_stats(state, spectral="none"), repeat=args.repeat)
    t_np_ns = timeit(lambda: numpy_stats(state, spectral=False), repeat=args.repeat, warmup=0)
    results["numpy_nospectral"] = report("resnet50 weight stats (no spectral norm)", "numpy/scipy loop", t_np_ns, t_ours_ns)

    if not args.no_weightwatcher:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import logging

                logging.getLogger("weightwatcher").setLevel(logging.ERROR)
                import weightwatcher as ww
        except Exception as exc:  # noqa: BLE001 - any import failure is recorded, not fatal
            print(f"weightwatcher unavailable ({type(exc).__name__}: {exc}); compared with numpy only")
        else:
            watcher = ww.WeightWatcher(model=model)
            t0 = time.perf_counter()
            desc = watcher.describe()
            t_desc = time.perf_counter() - t0
            results["ww_describe"] = report("resnet50 layer table", "weightwatcher describe (shapes only)", t_desc, t_ours,
                                            extra=f"ww {len(desc)} layers, ours {len(ours)} tensors with full statistics")
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                details = watcher.analyze(plot=False)
            t_an = time.perf_counter() - t0
            results["ww_analyze"] = report("resnet50 norms (Frobenius + spectral)", "weightwatcher analyze", t_an, t_ours,
                                           extra=f"ww {len(details)} layers")
            fc = details[details["longname"] == "fc"] if "longname" in details else None
            if fc is not None and len(fc):
                w = ours["fc.weight"]
                ww_spec = float(fc["spectral_norm"].iloc[0])
                print(f"fc: weightwatcher spectral_norm {ww_spec:.4g} (its convention: largest eigenvalue of W^T W, "
                      f"= sigma_max^2) vs ours sigma_max^2 = {w.spectral_norm ** 2:.4g}", flush=True)
    return results


if __name__ == "__main__":
    main()
