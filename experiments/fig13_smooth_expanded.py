"""Article figure 13: smooth spatial structure of expanded weights from ``mixed3b:268`` to ``conv2d1``.

Expanded weights across several layers often look like smooth "electron orbitals". The
figure shows the ``top_n`` strongest ``[kh, kw]`` maps from ``from_layer`` (``conv2d1``) to
the target (on the bundled model the story file's ``bottleneck`` neuron, as in figures 9–10),
cropped to their support, and measures smoothness as the lag-1 spatial autocorrelation of
each map (mean of neighbour products over the mean square, after removing the mean;
1 = smooth, ~0 = noise).

Claim: the trained maps are smoother than the same neuron's maps in random-init models and
than the same maps with their pixels shuffled. (Stacking convolutions does not by itself make
maps smooth: a convolution of independent zero-mean kernels is uncorrelated at lag 1, so the
random-init control measures about 0.)

Config: ``target`` (``mixed3b:268``; ``story:bottleneck``), ``from_layer``, ``top_n`` (8).

Outputs: ``fig13_smooth_expanded.*`` (figure), ``.npz`` (``weights``, ``maps``, ``order``,
``smoothness [top_n]``, ``shuffled [top_n]``), ``.json`` (means, the claim).
"""

from __future__ import annotations

import numpy as np

from matplotlib.figure import Figure

from _common import add_caption, options, resolve_target, start, support_box, weights_between
from _measures import Claim, smoothness
from circuits.figures import DIVERGING, FigureResult, rank_inputs, symmetric_limit

OPTIONS = options(target="layer:index or story:NAME", from_layer="upstream layer (several layers back)", top_n="maps shown")


def support_crop(w: np.ndarray) -> np.ndarray:
    """Crop ``[n, kh, kw]`` maps to the bounding box where any of them is non-zero."""
    y0, y1, x0, x1 = support_box(w)
    return w[:, y0:y1, x0:x1]


def maps_figure(maps: np.ndarray, titles: list[str], title: str) -> FigureResult:
    """One row of weight maps on one symmetric scale, a colour bar in its own column, the title
    in its own band above the cells' labels."""
    n = len(maps)
    m = symmetric_limit(maps)
    fig = Figure(figsize=(1.25 * n + 0.6, 2.2))
    gs = fig.add_gridspec(1, n + 1, width_ratios=[1.0] * n + [0.08], wspace=0.12,
                          top=1.0 - 0.75 / 2.2, bottom=0.03, left=0.02, right=0.95)
    im = None
    for i in range(n):
        ax = fig.add_subplot(gs[0, i])
        im = ax.imshow(maps[i], cmap=DIVERGING, vmin=-m, vmax=m, interpolation="nearest")
        ax.set_xticks([]); ax.set_yticks([])
        ax.set_title(titles[i], fontsize=7, pad=2)
    cb = fig.colorbar(im, cax=fig.add_subplot(gs[0, n]))
    cb.ax.tick_params(labelsize=5)
    fig.suptitle(title, fontsize=9, y=1.0 - 0.05 / 2.2, va="top")
    return FigureResult(fig, {"maps": maps, "vmin": -m, "vmax": m})


def top_maps(w: np.ndarray, top_n: int) -> tuple[np.ndarray, np.ndarray]:
    order = rank_inputs(w, top_n)[0]
    return order, support_crop(w[order])


def mean_smoothness(maps: np.ndarray) -> float:
    return float(np.mean([smoothness(m) for m in maps]))


def run(config: dict) -> dict:
    r = start(config, OPTIONS)
    src = config.get("from_layer", "conv2d1")
    layer, ch = resolve_target(config.get("target", "mixed3b:268"), r.model, config)
    top_n = int(config.get("top_n", 8))
    W, kind = weights_between(r.model, src, layer, [ch])
    w = W[0].numpy()
    order, maps = top_maps(w, top_n)
    smooth = np.array([smoothness(m) for m in maps])
    shuffled_maps = [np.stack([np.random.default_rng(s + 1000 * i).permutation(m.ravel()).reshape(m.shape) for i, m in enumerate(maps)])
                     for s in r.shuffle_seeds()]
    shuffled_each = np.array([smoothness(m) for m in shuffled_maps[0]]) if shuffled_maps else np.full(len(maps), np.nan)
    claim = Claim(f"mean lag-1 autocorrelation of {layer}:{ch}'s {top_n} strongest {kind} maps from {src}", float(smooth.mean()),
                  [mean_smoothness(top_maps(weights_between(m, src, layer, [ch])[0][0].numpy(), top_n)[1]) for m in r.random_models()],
                  [mean_smoothness(sm) for sm in shuffled_maps],
                  control="the same neuron of random-init models", shuffle="each map's pixels permuted")
    fig = maps_figure(maps, [f"{src}:{c}\nr = {s:.2f}" for c, s in zip(order, smooth)],
                      f"{kind.capitalize()} weights {src} → {layer}:{ch}: the {top_n} strongest maps ({maps.shape[1]}×{maps.shape[2]})")
    add_caption(fig, [claim.caption()])
    r.save_figure(fig, "fig13_smooth_expanded")
    summary = {"target": f"{layer}:{ch}", "from_layer": src, "kind": kind, "order": order, "kernel": list(maps.shape[1:]),
               "mean_smoothness": float(smooth.mean()), "mean_shuffled_smoothness": float(shuffled_each.mean()) if shuffled_maps else None,
               "claim": claim.as_dict()}
    r.save_numbers("fig13_smooth_expanded", {"weights": w, "maps": maps, "order": order, "smoothness": smooth, "shuffled": shuffled_each}, summary)
    return r.result(summary)
