"""Article figure 10: the top eighteen expanded weights from ``conv2d2`` to ``mixed3b:208``, in rows by factor.

The neuron's expanded weights ``[in, kh, kw]`` from ``from_layer`` (two layers back, across
the ``mixed3a`` block and the ``mixed3b`` bottlenecks) are factored with one-sided NMF
(``components``, 2); the ``top_n`` (18) input channels with the largest L2 are grouped by
their dominant factor (:func:`circuits.figures.factor_order`), one row per factor, ordered
within a row by signed loading. Each cell: input neuron's feature visualization above its
expanded weight map.

Config: ``target`` (``mixed3b:208``; ``mixed3b:auto`` for fashion), ``from_layer``
(``conv2d2``), ``top_n`` (18), ``components`` (2).

Outputs: ``fig10_expanded_factors.*`` (figure), ``.npz`` (``weights [in, kh, kw]``,
``norms [in]``, ``order [top_n]`` in factor order, ``factor [top_n]``, ``loadings [k, in]``,
``spatial [k, kh, kw]``), ``.json``. Meaningful only with ``weights: inception5h.pth``
(black-and-white vs colour factors); random init is a smoke test.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from _common import resolve_target, sparse_images, start, weights_between
from circuits.figures import DIVERGING, FigureResult, factor_order, rank_inputs, symmetric_limit
from circuits.nmf import neuron_factors


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
    r = start(config)
    src = config.get("from_layer", "conv2d2")
    layer, ch = resolve_target(config.get("target", "mixed3b:208"), r.model, src)
    top_n, k = int(config.get("top_n", 18)), int(config.get("components", 2))
    W, kind = weights_between(r.model, src, layer, [ch])
    w = W[0].numpy()
    f = neuron_factors(w, k, **r.nmf_settings())
    loadings, spatial = f.loadings[0].numpy(), f.spatial[0].numpy()
    order, factor = factor_order(w, loadings, top_n, spatial)
    norms = rank_inputs(w)[1]
    images, _ = sparse_images(r, src, order.tolist(), w.shape[0])
    labels = [f"{src}:{c}" for c in range(w.shape[0])]
    fig = rows_figure(w, order, factor, images, labels, max_cols=max(-(-top_n // k), min(12, int(np.bincount(factor).max()))),
                      title=f"Top {len(order)} {kind} weights {src} → {layer}:{ch}, one row per NMF factor ({100 * float(f.explained[0]):.0f}% explained)")
    r.save_figure(fig, "fig10_expanded_factors")
    summary = {"target": f"{layer}:{ch}", "from_layer": src, "kind": kind, "top_n": top_n, "components": k,
               "order": order, "factor": factor, "explained": float(f.explained[0]), "kernel": list(w.shape[1:])}
    r.save_numbers("fig10_expanded_factors", {"weights": w, "norms": norms, "order": order, "factor": factor,
                                              "loadings": loadings, "spatial": spatial}, summary)
    return r.result(summary)
