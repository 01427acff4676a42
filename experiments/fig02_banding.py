"""Article figure 2: weight banding in ``mixed5b_5x5`` and a banding measure.

In models with global average pooling, late-layer weights factor into horizontal bands.
For each neuron of ``layer`` (default ``mixed5b_5x5``, its 5x5 kernel from
``mixed5b_5x5_bottleneck``) the one-sided NMF spatial maps are scored with
:func:`circuits.nmf.banding_score` (``(Vy - Vx) / V`` over the maps: 1 = horizontal bands,
-1 = vertical bands, 0 = isotropic). The figure shows ``n_neurons`` NMF pictures; the
numbers cover *every* neuron of the layer.

Claim: the layer's mean banding score is higher than on random-init weights
(``controls.random_init`` draws) and on the trained weights with each neuron's position
vectors shuffled among its positions (``controls.shuffled``). The same score for
``baseline_layer`` (early in the network, default ``mixed3b_5x5``) is reported beside it.
For fashion-inception (no ``mixed5b``) the config uses ``mixed4a_5x5``, the last 5x5 conv
before its global average pool, and ``mixed3a_5x5`` as the baseline.

Outputs (``fig02_banding.*``): figure; ``.npz`` with ``scores [out]`` (all neurons),
``baseline_scores``, ``shown`` (neurons drawn), ``rgb``; ``.json`` with mean/median scores,
the fraction of neurons with score > 0.5 and the claim with its controls.
"""

from __future__ import annotations

import numpy as np

from _common import add_caption, options, resolve_neurons, start
from _measures import Claim, shuffle_positions
from circuits.figures import nmf_rgb_figure
from circuits.nmf import banding_score, factors_rgb, neuron_factors
from fig01_nmf import layer_weights

OPTIONS = options(layer="the late conv layer", baseline_layer="an early conv layer for contrast", neurons="neurons to draw: indices or auto",
                  n_neurons="how many with neurons: auto", components="NMF factors", scale="pixel upsampling")


def mean_banding(w, k: int, nmf: dict) -> float:
    return float(banding_score(neuron_factors(w, k, **nmf)).mean())


def run(config: dict) -> dict:
    r = start(config, OPTIONS)
    layer = config.get("layer", "mixed5b_5x5")
    base = config.get("baseline_layer", "mixed3b_5x5")
    k = int(config.get("components", 3))
    nmf = r.nmf_settings()
    w, kind, src = layer_weights(r.model, layer)
    f = neuron_factors(w, k, **nmf)
    scores = banding_score(f).numpy()
    wb, _, _ = layer_weights(r.model, base)
    base_scores = banding_score(neuron_factors(wb, k, **nmf)).numpy()
    claim = Claim(f"mean banding score of {layer} (1 = horizontal bands, 0 = none)", float(scores.mean()),
                  [mean_banding(layer_weights(m, layer)[0], k, nmf) for m in r.random_models()],
                  [mean_banding(shuffle_positions(w, s), k, nmf) for s in r.shuffle_seeds()],
                  shuffle="each neuron's position vectors permuted among its positions")
    n_show = int(config.get("n_neurons", 8))
    shown = resolve_neurons(config.get("neurons", "auto"), w.shape[0], lambda: np.argsort(-scores, kind="stable")[:n_show].tolist(), config=config)
    rgb = factors_rgb(f.spatial[shown, :3], scale=int(config.get("scale", 8)))
    labels = [f"{layer}:{n}\nband {scores[n]:.2f}" for n in shown]
    fig = nmf_rgb_figure(rgb, labels=labels)
    add_caption(fig, [claim.caption(), f"early layer {base} for contrast: mean score {base_scores.mean():.2f}"],
                title=f"Weight banding in {layer}: NMF factors as RGB, the most banded neurons")
    r.save_figure(fig, "fig02_banding")
    summary = {
        "layer": layer, "weights_from": src, "baseline_layer": base, "components": k, "shown": shown,
        "mean_score": float(scores.mean()), "median_score": float(np.median(scores)),
        "fraction_banded": float((scores > 0.5).mean()),
        "baseline_mean_score": float(base_scores.mean()), "baseline_median_score": float(np.median(base_scores)),
        "mean_explained": float(f.explained.mean()), "claim": claim.as_dict(),
    }
    r.save_numbers("fig02_banding", {"scores": scores, "baseline_scores": base_scores, "shown": shown, "rgb": rgb, "explained": f.explained}, summary)
    return r.result(summary)
