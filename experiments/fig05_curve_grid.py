"""Article figure 5: a grid of small multiples between two families of neurons.

Rows are input neurons (``inputs`` in ``from_layer``, default ``mixed3a``), columns output
neurons (``outputs`` in ``to_layer``, default ``mixed3b``): cell ``(i, j)`` is the weight
slice from input ``i`` to output ``j`` (expanded weights across the bottlenecks), with
feature visualizations as headers. The article's curve detectors (mixed3b 379, 385, 343,
342, 388, 340, 330, 349) and mixed3a inputs (147, 189, 156, 163, 85, 160) are the
InceptionV1 defaults; ``outputs: story:family`` takes the story file's family (the neurons
with the most similar weights up to rotation/reflection); ``inputs: auto`` picks the
``n_inputs`` inputs with the largest summed squared weights to the chosen outputs.

Claim: the family's weights are genuinely similar — the mean pairwise best
orientation-aligned cosine (over the 8 rotations/reflections of the kernels) is higher than
that of the best family **the same search** finds in random-init models and in the trained
weights shuffled within each neuron's support (for an explicit list: the same neurons of
random-init models). Each column header names the rotation/reflection that aligns it with
the first neuron.

Outputs: ``fig05_curve_grid.*`` (figure), ``.npz`` (``cells [n_in, n_out, kh, kw]``,
``inputs``, ``outputs``, ``aligned_cosine [n_out, n_out]``), ``.json`` (with the claim).
"""

from __future__ import annotations

import numpy as np

from _common import add_caption, feature_vis, n_channels, options, resolve_neurons, start, support_box, weights_between
from _measures import Claim, best_family, dihedral_cosine, shuffle_entries
from circuits.figures import family_grid

OPTIONS = options(from_layer="input family's layer", to_layer="output family's layer", outputs="indices or story:NAME",
                  inputs="indices or auto", n_inputs="how many with inputs: auto")
TRANSFORMS = ["", "flip", "rot90", "rot90+flip", "rot180", "rot180+flip", "rot270", "rot270+flip"]


def family_score(w, neurons) -> tuple[float, np.ndarray, np.ndarray]:
    best, which = dihedral_cosine(w[list(neurons)])
    n = len(neurons)
    off = ~np.eye(n, dtype=bool)
    return float(best.numpy()[off].mean()), best.numpy(), which.numpy()


def run(config: dict) -> dict:
    r = start(config, OPTIONS)
    src, dst = config.get("from_layer", "mixed3a"), config.get("to_layer", "mixed3b")
    spec_out = config.get("outputs", [379, 385, 343, 342, 388, 340, 330, 349])
    outputs = resolve_neurons(spec_out, n_channels(r.model, dst), what="outputs", config=config)
    W_all, kind = weights_between(r.model, src, dst)
    W = W_all[outputs]
    score, aligned, which = family_score(W_all, outputs)
    searched = isinstance(spec_out, str) and spec_out.startswith("story:")
    n = len(outputs)
    if searched:  # the family came out of a search: the controls run the same search
        rand = [best_family(weights_between(m, src, dst)[0], n).score for m in r.random_models()]
        shuf = [best_family(shuffle_entries(W_all, s), n).score for s in r.shuffle_seeds()]
        control = "the best family the same search finds"
    else:
        rand = [family_score(weights_between(m, src, dst, outputs)[0], range(n))[0] for m in r.random_models()]
        shuf = [family_score(shuffle_entries(W, s), range(n))[0] for s in r.shuffle_seeds()]
        control = "the same neurons"
    claim = Claim(f"mean pairwise orientation-aligned cosine of the {n} {dst} neurons' {kind} weights", score, rand, shuf,
                  control=control, shuffle="each neuron's weights permuted within its support")
    strength = W.square().sum(dim=(0, 2, 3))
    inputs = resolve_neurons(config.get("inputs", [147, 189, 156, 163, 85, 160]), W.shape[1],
                             lambda: strength.argsort(descending=True, stable=True)[: int(config.get("n_inputs", 6))].tolist(), "inputs", config)
    imgs = feature_vis(r, [f"{src}:{i}" for i in inputs] + [f"{dst}:{o}" for o in outputs])
    out_labels = [f"{dst}:{o}" + (f"\n{TRANSFORMS[which[0, j]] or 'as is'} {aligned[0, j]:.2f}" if j else "\n(first)") for j, o in enumerate(outputs)]
    y0, y1, x0, x1 = support_box(W)  # draw the family's kernel, not the window's zero padding
    fig = family_grid(W[:, :, y0:y1, x0:x1], imgs[: len(inputs)], imgs[len(inputs):], inputs=inputs, outputs=list(range(n)),
                      in_labels=[f"{src}:{i}" for i in inputs], out_labels=out_labels,
                      title=f"{src} → {dst} ({kind} weights): a family with similar weights")
    add_caption(fig, [claim.caption(), "Column headers: the rotation/reflection that best aligns each neuron with the first, and its cosine."])
    cells = fig.data["cells"]
    r.save_figure(fig, "fig05_curve_grid")
    summary = {"from_layer": src, "to_layer": dst, "kind": kind, "inputs": inputs, "outputs": outputs,
               "aligned_cosine_to_first": aligned[0].tolist(), "transform_to_first": [TRANSFORMS[t] or "identity" for t in which[0]],
               "cell_norms": [[float((c ** 2).sum() ** 0.5) for c in row] for row in cells], "claim": claim.as_dict()}
    r.save_numbers("fig05_curve_grid", {"cells": cells, "inputs": inputs, "outputs": outputs, "aligned_cosine": aligned}, summary)
    return r.result(summary)
