"""Article figures 11–12: a boundary detector, and how expanded weights wash out its inputs.

Figure 11: boundary detector ``mixed3b:345`` (on the bundled model: the story file's
``boundary`` neuron, the structured ``mixed3b`` neuron whose ``mixed3a`` weights are most odd
under a 180° rotation) with its strongest ``mid_layer`` inputs as small multiples, each
labelled with its odd share. Claim: the neuron's odd share (excitation on one side,
inhibition from the same inputs on the other) is higher than the most boundary-like neuron
**the same search** finds in random-init models (for an explicit target: the same neuron)
and than its own weights with the position vectors shuffled.

Figure 12: how one neuron two layers back (``source``, e.g. ``conv2d2:89``; on the bundled
model the story file's ``boundary.source``, the source with the strongest paths) reaches the
boundary detector. With the path linearised, the expanded weight ``E[target, source]`` is the
sum over **all** of the middle layer's channels of the contribution through each one:
``E = Σ_m P_m`` (112 paths for ``mixed3a`` of the bundled model). The top row shows the
``n_mid`` strongest individual paths by norm; the bottom row their total (the expanded
weights), one sign-shuffled total, and the per-example connection (gradient with the real
nonlinearities, :func:`circuits.expanded.per_example_connections`) on dataset images where the
neuron is **active** at the centre. Washout ``= 1 - ||Σ_m P_m|| / Σ_m ||P_m||`` (0: the paths
add up, 1: they cancel). Claim: the paths cancel more than paths of the same sizes with random
signs (the sign-shuffled baseline, ``sign_draws`` draws) and more than in random-init models
(the same search there); if not, the caption says that the washing out is generic.

``P_m`` is computed by gradients on the linearised model with the middle layer's activation
masked to channel ``m`` (:func:`_measures.path_contributions`), and the script checks that
``Σ_m P_m`` equals :func:`circuits.expanded.expanded_weights` before drawing anything.

Config: ``target``, ``source`` (``layer:index`` or ``story:boundary`` /
``story:boundary.source``), ``mid_layer`` (``mixed3a``), ``n_mid`` (6, paths drawn),
``examples`` (``dataset``: the neuron's top Fashion-MNIST test images among ``n_scan``;
``featurevis``: its feature visualization), ``n_examples`` (3), ``input_size`` (side of the
zero input used for the path gradients; default the model's), ``sign_draws`` (200).

Outputs: ``fig11_boundary.*``, ``fig12_washout.*`` (figures); ``fig12_washout.npz``
(``paths [n_mid_all, kh, kw]`` for every middle channel, ``mids``, ``order`` (by norm),
``total``, ``expanded``, ``per_example [n, kh, kw]``, ``sign_shuffled``, ``source_washouts``);
``.json`` (washout, baselines, per-example norms, claims).
"""

from __future__ import annotations

import numpy as np
import torch
from matplotlib.figure import Figure

from _common import add_caption, on_support, options, resolve_target, sparse_images, start, story_entry, weights_between
from _measures import (Claim, boundary_neuron, odd_fraction, path_contributions, shuffle_positions, sign_shuffled_washout,
                       washout)
from circuits.expanded import expanded_weights, per_example_connections
from circuits.featurevis import objectives
from circuits.figures import DIVERGING, FigureResult, symmetric_limit
from fig09_top5_inputs import target_and_inputs

OPTIONS = options(target="layer:index or story:NAME", source="layer:index or story:NAME.source", mid_layer="the middle layer",
                  n_mid="paths drawn", examples="dataset or featurevis", n_examples="per-example panels", n_scan="images scanned",
                  input_size="side of the input for path gradients", sign_draws="sign-shuffled draws")


