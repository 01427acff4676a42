"""Article figure 7: NMF factors of the high-low frequency detectors' weights from ``conv2d2``.

The family's weights from ``from_layer`` (``[n, in, kh, kw]``; expanded through ``maxpool1``
for InceptionV1) are factored with input channels as features (signs split along the neuron
axis, :func:`circuits.nmf.family_factors`): ``components`` (2: a high- and a low-frequency
factor) non-negative directions in ``from_layer``. Each direction is feature-visualized and
each neuron's signed loading on each factor is drawn as a ``[kh, kw]`` map: a grid with the
factors as rows and the neurons as columns.

Config: ``family_layer`` (``mixed3a``), ``neurons`` (the article's high-low frequency
detectors 136, 108, 132, 88, 110, 180, 153, 186, 86, 117; ``auto`` = ``n_neurons`` neurons with
similar weights), ``from_layer`` (``conv2d2``), ``components`` (2).

Outputs: ``fig07_highlow_factors.*`` (figure), ``.npz`` (``directions [k, in]``,
``loadings [n, k, kh, kw]``, ``weights``, ``neurons``, ``dominant``), ``.json`` (explained
variance of the factorisation). The factors mean something only with trained weights
(``weights: inception5h.pth``); random init is a smoke test.
"""

from __future__ import annotations

from _common import feature_vis, n_channels, resolve_neurons, similar_family, start, weights_between
from circuits.featurevis import objectives
from circuits.figures import family_grid
from circuits.nmf import family_factors

HIGH_LOW = [136, 108, 132, 88, 110, 180, 153, 186, 86, 117]


def family(r, config: dict, src: str, layer: str) -> list[int]:
    """The family's neuron list (explicit, or ``auto``: similar weights from ``src``)."""
    spec = config.get("neurons", HIGH_LOW)
    if spec in (None, "auto"):
        W, _ = weights_between(r.model, src, layer)
        return similar_family(W, int(config.get("n_neurons", 8)), config.get("seed_neuron"))
    return resolve_neurons(spec, n_channels(r.model, layer), lambda: [], "neurons")


def factor_figure(r, layer: str, neurons: list[int], src: str, k: int, stem: str, neuron_images=None) -> dict:
    """Factor the family's weights from ``src``, render the factors, save figure + numbers."""
    W, kind = weights_between(r.model, src, layer, neurons)
    fam = family_factors(W, k, **r.nmf_settings())
    targets = [objectives.direction(src, fam.directions[i]) for i in range(k)]
    if neuron_images is None:
        targets += [f"{layer}:{n}" for n in neurons]
    imgs = feature_vis(r, targets)
    factor_imgs = imgs[:k]
    neuron_images = imgs[k:] if neuron_images is None else neuron_images
    fig = family_grid(fam.loadings, factor_imgs, neuron_images, in_labels=[f"factor {i}" for i in range(k)],
                      out_labels=[f"{layer}:{n}" for n in neurons],
                      title=f"{layer} family: {k} NMF factors of its {src} weights ({kind}; {100 * fam.explained:.0f}% explained)")
    r.save_figure(fig, stem)
    summary = {"family_layer": layer, "neurons": neurons, "from_layer": src, "kind": kind, "components": k,
               "explained": fam.explained, "dominant": fam.dominant, "kernel": list(W.shape[2:])}
    r.save_numbers(stem, {"directions": fam.directions, "loadings": fam.loadings, "weights": W, "neurons": neurons,
                          "dominant": fam.dominant}, summary)
    return {"summary": summary, "neuron_images": neuron_images}


def run(config: dict) -> dict:
    r = start(config)
    layer, src = config.get("family_layer", "mixed3a"), config.get("from_layer", "conv2d2")
    neurons = family(r, config, src, layer)
    out = factor_figure(r, layer, neurons, src, int(config.get("components", 2)), "fig07_highlow_factors")
    return r.result(out["summary"])
