"""Article figure 8: NMF factors of the family's weights one and two layers further back.

The same family as figure 7 (high-low frequency detectors in ``mixed3a``) is factored
against each layer in ``upstream`` (InceptionV1: ``maxpool1``, one step back, and
``conv2d1``, two conv layers back; expanded weights), and each factor's direction is
feature-visualized there. One figure per upstream layer.

Config: ``family_layer``, ``neurons`` (as figure 7), ``upstream`` (list of layers),
``components`` (2).

Outputs: ``fig08_<layer>.*`` per upstream layer (figure, ``.npz`` with ``directions``,
``loadings``, ``weights``; ``.json`` with the explained variance). Meaningful with
``weights: inception5h.pth``; random init is a smoke test. The fashion-inception model has
no ``maxpool1`` (its ``conv2d2`` feeds ``mixed3a`` directly): its config uses ``conv2d2``
(one back) and ``conv2d1`` (two back).
"""

from __future__ import annotations

from _common import start
from fig07_highlow_factors import factor_figure, family


def run(config: dict) -> dict:
    r = start(config)
    layer = config.get("family_layer", "mixed3a")
    upstream = list(config.get("upstream", ["maxpool1", "conv2d1"]))
    if not upstream:
        raise ValueError("upstream must list at least one layer")
    neurons = family(r, config, upstream[0], layer)
    k = int(config.get("components", 2))
    per_layer, images = {}, None
    for src in upstream:
        out = factor_figure(r, layer, neurons, src, k, f"fig08_{src}", neuron_images=images)
        images = out["neuron_images"]
        per_layer[src] = out["summary"]
    summary = {"family_layer": layer, "neurons": neurons, "upstream": upstream, "per_layer": per_layer}
    return r.result(summary)
