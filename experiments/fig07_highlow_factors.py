"""Article figure 7: NMF factors of the high-low frequency detectors' weights from ``conv2d2``.

The family's weights from ``from_layer`` (``[n, in, kh, kw]``; expanded through ``maxpool1``
for InceptionV1) are factored with input channels as features (signs split along the neuron
axis, :func:`circuits.nmf.family_factors`): ``components`` (2: a high- and a low-frequency
factor) non-negative directions in ``from_layer``. Each direction is feature-visualized and
each neuron's signed loading on each factor is drawn as a ``[kh, kw]`` map: a grid with the
factors as rows and the neurons as columns.

Claims: (1) the two factors explain the family's weights — variance explained, against the
family **the same search** (``story_neurons.py``) finds in random-init models (for an explicit
neuron list: the same neurons of random-init models) and against the family's weights shuffled
within each neuron's support; (2) they are a *high-low* pair — the difference between the two
factors' high-frequency shares (linearised pixel kernels, :func:`_measures.input_kernels`),
against the same controls. A claim that does not beat its controls is printed as such.

Config: ``family_layer`` (``mixed3a``), ``neurons`` (the article's high-low frequency
detectors 136, 108, 132, 88, 110, 180, 153, 186, 86, 117; ``story:highlow`` for the story
file's family), ``from_layer`` (``conv2d2``), ``components`` (2).

Outputs: ``fig07_highlow_factors.*`` (figure), ``.npz`` (``directions [k, in]``,
``loadings [n, k, kh, kw]``, ``weights``, ``neurons``, ``dominant``, ``hf [k]``), ``.json``
(explained variance, claims).
"""

from __future__ import annotations

import numpy as np

from _common import add_caption, feature_vis, n_channels, options, resolve_neurons, start, story_entry, support_box, weights_between
from _measures import Claim, family_stats, high_frequency_share, input_kernels, shuffle_entries
from circuits.featurevis import objectives
from circuits.figures import family_grid

OPTIONS = options(family_layer="the family's layer", neurons="indices or story:NAME", from_layer="upstream layer",
                  components="NMF factors")
HIGH_LOW = [136, 108, 132, 88, 110, 180, 153, 186, 86, 117]


def family(r, config: dict, layer: str) -> list[int]:
    """The family's neuron list (explicit, or ``story:NAME``)."""
    return resolve_neurons(config.get("neurons", HIGH_LOW), n_channels(r.model, layer), what="neurons", config=config)


def frequency_contrast(model, src: str, directions) -> tuple[float, list[float]]:
    """|difference| of the first two directions' high-frequency shares, and the shares."""
    from circuits.models import input_shape

    K = input_kernels(model, src, size=min(input_shape(model)[1], 64)).double()
    d = np.asarray(directions, dtype=np.float64)
    hf = [high_frequency_share(np.tensordot(d[i], K.numpy(), 1)) for i in range(len(d))]
    return (abs(hf[0] - hf[1]) if len(hf) > 1 else 0.0), hf


def measure(model, src: str, layer: str, neurons, k: int, nmf: dict, weights=None) -> dict:
    W = weights if weights is not None else weights_between(model, src, layer, neurons)[0]
    st = family_stats(W, range(len(neurons)), k, nmf)
    contrast, hf = frequency_contrast(model, src, st["factors"].directions)
    return {**st, "contrast": contrast, "hf": hf, "weights": W}


def claims_for(r, config: dict, src: str, layer: str, neurons, k: int, m: dict) -> tuple[Claim, Claim]:
    nmf = r.nmf_settings()
    spec = config.get("neurons", HIGH_LOW)
    shuf = [measure(r.model, src, layer, neurons, k, nmf, shuffle_entries(m["weights"], s)) for s in r.shuffle_seeds()]
    if isinstance(spec, str) and spec.startswith("story:"):
        stored = story_entry(spec, config)["claims"]
        rand_expl, rand_contrast = stored["explained"]["random_init"], stored["contrast"]["random_init"]
        control = "the family the same search (story_neurons.py) finds in random-init models"
    else:
        rand = [measure(mm, src, layer, neurons, k, nmf) for mm in r.random_models()]
        rand_expl, rand_contrast = [x["explained"] for x in rand], [x["contrast"] for x in rand]
        control = "the same neurons of random-init models"
    shuffle = "each neuron's weights permuted within its support"
    return (Claim(f"variance of the {len(neurons)} {layer} neurons' {src} weights explained by {k} NMF factors", m["explained"],
                  rand_expl, [x["explained"] for x in shuf], control=control, shuffle=shuffle),
            Claim("high-low contrast: difference in high-frequency share of the two factors' pixel kernels", m["contrast"],
                  rand_contrast, [x["contrast"] for x in shuf], control=control, shuffle=shuffle))


def run(config: dict) -> dict:
    r = start(config, OPTIONS)
    layer, src = config.get("family_layer", "mixed3a"), config.get("from_layer", "conv2d2")
    neurons = family(r, config, layer)
    k = int(config.get("components", 2))
    m = measure(r.model, src, layer, neurons, k, r.nmf_settings())
    fam, W = m["factors"], m["weights"]
    explained, contrast = claims_for(r, config, src, layer, neurons, k, m)
    imgs = feature_vis(r, [objectives.direction(src, fam.directions[i]) for i in range(k)] + [f"{layer}:{n}" for n in neurons])
    y0, y1, x0, x1 = support_box(W)  # the family's kernel, without the window's zero padding
    fig = family_grid(fam.loadings[:, :, y0:y1, x0:x1], imgs[:k], imgs[k:], in_labels=[f"factor {i}\nhf {m['hf'][i]:.2f}" for i in range(k)],
                      out_labels=[f"{layer}:{n}" for n in neurons],
                      title=f"{layer} family: {k} NMF factors of its {src} weights (rows), loadings per neuron (columns)")
    add_caption(fig, [explained.caption(), contrast.caption(),
                      f"Opposition of the two factors' spatial loadings (1 = one excites where the other inhibits): {m['opposition']:.2f}."])
    r.save_figure(fig, "fig07_highlow_factors")
    summary = {"family_layer": layer, "neurons": neurons, "from_layer": src, "components": k,
               "explained": fam.explained, "dominant": fam.dominant, "kernel": list(W.shape[2:]), "hf": m["hf"],
               "opposition": m["opposition"], "claim": explained.as_dict(), "claim_highlow": contrast.as_dict()}
    r.save_numbers("fig07_highlow_factors", {"directions": fam.directions, "loadings": fam.loadings, "weights": W, "neurons": neurons,
                                             "dominant": fam.dominant, "hf": m["hf"]}, summary)
    return r.result(summary)
