"""Article figure 1: one-sided NMF pictures of a selection of neurons' input weights.

Each neuron's input weights ``[in, kh, kw]`` are split by sign (posneg) and factored into 3
non-negative spatial maps drawn as R, G, B (:func:`circuits.nmf.neuron_factors`).

Claim: ``components`` factors describe the neurons' weights — the mean variance explained over
**every** neuron of the layer — better than they describe random-init weights of the same
layer (``controls.random_init`` draws) or the trained weights with each neuron's entries
shuffled within its support (``controls.shuffled``).

Config: ``layer`` (a conv layer, e.g. ``mixed4d_5x5``; its direct kernel
``<layer>_pre_relu_conv`` is used) or ``from_layer`` + ``layer`` (expanded weights when the
two are not adjacent); ``neurons`` to draw (indices, or ``auto`` = the ``n_neurons`` with the
strongest weights); ``components`` (3); ``scale`` (pixel upsampling of the pictures).

Outputs (``fig01_nmf.*``): the figure; ``.npz`` with ``neurons``, ``spatial [n, k, kh, kw]``,
``loadings [n, k, in]``, ``explained [n]``, ``rgb [n, H, W, 3]``, ``layer_explained [out]``;
``.json`` with the neuron list, the variance explained and the claim with its controls.
"""

from __future__ import annotations

import torch

from _common import add_caption, options, resolve_neurons, start, strongest_outputs, weights_between
from _measures import Claim, shuffle_entries
from circuits.figures import nmf_rgb_figure
from circuits.layers import get_layer
from circuits.nmf import factors_rgb, neuron_factors

OPTIONS = options(layer="conv layer whose input weights are factored", from_layer="use weights from this layer instead",
                  neurons="neurons to draw: indices or auto", n_neurons="how many with neurons: auto",
                  components="NMF factors (3 = RGB)", scale="pixel upsampling of the pictures")


def layer_weights(model, layer: str, from_layer=None) -> tuple[torch.Tensor, str, str]:
    """``([out, in, kh, kw], kind, from)``: ``<layer>_pre_relu_conv`` kernel, or weights from ``from_layer``."""
    if from_layer:
        w, kind = weights_between(model, from_layer, layer)
        return w, kind, from_layer
    conv = get_layer(model, layer)
    if not isinstance(conv, torch.nn.Conv2d):
        conv = get_layer(model, f"{layer}_pre_relu_conv")
    if not isinstance(conv, torch.nn.Conv2d):
        raise ValueError(f"{layer!r} is not produced by a Conv2d; give from_layer to use expanded weights")
    return conv.weight.detach().float().cpu(), "direct", f"{layer}_pre_relu_conv input"


def run(config: dict) -> dict:
    r = start(config, OPTIONS)
    layer = config.get("layer", "mixed4d_5x5")
    w, kind, src = layer_weights(r.model, layer, config.get("from_layer"))
    n_total = w.shape[0]
    neurons = resolve_neurons(config.get("neurons", "auto"), n_total, lambda: strongest_outputs(w, int(config.get("n_neurons", 8))),
                              config=config)
    k = int(config.get("components", 3))
    nmf = r.nmf_settings()
    everyone = neuron_factors(w, k, **nmf).explained
    f = neuron_factors(w, k, neurons, **nmf)
    claim = Claim(f"mean variance of {layer}'s input weights explained by {k} NMF factors (all {n_total} neurons)",
                  float(everyone.mean()),
                  [float(neuron_factors(layer_weights(m, layer, config.get("from_layer"))[0], k, **nmf).explained.mean())
                   for m in r.random_models()],
                  [float(neuron_factors(shuffle_entries(w, s), k, **nmf).explained.mean()) for s in r.shuffle_seeds()],
                  shuffle="each neuron's weights permuted within its support")
    rgb = factors_rgb(f.spatial[:, :3], scale=int(config.get("scale", 8)))
    labels = [f"{layer}:{n}\n{100 * float(e):.0f}% expl." for n, e in zip(neurons, f.explained)]
    fig = nmf_rgb_figure(rgb, labels=labels)
    add_caption(fig, [claim.caption()], title=f"One-sided NMF ({k} factors as RGB) of {layer} input weights ({kind})")
    r.save_figure(fig, "fig01_nmf")
    summary = {
        "layer": layer, "weights_from": src, "kind": kind, "neurons": neurons, "components": k,
        "explained": f.explained, "mean_explained": float(f.explained.mean()), "claim": claim.as_dict(),
    }
    r.save_numbers("fig01_nmf", {"neurons": neurons, "spatial": f.spatial, "loadings": f.loadings, "explained": f.explained, "rgb": rgb,
                                 "layer_explained": everyone}, summary)
    return r.result(summary)
