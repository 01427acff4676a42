"""Article figure 8: the family's NMF factors decomposed into individual neurons.

The factors of figure 7 are non-negative directions in ``from_layer``. The article follows
them back to neurons: a factor is mostly a few ``from_layer`` neurons. For each factor (one
row) the figure shows the factor's variable name (feature visualization of the direction),
then the ``top_neurons`` ``from_layer`` neurons with the largest weight in it, each with its
own variable name and its weight in the (unit-norm) direction, and a bar chart of the whole
direction, sorted.

Claim: a factor is carried by few neurons — the share of a direction's squared mass on its
``top_neurons`` largest entries (mean over factors) is higher than for the factors of the
same neurons' weights in random-init models and of the family's weights shuffled within
each neuron's support.

Config: ``family_layer``, ``neurons`` (as figure 7: a list or ``story:highlow``),
``from_layer``, ``components`` (2), ``top_neurons`` (4).

Outputs: ``fig08_factor_neurons.*`` (figure), ``.npz`` (``directions [k, in]``,
``top [k, top_neurons]``), ``.json`` (each factor's neurons and weights, the claim).
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from _common import add_caption, feature_vis, options, start, weights_between
from _measures import Claim, factor_concentration, shuffle_entries
from circuits.featurevis import objectives
from circuits.figures import FigureResult
from circuits.nmf import family_factors
from fig07_highlow_factors import family

OPTIONS = options(family_layer="the family's layer", neurons="indices or story:NAME", from_layer="upstream layer",
                  components="NMF factors", top_neurons="neurons shown per factor")


def concentration(W, k: int, top: int, nmf: dict) -> float:
    d = family_factors(W, k, **nmf).directions.numpy()
    return float(np.mean([factor_concentration(x, top) for x in d]))


def factor_neurons_figure(directions: np.ndarray, top: np.ndarray, factor_imgs, neuron_imgs, src: str, title: str) -> FigureResult:
    k, n = top.shape
    fig = Figure(figsize=(1.25 * (n + 1) + 2.4, 1.65 * k + 0.5))
    gs = fig.add_gridspec(k, n + 3, width_ratios=[1.0, 0.25] + [1.0] * n + [2.0], wspace=0.15, hspace=0.55,
                          top=1.0 - 0.5 / fig.get_figheight(), bottom=0.05, left=0.02, right=0.98)
    for i in range(k):
        ax = fig.add_subplot(gs[i, 0])
        ax.imshow(factor_imgs[i], cmap="gray" if factor_imgs[i].ndim == 2 else None, vmin=0, vmax=1)
        ax.set_xticks([]); ax.set_yticks([])
        ax.set_title(f"factor {i}", fontsize=7, pad=2)
        eq = fig.add_subplot(gs[i, 1])
        eq.axis("off")
        eq.text(0.5, 0.5, "≈", fontsize=14, ha="center", va="center")
        for j in range(n):
            c = int(top[i, j])
            a = fig.add_subplot(gs[i, 2 + j])
            im = neuron_imgs[i * n + j]
            a.imshow(im, cmap="gray" if im.ndim == 2 else None, vmin=0, vmax=1)
            a.set_xticks([]); a.set_yticks([])
            a.set_title(f"{src}:{c}\nweight {directions[i, c]:.2f}", fontsize=6, pad=2)
        b = fig.add_subplot(gs[i, n + 2])
        d = np.sort(directions[i])[::-1]
        b.bar(np.arange(len(d)), d, color=["#c44e52" if x < n else "#999999" for x in range(len(d))], width=1.0)
        b.set_xticks([]); b.tick_params(labelsize=5)
        b.set_title(f"factor {i}: all {len(d)} {src} weights, sorted", fontsize=6, pad=2)
    fig.suptitle(title, fontsize=9, y=1.0 - 0.08 / fig.get_figheight(), va="top")
    return FigureResult(fig, {"top": top})


def run(config: dict) -> dict:
    r = start(config, OPTIONS)
    layer, src = config.get("family_layer", "mixed3a"), config.get("from_layer", "conv2d2")
    neurons = family(r, config, layer)
    k, n_top = int(config.get("components", 2)), int(config.get("top_neurons", 4))
    nmf = r.nmf_settings()
    W, kind = weights_between(r.model, src, layer, neurons)
    fam = family_factors(W, k, **nmf)
    d = fam.directions.numpy()
    top = np.argsort(-d, axis=1, kind="stable")[:, :n_top]
    claim = Claim(f"share of a factor's squared weight on its top {n_top} {src} neurons (mean over {k} factors)",
                  float(np.mean([factor_concentration(x, n_top) for x in d])),
                  [concentration(weights_between(m, src, layer, neurons)[0], k, n_top, nmf) for m in r.random_models()],
                  [concentration(shuffle_entries(W, s), k, n_top, nmf) for s in r.shuffle_seeds()],
                  control="the same neurons of random-init models", shuffle="each neuron's weights permuted within its support")
    imgs = feature_vis(r, [objectives.direction(src, fam.directions[i]) for i in range(k)] + [f"{src}:{int(c)}" for c in top.ravel()])
    fig = factor_neurons_figure(d, top, imgs[:k], imgs[k:], src,
                                f"The {layer} family's {k} factors (figure 7) decomposed into {src} neurons")
    add_caption(fig, [claim.caption()])
    r.save_figure(fig, "fig08_factor_neurons")
    summary = {"family_layer": layer, "neurons": neurons, "from_layer": src, "kind": kind, "components": k, "explained": fam.explained,
               "factors": [{"neurons": top[i].tolist(), "weights": d[i, top[i]].tolist()} for i in range(k)], "claim": claim.as_dict()}
    r.save_numbers("fig08_factor_neurons", {"directions": d, "top": top}, summary)
    return r.result(summary)
