"""Article figure 1: one-sided NMF pictures of a selection of neurons' input weights.

Each neuron's input weights ``[in, kh, kw]`` are split by sign (posneg) and factored into 3
non-negative spatial maps drawn as R, G, B (:func:`circuits.nmf.neuron_factors`).

Config: ``layer`` (a conv layer, e.g. ``mixed4d_5x5``; its direct kernel
``<layer>_pre_relu_conv`` is used) or ``from_layer`` + ``layer`` (expanded weights when the
two are not adjacent); ``neurons`` (indices, or ``auto`` = the ``n_neurons`` with the
strongest weights); ``components`` (3); ``scale`` (pixel upsampling of the pictures).

Outputs (``fig01_nmf.*``): the figure; ``.npz`` with ``neurons``, ``spatial [n, k, kh, kw]``,
``loadings [n, k, in]``, ``explained [n]``, ``rgb [n, H, W, 3]``; ``.json`` with the neuron
list and the variance explained. Everything is computed from the weights alone (no feature
visualization). The pictures' *structure* is meaningful only with trained weights
(``weights: inception5h.pth`` for InceptionV1, the bundled checkpoint for fashion-inception);
on random init this is a smoke test of the plumbing.
"""

from __future__ import annotations

import torch

from _common import n_channels, resolve_neurons, start, strongest_outputs, weights_between
from circuits.figures import nmf_rgb_figure
from circuits.layers import get_layer
from circuits.nmf import factors_rgb, neuron_factors


def layer_weights(run, layer: str, from_layer=None) -> tuple[torch.Tensor, str, str]:
    """``([out, in, kh, kw], kind, from)``: ``<layer>_pre_relu_conv`` kernel, or weights from ``from_layer``."""
    if from_layer:
        w, kind = weights_between(run.model, from_layer, layer)
        return w, kind, from_layer
    conv = get_layer(run.model, f"{layer}_pre_relu_conv") if not isinstance(get_layer(run.model, layer), torch.nn.Conv2d) else get_layer(run.model, layer)
    if not isinstance(conv, torch.nn.Conv2d):
        raise ValueError(f"{layer!r} is not produced by a Conv2d; give from_layer to use expanded weights")
    return conv.weight.detach().float().cpu(), "direct", f"{layer}_pre_relu_conv input"


def run(config: dict) -> dict:
    r = start(config)
    layer = config.get("layer", "mixed4d_5x5")
    w, kind, src = layer_weights(r, layer, config.get("from_layer"))
    n_total = w.shape[0]
    neurons = resolve_neurons(config.get("neurons", "auto"), n_total, lambda: strongest_outputs(w, int(config.get("n_neurons", 8))))
    k = int(config.get("components", 3))
    f = neuron_factors(w, k, neurons, **r.nmf_settings())
    rgb = factors_rgb(f.spatial[:, :3], scale=int(config.get("scale", 8)))
    labels = [f"{layer}:{n}\n{100 * float(e):.0f}% expl." for n, e in zip(neurons, f.explained)]
    fig = nmf_rgb_figure(rgb, labels=labels)
    fig.figure.text(0.5, 0.0, f"One-sided NMF ({k} factors as RGB) of {layer} input weights ({kind})", ha="center", va="top", fontsize=9)  # caption below the pictures
    r.save_figure(fig, "fig01_nmf")
    summary = {
        "layer": layer, "weights_from": src, "kind": kind, "neurons": neurons, "components": k,
        "explained": f.explained, "mean_explained": float(f.explained.mean()),
    }
    r.save_numbers("fig01_nmf", {"neurons": neurons, "spatial": f.spatial, "loadings": f.loadings, "explained": f.explained, "rgb": rgb}, summary)
    return r.result(summary)
