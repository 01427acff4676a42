"""Article figure 13: smooth spatial structure of expanded weights from ``mixed3b:268`` to ``conv2d1``.

Expanded weights across several layers often look like smooth "electron orbitals". The
figure shows the ``top_n`` strongest ``[kh, kw]`` maps from ``from_layer`` (``conv2d1``) to
the target, and measures smoothness as the lag-1 spatial autocorrelation of each map
(mean of neighbour products over the mean square, after removing the mean; 1 = smooth,
~0 = noise), against a baseline of the same maps with their positions shuffled (seeded).

Config: ``target`` (``mixed3b:268``; ``mixed3b:auto`` for fashion), ``from_layer``, ``top_n`` (8).

Outputs: ``fig13_smooth_expanded.*`` (figure), ``.npz`` (``weights``, ``order``,
``smoothness [top_n]``, ``shuffled [top_n]``), ``.json`` (means). Expanded weights of random
init are already somewhat smooth (stacked convolutions average), so the comparison with the
real checkpoint (``weights: inception5h.pth``) is what the article's claim is about.
"""

from __future__ import annotations

import numpy as np

from _common import resolve_target, start, weights_between
from circuits.figures import rank_inputs, weight_heatmap


def smoothness(m: np.ndarray) -> float:
    """Lag-1 autocorrelation of a 2-d map (horizontal and vertical neighbours pooled)."""
    c = m - m.mean()
    den = float((c ** 2).mean())
    if den == 0:
        return 0.0
    num = np.concatenate([(c[:, :-1] * c[:, 1:]).ravel(), (c[:-1] * c[1:]).ravel()]).mean()
    return float(num / den)


def support_crop(w: np.ndarray) -> np.ndarray:
    """Crop ``[n, kh, kw]`` maps to the bounding box where any of them is non-zero."""
    nz = np.abs(w).sum(0) > 0
    if not nz.any():
        return w
    ys, xs = np.flatnonzero(nz.any(1)), np.flatnonzero(nz.any(0))
    return w[:, ys[0]: ys[-1] + 1, xs[0]: xs[-1] + 1]


def run(config: dict) -> dict:
    r = start(config)
    src = config.get("from_layer", "conv2d1")
    layer, ch = resolve_target(config.get("target", "mixed3b:268"), r.model, src)
    top_n = int(config.get("top_n", 8))
    W, kind = weights_between(r.model, src, layer, [ch])
    w = W[0].numpy()
    order = rank_inputs(w, top_n)[0]
    maps = support_crop(w[order])
    rng = np.random.default_rng(int(config.get("seed", 0)))
    smooth = np.array([smoothness(m) for m in maps])
    shuffled = np.array([smoothness(rng.permutation(m.ravel()).reshape(m.shape)) for m in maps])
    fig = weight_heatmap(maps, titles=[f"{src}:{c}\nr={s:.2f}" for c, s in zip(order, smooth)], cols=min(top_n, 8), cell_size=1.4)
    fig.figure.suptitle(f"{kind} weights {src} → {layer}:{ch} (mean lag-1 autocorrelation {smooth.mean():.2f}; shuffled {shuffled.mean():.2f})", fontsize=9)
    r.save_figure(fig, "fig13_smooth_expanded")
    summary = {"target": f"{layer}:{ch}", "from_layer": src, "kind": kind, "order": order, "kernel": list(maps.shape[1:]),
               "mean_smoothness": float(smooth.mean()), "mean_shuffled_smoothness": float(shuffled.mean())}
    r.save_numbers("fig13_smooth_expanded", {"weights": w, "maps": maps, "order": order, "smoothness": smooth, "shuffled": shuffled}, summary)
    return r.result(summary)