def all_paths(model, src: str, mid: str, layer: str, ch: int, size=None) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """``(P [n_mid, C_src, kh, kw], E [C_src, kh, kw], (y0, x0))``: the contribution through every
    middle channel, cropped to the expanded weights' window, and the expanded weights.
    Raises if the paths do not sum to the expanded weights."""
    g = path_contributions(model, src, mid, layer, ch, size=size)  # [n_mid, C, H, W]
    E = expanded_weights(model, src, layer, [ch])[0].float().cpu()
    kh, kw = E.shape[1:]
    total = g.sum(0)
    best, where = None, (0, 0)
    for y0 in range(total.shape[1] - kh + 1):
        for x0 in range(total.shape[2] - kw + 1):
            err = float((total[:, y0:y0 + kh, x0:x0 + kw] - E).abs().max())
            if best is None or err < best:
                best, where = err, (y0, x0)
    outside = float(total.abs().sum() - total[:, where[0]:where[0] + kh, where[1]:where[1] + kw].abs().sum())
    scale = float(E.abs().max())
    if best is None or best > 1e-4 * max(scale, 1e-12) or outside > 1e-4 * max(float(total.abs().sum()), 1e-12):
        raise RuntimeError(f"the paths through {mid} do not sum to the expanded weights {src} → {layer}:{ch} (max error {best}, "
                           f"mass outside the window {outside})")
    y0, x0 = where
    return g[:, :, y0:y0 + kh, x0:x0 + kw].numpy(), E.numpy(), where


def source_strength(P: np.ndarray) -> np.ndarray:
    """``[C_src]``: Σ_m ||P_m|| for each source channel."""
    return np.sqrt((P ** 2).sum(axis=(2, 3))).sum(0)


def control_washout(model, src: str, mid: str, layer: str, ch, src_ch, size) -> float:
    """Washout on another model: given neuron/source, or (``None``) the same search."""
    if ch is None:
        ch, _ = boundary_neuron(weights_between(model, mid, layer)[0])
    P, _, _ = all_paths(model, src, mid, layer, ch, size)
    s = int(source_strength(P).argmax()) if src_ch is None else src_ch
    return washout(P[:, s])


def active_examples(r, config: dict, layer: str, ch: int, target_img: np.ndarray) -> tuple[torch.Tensor, list[int], np.ndarray]:
    """Images on which ``layer:ch`` is active (> 0) at the centre, strongest first:
    ``(images [n, C, H, W], dataset indices (-1 for the feature visualization), activations)``."""
    from circuits.featurevis import objective_values

    n = int(config.get("n_examples", 3))
    obj = objectives.neuron(layer, ch)
    if config.get("examples", "dataset") == "dataset":
        from circuits.datasets import load_fashion_mnist

        images, _ = load_fashion_mnist("test")
        images = images[: int(config.get("n_scan", 2000))]
        values = objective_values(r.model, [obj], images)[0]
        order = values.argsort(descending=True)[:n]
        order = order[values[order] > 0]
        return images[order], order.tolist(), values[order].numpy()
    img = torch.as_tensor(target_img, dtype=torch.float32)
    img = (img[None] if img.ndim == 2 else img.permute(2, 0, 1))[None]
    v = objective_values(r.model, [obj], img)[0]
    keep = v > 0
    return img[keep], [-1] * int(keep.sum()), v[keep].numpy()


