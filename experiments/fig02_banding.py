"""Article figure 2: weight banding in ``mixed5b_5x5`` and a banding measure.

In models with global average pooling, late-layer weights factor into horizontal bands.
For each neuron of ``layer`` (default ``mixed5b_5x5``, its 5x5 kernel from
``mixed5b_5x5_bottleneck``) the one-sided NMF spatial maps are scored with
:func:`circuits.nmf.banding_score` (``(Vy - Vx) / V`` over the maps: 1 = horizontal bands,
-1 = vertical bands, 0 = isotropic). The figure shows ``n_neurons`` NMF pictures; the
numbers cover *every* neuron of the layer, and the same score for a ``baseline_layer``
early in the network (default ``mixed3b_5x5``) for contrast.

Outputs (``fig02_banding.*``): figure; ``.npz`` with ``scores [out]`` (all neurons),
``baseline_scores``, ``shown`` (neurons drawn), ``rgb``; ``.json`` with the layer names and
mean/median scores, fraction of neurons with score > 0.5.

The banding itself appears only in trained weights (``weights: inception5h.pth``); with
random init the scores hover around 0, which is what the smoke test shows. For
fashion-inception (no ``mixed5b``) the config uses ``mixed4a_5x5``, the last 5x5 conv
before its global average pool, and ``mixed3a_5x5`` as the baseline.
"""

from __future__ import annotations

import numpy as np

from _common import resolve_neurons, start
from circuits.figures import nmf_rgb_figure
from circuits.nmf import banding_score, factors_rgb, neuron_factors
from fig01_nmf import layer_weights


def run(config: dict) -> dict:
    r = start(config)
    layer = config.get("layer", "mixed5b_5x5")
    base = config.get("baseline_layer", "mixed3b_5x5")
    k = int(config.get("components", 3))
    w, kind, src = layer_weights(r, layer)
    f = neuron_factors(w, k, **r.nmf_settings())
    scores = banding_score(f).numpy()
    wb, _, _ = layer_weights(r, base)
    fb = neuron_factors(wb, k, **r.nmf_settings())
    base_scores = banding_score(fb).numpy()
    n_show = int(config.get("n_neurons", 8))
    shown = resolve_neurons(config.get("neurons", "auto"), w.shape[0], lambda: np.argsort(-scores, kind="stable")[:n_show].tolist())
    rgb = factors_rgb(f.spatial[shown, :3], scale=int(config.get("scale", 8)))
    labels = [f"{layer}:{n}\nband {scores[n]:.2f}" for n in shown]
    fig = nmf_rgb_figure(rgb, labels=labels)
    fig.figure.text(0.5, 0.0, f"Weight banding in {layer} (mean score {scores.mean():.2f}; {base}: {base_scores.mean():.2f})", ha="center", va="top", fontsize=9)  # caption below the pictures
    r.save_figure(fig, "fig02_banding")
    summary = {
        "layer": layer, "weights_from": src, "baseline_layer": base, "components": k, "shown": shown,
        "mean_score": float(scores.mean()), "median_score": float(np.median(scores)),
        "fraction_banded": float((scores > 0.5).mean()),
        "baseline_mean_score": float(base_scores.mean()), "baseline_median_score": float(np.median(base_scores)),
        "mean_explained": float(f.explained.mean()),
    }
    r.save_numbers("fig02_banding", {"scores": scores, "baseline_scores": base_scores, "shown": shown, "rgb": rgb, "explained": f.explained}, summary)
    return r.result(summary)
