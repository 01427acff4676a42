"""Article figure 10: the top eighteen expanded weights from ``conv2d2`` to ``mixed3b:208``, in rows by factor.

The neuron's expanded weights ``[in, kh, kw]`` from ``from_layer`` (two layers back, across
the ``mixed3a`` block and the ``mixed3b`` bottlenecks) are factored with one-sided NMF
(``components``, 2); the ``top_n`` (18) input channels with the largest L2 are grouped by
their dominant factor (:func:`circuits.figures.factor_order`), one row per factor, ordered
within a row by signed loading. Each cell: input neuron's feature visualization above its
expanded weight map.

Claim: the neuron's expanded weights have a simpler underlying structure — ``components``
NMF factors explain more of their variance than of the same neuron's expanded weights in
random-init models, or of its weights shuffled within the support.

Config: ``target`` (``mixed3b:208``; ``story:bottleneck`` on the bundled model, the same
neuron as figure 9), ``from_layer`` (``conv2d2``), ``top_n`` (18), ``components`` (2).

Outputs: ``fig10_expanded_factors.*`` (figure), ``.npz`` (``weights [in, kh, kw]``,
``norms [in]``, ``order [top_n]`` in factor order, ``factor [top_n]``, ``loadings [k, in]``,
``spatial [k, kh, kw]``), ``.json`` (with the claim).
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from _common import add_caption, on_support, options, resolve_target, sparse_images, start, weights_between
from _measures import Claim, shuffle_entries
from circuits.figures import DIVERGING, FigureResult, factor_order, rank_inputs, symmetric_limit
from circuits.nmf import neuron_factors


OPTIONS = options(target="layer:index or story:NAME", from_layer="upstream layer", top_n="inputs shown",
                  components="NMF factors")


def explained(w, k: int, nmf: dict) -> float:
    return float(neuron_factors(w, k, **nmf).explained[0])


def rows_figure(w: np.ndarray, order: np.ndarray, factor: np.ndarray, images, labels, title: str, max_cols: int = 9) -> FigureResult:
    """Cells grouped in one row per factor (a long group wraps after ``max_cols`` cells):
    image above weight map; one colour scale."""
    groups, row_factor = [], []
    for f in np.unique(factor):
        g = order[factor == f]
        for i in range(0, len(g), max_cols):
            groups.append(g[i: i + max_cols])
            row_factor.append(f)
    ncols = max(len(g) for g in groups)
    m = symmetric_limit(w[order])
    fig = Figure(figsize=(ncols * 1.0 + 0.8, len(groups) * 2.1 + 0.4))
    gs = fig.add_gridspec(2 * len(groups), ncols + 1, width_ratios=[1.0] * ncols + [0.1], hspace=0.15, wspace=0.1)
    im = None
    for gi, (f, g) in enumerate(zip(row_factor, groups)):
        for j, c in enumerate(g):
            a, b = fig.add_subplot(gs[2 * gi, j]), fig.add_subplot(gs[2 * gi + 1, j])
            for ax in (a, b):
                ax.set_xticks([]); ax.set_yticks([])
            if images[c] is not None:
                a.imshow(images[c], cmap="gray" if images[c].ndim == 2 else None, vmin=0, vmax=1)
            a.set_title(f"F{int(f)} · {labels[c]}", fontsize=6, pad=2)
            im = b.imshow(w[c], cmap=DIVERGING, vmin=-m, vmax=m, interpolation="nearest")
    if im is not None:
        cb = fig.colorbar(im, cax=fig.add_subplot(gs[:, ncols]))
        cb.set_label("expanded weight", fontsize=7)
    fig.suptitle(title, fontsize=9)
    return FigureResult(fig, {"order": order, "factor": factor, "vmin": -m, "vmax": m})


def run(config: dict) -> dict:
    r = start(config, OPTIONS)
    src = config.get("from_layer", "conv2d2")
    layer, ch = resolve_target(config.get("target", "mixed3b:208"), r.model, config)
    top_n, k = int(config.get("top_n", 18)), int(config.get("components", 2))
    W, kind = weights_between(r.model, src, layer, [ch])
    w = W[0].numpy()
    nmf = r.nmf_settings()
    f = neuron_factors(w, k, **nmf)
    claim = Claim(f"variance of {layer}:{ch}'s {kind} weights from {src} explained by {k} NMF factors", float(f.explained[0]),
                  [explained(weights_between(m, src, layer, [ch])[0], k, nmf) for m in r.random_models()],
                  [explained(shuffle_entries(W, s), k, nmf) for s in r.shuffle_seeds()],
                  control="the same neuron of random-init models", shuffle="weights permuted within the support")
    loadings, spatial = f.loadings[0].numpy(), f.spatial[0].numpy()
    order, factor = factor_order(w, loadings, top_n, spatial)
    norms = rank_inputs(w)[1]
    images, _ = sparse_images(r, src, order.tolist(), w.shape[0])
    labels = [f"{src}:{c}" for c in range(w.shape[0])]
    fig = rows_figure(on_support(w), order, factor, images, labels, max_cols=max(-(-top_n // k), min(12, int(np.bincount(factor).max()))),
                      title=f"Top {len(order)} {kind} weights {src} → {layer}:{ch}, one row per NMF factor")
    add_caption(fig, [claim.caption()])
    r.save_figure(fig, "fig10_expanded_factors")
    summary = {"target": f"{layer}:{ch}", "from_layer": src, "kind": kind, "top_n": top_n, "components": k,
               "order": order, "factor": factor, "explained": float(f.explained[0]), "kernel": list(w.shape[1:]),
               "claim": claim.as_dict()}
    r.save_numbers("fig10_expanded_factors", {"weights": w, "norms": norms, "order": order, "factor": factor,
                                              "loadings": loadings, "spatial": spatial}, summary)
    return r.result(summary)