def washout_figure(paths, labels, total, shuffled_total, per_example, example_labels, title) -> FigureResult:
    n_top, n_bot = len(paths), 2 + len(per_example)
    ncols = max(n_top, n_bot)
    m = symmetric_limit(np.concatenate([paths, total[None], shuffled_total[None]]))
    fig = Figure(figsize=(ncols * 1.35 + 1.0, 3.9))
    gs = fig.add_gridspec(2, ncols + 1, width_ratios=[1.0] * ncols + [0.08], hspace=0.55, wspace=0.15,
                          top=1.0 - 0.6 / 3.9, bottom=0.03, left=0.02, right=0.95)
    h = None
    for i, (p, lab) in enumerate(zip(paths, labels)):
        ax = fig.add_subplot(gs[0, i])
        h = ax.imshow(p, cmap=DIVERGING, vmin=-m, vmax=m, interpolation="nearest")
        ax.set_xticks([]); ax.set_yticks([])
        ax.set_title(lab, fontsize=6, pad=2)
    bottom = [(total, "expanded = Σ all paths", m), (shuffled_total, "Σ paths, random signs", m)]
    bottom += [(pe, lab + "\n(own scale)", symmetric_limit(pe)) for pe, lab in zip(per_example, example_labels)]
    for j, (img, lab, lim) in enumerate(bottom):
        ax = fig.add_subplot(gs[1, j])
        ax.imshow(img, cmap=DIVERGING, vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set_xticks([]); ax.set_yticks([])
        ax.set_title(lab, fontsize=6, pad=2)
    if h is not None:
        cb = fig.colorbar(h, cax=fig.add_subplot(gs[0, ncols]))
        cb.ax.tick_params(labelsize=5)
    fig.suptitle(title, fontsize=8, y=1.0 - 0.08 / 3.9, va="top")
    return FigureResult(fig, {"paths": paths, "total": total, "vmin": -m, "vmax": m})


def run(config: dict) -> dict:
    r = start(config, OPTIONS)
    mid = config.get("mid_layer", "mixed3a")
    spec_t = config.get("target", "mixed3b:345")
    searched = isinstance(spec_t, str) and spec_t.startswith("story:")
    layer, ch = resolve_target(spec_t, r.model, config)
    n_mid = int(config.get("n_mid", 6))
    W, kind_mid = weights_between(r.model, mid, layer, [ch])
    w = W[0]
    # ---------------------------------------------------------------- figure 11
    odd_in = odd_fraction(w[:, None]).numpy()  # per input channel
    value = float(odd_fraction(W)[0])
    shuf = [float(odd_fraction(shuffle_positions(W, s))[0]) for s in r.shuffle_seeds()]
    if searched:
        rand = story_entry(spec_t, config)["claim"]["random_init"]
        control = "the most boundary-like neuron the same search (story_neurons.py) finds in random-init models"
    else:
        rand = [float(odd_fraction(weights_between(m, mid, layer, [ch])[0])[0]) for m in r.random_models()]
        control = "the same neuron of random-init models"
    claim11 = Claim(f"odd (opposite-side) share of {layer}:{ch}'s {mid} weight energy", value, rand, shuf, control=control,
                    shuffle="position vectors permuted within the support")
    mids_top = w.flatten(1).norm(dim=1).argsort(descending=True, stable=True)[:n_mid].tolist()
    images, (target_img,) = sparse_images(r, mid, mids_top, w.shape[0], extra=[f"{layer}:{ch}"])
    f11 = target_and_inputs(on_support(w.numpy()), mids_top, images, target_img, f"{layer}:{ch}",
                            [f"{mid}:{c}\nodd {odd_in[c]:.2f}" for c in mids_top],
                            f"{layer}:{ch}, a boundary-like neuron, and its strongest {mid} inputs ({kind_mid} weights)")
    add_caption(f11, [claim11.caption(), "Odd share: the part of a weight map that flips sign under a 180° rotation "
                      "(excitation on one side, inhibition on the other)."])
    r.save_figure(f11, "fig11_boundary")
    # ---------------------------------------------------------------- figure 12
    src_spec = config.get("source", "conv2d2:89")
    src_layer, src_ch = resolve_target(src_spec, r.model, config)
    size = config.get("input_size")
    Pall, E_all, _ = all_paths(r.model, src_layer, mid, layer, ch, size)
    P = Pall[:, src_ch]  # [n_mid_all, kh, kw]
    E = E_all[src_ch]
    total = P.sum(0)
    norms = np.sqrt((P ** 2).sum(axis=(1, 2)))
    order = np.argsort(-norms, kind="stable")
    wo = washout(P)
    draws = sign_shuffled_washout(P, int(config.get("sign_draws", 200)), int(r.control_settings()["seed"]))
    per_source = np.array([washout(Pall[:, c]) for c in range(Pall.shape[1])])
    per_source_shuffled = np.array([float(np.mean(sign_shuffled_washout(Pall[:, c], 20, c))) for c in range(Pall.shape[1])])
    if searched:
        rand12 = [control_washout(m, src_layer, mid, layer, None, None, size) for m in r.random_models()]
        control12 = "the same search (boundary neuron, strongest source) in random-init models"
    else:
        rand12 = [control_washout(m, src_layer, mid, layer, ch, src_ch, size) for m in r.random_models()]
        control12 = "the same neuron and source in random-init models"
    claim12 = Claim(f"washout of {src_layer}:{src_ch} → {layer}:{ch} over all {len(P)} {mid} paths", wo, rand12, list(draws),
                    control=control12, shuffle="random signs for the paths (sign-shuffled baseline)", shuffled_name="random signs")
    examples, ex_idx, ex_act = active_examples(r, config, layer, ch, target_img)
    if len(examples):
        pe = per_example_connections(r.model, examples, src_layer, f"{layer}:{ch}", preprocess=True)[:, src_ch].cpu().numpy()
    else:
        pe = np.zeros((0, *E.shape))
    pe_norms = np.sqrt((pe ** 2).sum(axis=(1, 2)))
    rng = np.random.default_rng(int(r.control_settings()["seed"]))
    shuffled_total = (P * rng.choice([-1.0, 1.0], size=len(P))[:, None, None]).sum(0)
    labels = [f"via {mid}:{m}\n‖P‖ {norms[m]:.2g}" for m in order[:n_mid]]
    ex_labels = [f"{'test #' + str(i) if i >= 0 else 'feature vis'}, act {a:.2f}" for i, a in zip(ex_idx, ex_act)]
    f12 = washout_figure(P[order[:n_mid]], labels, total, shuffled_total, pe, ex_labels,
                         f"{src_layer}:{src_ch} → {layer}:{ch}: the {n_mid} strongest of {len(P)} paths through {mid} (top); "
                         f"their sum over all {len(P)} (bottom)")
    add_caption(f12, [claim12.caption(),
                      f"Median washout over all {Pall.shape[1]} {src_layer} sources of {layer}:{ch}: {np.median(per_source):.2f} "
                      f"(sign-shuffled {np.median(per_source_shuffled):.2f}). Per-example gradients on images where the neuron is "
                      f"active: norm {np.median(pe_norms) if len(pe_norms) else float('nan'):.2g} vs expanded {np.sqrt((E ** 2).sum()):.2g}."])
    r.save_figure(f12, "fig12_washout")
    summary = {"target": f"{layer}:{ch}", "mid_layer": mid, "source": f"{src_layer}:{src_ch}", "n_paths": int(len(P)),
               "top_paths": order[:n_mid], "path_norms_top": norms[order[:n_mid]], "sum_of_path_norms": float(norms.sum()),
               "expanded_norm": float(np.sqrt((total ** 2).sum())), "expanded_weights_norm": float(np.sqrt((E ** 2).sum())),
               "washout": wo, "sign_shuffled_washout_mean": float(draws.mean()), "sign_shuffled_washout_p95": float(np.percentile(draws, 95)),
               "median_washout_all_sources": float(np.median(per_source)),
               "median_sign_shuffled_all_sources": float(np.median(per_source_shuffled)),
               "examples": config.get("examples", "dataset"), "example_indices": ex_idx, "example_activations": ex_act,
               "per_example_norms": pe_norms, "odd_share": value, "claim_fig11": claim11.as_dict(), "claim": claim12.as_dict()}
    r.save_numbers("fig12_washout", {"paths": P, "mids": np.arange(len(P)), "order": order, "total": total, "expanded": E,
                                     "per_example": pe, "sign_shuffled": draws, "source_washouts": per_source}, summary)
    return r.result(summary)
