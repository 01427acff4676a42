"""The story neurons: one shared choice of the neurons the figures show, made by measurement.

The article tells one story with a few neurons (curve detectors, high-low frequency
detectors, a black-and-white centre detector, a boundary detector). On another model those
indices mean nothing, so this script *searches* for the neurons each part of the story
needs, by the measurement the article implies, and writes them with the numbers that chose
them to a JSON file every figure config reads (``story: story_neurons_fashion.json``):

``family``      (figs 3–6) the ``size`` neurons of ``layer`` with the most similar weights from
                ``from_layer`` *up to rotation and reflection*: mean pairwise best
                orientation-aligned cosine (:func:`_measures.best_family`).
``highlow``     (figs 7–8) a family of ``layer`` whose weights from ``from_layer`` two NMF
                factors explain and whose two factors differ in frequency preference:
                score = explained variance × |difference in high-frequency share of the
                factors' linearised pixel kernels| (:func:`_measures.highlow_family`).
``boundary``    (figs 11–12) the neuron of ``layer`` whose weights from ``from_layer`` are most
                odd under a 180° rotation (excitation and inhibition from the same inputs at
                opposite sides, :func:`_measures.odd_fraction`), and the ``source_layer``
                neuron whose paths to it through ``mid_layer`` are strongest.
``bottleneck``  (figs 9, 10, 13) the neuron of ``layer``'s bottlenecked branches (``branches``)
                with the strongest expanded weights from ``from_layer``, relative to the
                layer's median neuron.

Candidates for the first three are the *structured* neurons (weights that are not one map
times one vector: no 1x1 or pool-branch neurons). Each choice is stored with its number and
its controls: **the same search** on ``controls.random_init`` random-init copies of the model
and (where it applies) on ``controls.shuffled`` shuffles of the trained weights.

Outputs: ``story_neurons.json`` in ``out``, and the same file at ``write`` (relative to the
config's folder) when given: the file the figure configs read.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from _common import options, start, weights_between
from _measures import (Claim, best_family, bottleneck_neuron, boundary_neuron, highlow_family, input_kernels,
                       path_contributions, shuffle_entries, shuffle_positions, structured)
from circuits._io import atomic_write_text, state_dict_hash

OPTIONS = options(
    family=("layer", "from_layer", "size"),
    highlow=("layer", "from_layer", "size", "components", "max_candidates"),
    boundary=("layer", "from_layer", "mid_layer", "source_layer"),
    bottleneck=("layer", "from_layer", "branches"),
    write="where to write the story file (relative to the config's folder)",
)

DEFAULTS = {
    "family": {"layer": "mixed3b", "from_layer": "mixed3a", "size": 6},
    "highlow": {"layer": "mixed3a", "from_layer": "conv2d2", "size": 8, "components": 2, "max_candidates": None},
    "boundary": {"layer": "mixed3b", "from_layer": "mixed3a", "mid_layer": "mixed3a", "source_layer": "conv2d2"},
    "bottleneck": {"layer": "mixed3b", "from_layer": "conv2d2", "branches": ["3x3", "5x5"]},
}


def _settings(config: dict, part: str) -> dict:
    s = dict(DEFAULTS[part])
    s.update(config.get(part) or {})
    return s


def _limit(mask: torch.Tensor, w: torch.Tensor, n) -> torch.Tensor:
    """Keep the ``n`` strongest candidates (all when ``n`` is None)."""
    if n is None or int(mask.sum()) <= int(n):
        return mask
    norms = torch.where(mask, w.flatten(1).norm(dim=1), torch.full((w.shape[0],), -1.0))
    keep = torch.zeros_like(mask)
    keep[norms.argsort(descending=True)[: int(n)]] = True
    return keep


# ----------------------------------------------------------------------------- the four searches


def search_family(model, s: dict) -> dict:
    w, _ = weights_between(model, s["from_layer"], s["layer"])
    fam = best_family(w, int(s["size"]))
    return {"layer": s["layer"], "from_layer": s["from_layer"], "neurons": fam.neurons,
            "target": f"{s['layer']}:{fam.neurons[0]}", "value": fam.score, "plain_cosine": fam.plain,
            "transforms": fam.transforms, "weights": w}


def search_highlow(model, s: dict, nmf: dict) -> dict:
    w, _ = weights_between(model, s["from_layer"], s["layer"])
    cand = _limit(structured(w), w, s.get("max_candidates"))
    k = input_kernels(model, s["from_layer"])
    hl = highlow_family(w, k, int(s["size"]), int(s["components"]), nmf, cand)
    return {"layer": s["layer"], "from_layer": s["from_layer"], "target": f"{s['layer']}:{hl['seed']}", **hl,
            "weights": w, "kernels": k}


def boundary_source(model, s: dict, layer: str, ch: int) -> tuple[int, np.ndarray]:
    """The ``source_layer`` channel whose paths through ``mid_layer`` to ``layer:ch`` are strongest
    (largest Σ_m ||P_m||), and that strength for every source channel."""
    g = path_contributions(model, s["source_layer"], s["mid_layer"], layer, ch)  # [mid, src, H, W]
    strength = g.flatten(2).norm(dim=2).sum(0).numpy()
    return int(strength.argmax()), strength


def search_boundary(model, s: dict, with_source: bool = True) -> dict:
    w, _ = weights_between(model, s["from_layer"], s["layer"])
    ch, of = boundary_neuron(w)
    out = {"target": f"{s['layer']}:{ch}", "layer": s["layer"], "from_layer": s["from_layer"], "value": of,
           "mid_layer": s["mid_layer"], "weights": w}
    if with_source:
        src, strength = boundary_source(model, s, s["layer"], ch)
        out.update(source=f"{s['source_layer']}:{src}", source_strength=float(strength[src]),
                   median_source_strength=float(np.median(strength)))
    return out


def bottleneck_candidates(model, layer: str, branches) -> torch.Tensor:
    """``[channels]`` bool: the channels of Inception block ``layer`` in the given branches."""
    from bottleneck_skipping import BRANCHES, branch_sizes

    sizes = branch_sizes(model, layer)
    mask = []
    for b in BRANCHES:
        mask += [b in branches] * sizes[b]
    return torch.tensor(mask)


def search_bottleneck(model, s: dict) -> dict:
    w, _ = weights_between(model, s["from_layer"], s["layer"])
    ch, ratio = bottleneck_neuron(w, bottleneck_candidates(model, s["layer"], s["branches"]))
    return {"target": f"{s['layer']}:{ch}", "layer": s["layer"], "from_layer": s["from_layer"], "branches": list(s["branches"]),
            "value": ratio}


# ----------------------------------------------------------------------------- run


def run(config: dict) -> dict:
    r = start(config, OPTIONS)
    nmf = r.nmf_settings()
    sf, sh, sb, sn = (_settings(config, p) for p in ("family", "highlow", "boundary", "bottleneck"))
    randoms = r.random_models()
    seeds = r.shuffle_seeds()
    from tqdm.auto import tqdm

    bar = tqdm(total=4 * (1 + len(randoms)), desc="story searches", disable=not config.get("progress", True))

    def step(x):
        bar.update(1)
        return x

    fam = step(search_family(r.model, sf))
    fam_r = [step(search_family(m, sf))["value"] for m in randoms]
    fam_s = [best_family(shuffle_entries(fam["weights"], sd), int(sf["size"])).score for sd in seeds]
    hl = step(search_highlow(r.model, sh, nmf))
    hl_r = [step(search_highlow(m, sh, nmf)) for m in randoms]
    hl_s = []
    for sd in seeds[:1]:  # one shuffle: the search factors every candidate family
        ws = shuffle_entries(hl["weights"], sd)
        hl_s.append(highlow_family(ws, hl["kernels"], int(sh["size"]), int(sh["components"]), nmf,
                                   _limit(structured(ws), ws, sh.get("max_candidates"))))
    bd = step(search_boundary(r.model, sb))
    bd_r = [step(search_boundary(m, sb, with_source=False))["value"] for m in randoms]
    bd_s = [boundary_neuron(shuffle_positions(bd["weights"], sd), structured(bd["weights"]))[1] for sd in seeds]
    bn = step(search_bottleneck(r.model, sn))
    bn_r = [step(search_bottleneck(m, sn))["value"] for m in randoms]
    bar.close()

    ctl = "the same search on each random-init draw"
    claims = {
        "family": Claim(f"mean pairwise orientation-aligned cosine of the {len(fam['neurons'])} most similar {sf['layer']} neurons",
                        fam["value"], fam_r, fam_s, control=ctl, shuffle="each neuron's weights permuted within its support"),
        "highlow_explained": Claim(f"variance of a {sh['layer']} family's {sh['from_layer']} weights explained by {sh['components']} NMF factors",
                                   hl["explained"], [x["explained"] for x in hl_r], [x["explained"] for x in hl_s], control=ctl,
                                   shuffle="each neuron's weights permuted within its support"),
        "highlow_contrast": Claim("difference in high-frequency share of the two factors' pixel kernels", hl["frequency_contrast"],
                                  [x["frequency_contrast"] for x in hl_r], [x["frequency_contrast"] for x in hl_s], control=ctl),
        "highlow_score": Claim("explained × frequency contrast (the search score)", hl["score"], [x["score"] for x in hl_r],
                               [x["score"] for x in hl_s], control=ctl),
        "boundary": Claim(f"odd (opposite-side) share of the weight energy of the most boundary-like {sb['layer']} neuron",
                          bd["value"], bd_r, bd_s, control=ctl, shuffle="position vectors permuted within the support"),
        "bottleneck": Claim(f"strongest bottlenecked {sn['layer']} neuron's expanded-weight norm from {sn['from_layer']} / layer median",
                            bn["value"], bn_r, control=ctl),
    }
    drop = ("weights", "kernels")
    story = {
        "about": "Story neurons of the bundled model, chosen by experiments/story_neurons.py; every figure config reads this file.",
        "model": {**r.model_info, "state_dict_hash": state_dict_hash(r.model)},
        "controls": r.control_settings(),
        "neurons": {
            "family": {k: v for k, v in fam.items() if k not in drop} | {"measure": "mean pairwise best orientation-aligned cosine",
                                                                          "claim": claims["family"].as_dict()},
            "highlow": {k: v for k, v in hl.items() if k not in drop} | {
                "measure": "explained variance × frequency contrast of 2 NMF factors",
                "claims": {k: claims[f"highlow_{k}"].as_dict() for k in ("explained", "contrast", "score")}},
            "boundary": {k: v for k, v in bd.items() if k not in drop} | {"measure": "odd share of weight energy under 180° rotation",
                                                                            "claim": claims["boundary"].as_dict()},
            "bottleneck": bn | {"measure": "expanded-weight norm / layer median", "claim": claims["bottleneck"].as_dict()},
        },
    }
    from _common import _jsonable

    text = json.dumps(_jsonable(story), indent=2) + "\n"
    path = r.out / "story_neurons.json"
    atomic_write_text(path, text)
    r.files.append(str(path))
    if config.get("write"):
        dest = Path(config["write"])
        if not dest.is_absolute() and config.get("_config_dir"):
            dest = Path(config["_config_dir"]) / dest
        atomic_write_text(dest, text)
        r.files.append(str(dest))
    summary = {name: c.as_dict() for name, c in claims.items()}
    summary["chosen"] = {k: v.get("target") for k, v in story["neurons"].items()}
    for c in claims.values():
        print(c.caption())
    return r.result(summary, story=story)
