"""Article figure 5: a grid of small multiples between two families of neurons.

Rows are input neurons (``inputs`` in ``from_layer``, default ``mixed3a``), columns output
neurons (``outputs`` in ``to_layer``, default ``mixed3b``): cell ``(i, j)`` is the weight
slice from input ``i`` to output ``j`` (expanded weights across the bottlenecks), with
feature visualizations as headers. The article's curve detectors (mixed3b 379, 385, 343,
342, 388, 340, 330, 349) and mixed3a inputs (147, 189, 156, 163, 85, 160) are the
InceptionV1 defaults; both lists are configurable.

``outputs: auto`` picks a family of ``n_outputs`` similar neurons (the strongest output and
the outputs whose weights have the highest cosine similarity to it); ``inputs: auto`` picks
the ``n_inputs`` inputs with the largest summed squared weights to the chosen outputs.

Outputs: ``fig05_curve_grid.*`` (figure), ``.npz`` (``cells [n_in, n_out, kh, kw]``,
``inputs``, ``outputs``), ``.json``. Meaningful only with trained weights
(``weights: inception5h.pth``); random init checks shapes and plumbing.
"""

from __future__ import annotations

from _common import n_channels, resolve_neurons, similar_family, start, weights_between, feature_vis
from circuits.figures import family_grid


def run(config: dict) -> dict:
    r = start(config)
    src, dst = config.get("from_layer", "mixed3a"), config.get("to_layer", "mixed3b")
    n_out_total = n_channels(r.model, dst)
    spec_out = config.get("outputs", [379, 385, 343, 342, 388, 340, 330, 349])
    if spec_out in (None, "auto"):
        W_all, kind = weights_between(r.model, src, dst)
        outputs = similar_family(W_all, int(config.get("n_outputs", 8)), config.get("seed_neuron"))
        W = W_all[outputs]
    else:
        outputs = resolve_neurons(spec_out, n_out_total, lambda: [], "outputs")
        W, kind = weights_between(r.model, src, dst, outputs)
    n_in_total = W.shape[1]
    strength = W.square().sum(dim=(0, 2, 3))
    inputs = resolve_neurons(config.get("inputs", [147, 189, 156, 163, 85, 160]), n_in_total,
                             lambda: strength.argsort(descending=True, stable=True)[: int(config.get("n_inputs", 6))].tolist(), "inputs")
    imgs = feature_vis(r, [f"{src}:{i}" for i in inputs] + [f"{dst}:{o}" for o in outputs])
    fig = family_grid(W, imgs[: len(inputs)], imgs[len(inputs):], inputs=inputs, outputs=list(range(len(outputs))),
                      in_labels=[f"{src}:{i}" for i in inputs], out_labels=[f"{dst}:{o}" for o in outputs],
                      title=f"{src} → {dst} ({kind} weights)")
    cells = fig.data["cells"]
    r.save_figure(fig, "fig05_curve_grid")
    summary = {"from_layer": src, "to_layer": dst, "kind": kind, "inputs": inputs, "outputs": outputs,
               "cell_norms": [[float((c ** 2).sum() ** 0.5) for c in row] for row in cells]}
    r.save_numbers("fig05_curve_grid", {"cells": cells, "inputs": inputs, "outputs": outputs}, summary)
    return r.result(summary)
