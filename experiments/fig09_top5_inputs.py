"""Article figure 9: ``mixed3b:208`` with the five ``mixed3a`` neurons that give it the strongest weights.

``mixed3b:208`` is a black-and-white centre detector built from black-and-white-vs-colour
detectors. The figure shows the target's feature visualization and small multiples of its
``top_n`` (5) strongest ``mixed3a`` inputs (expanded weights across the bottlenecks). On the
bundled model the target is the story file's ``bottleneck`` neuron (the neuron of the
bottlenecked branches with the strongest expanded weights two layers back), the same neuron
as figure 10.

Claim: the ``top_n`` inputs carry a larger share of the neuron's squared weights than for
the same neuron of random-init models and than for its weights shuffled within the support.

Config: ``target`` (default ``mixed3b:208``; ``story:bottleneck``), ``from_layer``
(``mixed3a``), ``top_n`` (5).

Outputs: ``fig09_top5_inputs.*`` (small multiples, with the target's variable name as the
first panel), ``fig09_target.png`` (the target's feature visualization), ``.npz``
(``weights``, ``norms``, ``order``, ``slices``), ``.json`` (with the claim).
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from _common import add_caption, on_support, options, resolve_target, sparse_images, start, weights_between
from _measures import Claim, shuffle_entries, top_share
from circuits.figures import DIVERGING, FigureResult, rank_inputs, save_image_png, symmetric_limit

def target_and_inputs(w: np.ndarray, order, images, target_img, target_label: str, labels, title: str) -> FigureResult:
    """The target's variable name (left), then one column per input: its variable name above its
    weight slice (one symmetric colour scale)."""
    n = len(order)
    m = symmetric_limit(w[order])
    fig = Figure(figsize=(1.1 * n + 2.2, 3.0))
    gs = fig.add_gridspec(2, n + 2, width_ratios=[1.6] + [1.0] * n + [0.1], wspace=0.15, hspace=0.2,
                          top=1.0 - 0.45 / 3.0, bottom=0.04, left=0.02, right=0.94)
    t = fig.add_subplot(gs[:, 0])
    t.imshow(target_img, cmap="gray" if target_img.ndim == 2 else None, vmin=0, vmax=1)
    t.set_xticks([]); t.set_yticks([])
    t.set_title(target_label, fontsize=8)
    im = None
    for j, c in enumerate(order):
        a, b = fig.add_subplot(gs[0, j + 1]), fig.add_subplot(gs[1, j + 1])
        for ax in (a, b):
            ax.set_xticks([]); ax.set_yticks([])
        if images[c] is not None:
            a.imshow(images[c], cmap="gray" if images[c].ndim == 2 else None, vmin=0, vmax=1)
        a.set_title(labels[j], fontsize=6, pad=2)
        im = b.imshow(w[c], cmap=DIVERGING, vmin=-m, vmax=m, interpolation="nearest")
    if im is not None:
        cb = fig.colorbar(im, cax=fig.add_subplot(gs[1, n + 1]))
        cb.ax.tick_params(labelsize=5)
    fig.suptitle(title, fontsize=9, y=1.0 - 0.08 / 3.0, va="top")
    return FigureResult(fig, {"order": np.asarray(order), "vmin": -m, "vmax": m})


OPTIONS = options(target="layer:index or story:NAME", from_layer="upstream layer", top_n="inputs shown")


def run(config: dict) -> dict:
    r = start(config, OPTIONS)
    src = config.get("from_layer", "mixed3a")
    layer, ch = resolve_target(config.get("target", "mixed3b:208"), r.model, config)
    top_n = int(config.get("top_n", 5))
    W, kind = weights_between(r.model, src, layer, [ch])
    w = W[0]
    claim = Claim(f"share of {layer}:{ch}'s squared {kind} weights in its top {top_n} {src} inputs", top_share(w.numpy(), top_n),
                  [top_share(weights_between(m, src, layer, [ch])[0][0].numpy(), top_n) for m in r.random_models()],
                  [top_share(shuffle_entries(W, s)[0].numpy(), top_n) for s in r.shuffle_seeds()],
                  control="the same neuron of random-init models", shuffle="weights permuted within the neuron's support")
    order = rank_inputs(w, top_n)[0].tolist()
    images, (target_img,) = sparse_images(r, src, order, w.shape[0], extra=[f"{layer}:{ch}"])
    fig = target_and_inputs(on_support(w.numpy()), order, images, target_img, f"{layer}:{ch}", [f"{src}:{c}" for c in order],
                            f"{layer}:{ch} and its {top_n} strongest {src} inputs ({kind} weights)")
    add_caption(fig, [claim.caption()])
    data = {"order": np.asarray(order), "norms": rank_inputs(w)[1], "slices": w.numpy()[order]}
    r.save_figure(fig, "fig09_top5_inputs")
    p = save_image_png(target_img, r.out / "fig09_target.png", scale=max(1, 128 // max(target_img.shape[:2])))
    r.files.append(str(p))
    summary = {"target": f"{layer}:{ch}", "from_layer": src, "kind": kind, "order": data["order"], "top_norms": data["norms"][data["order"]],
               "claim": claim.as_dict()}
    r.save_numbers("fig09_top5_inputs", {"weights": w, "norms": data["norms"], "order": data["order"], "slices": data["slices"]}, summary)
    return r.result(summary)
