"""Article figures 11–12: a boundary detector, and how expanded weights wash out its inputs.

Figure 11: boundary detector ``mixed3b:345`` (feature visualization) and its strongest
``mid_layer`` (``mixed3a``) inputs — high-low frequency detectors — as small multiples.

Figure 12: how one neuron two layers back (``conv2d2:89``) reaches the boundary detector.
With the path linearised, the expanded weight ``E[345, 89]`` is the **sum over the middle
layer's channels** of the contributions through each one: ``E = Σ_m P_m``. The top row shows
``P_m`` through each of the ``n_mid`` strongest ``mixed3a`` inputs (plus one panel for all other
channels together); the bottom row shows their sum (the expanded weights) beside the
per-example connection (gradient with the real nonlinearities,
:func:`circuits.expanded.per_example_connections`) at example inputs. Excitation through
one high-low detector and inhibition through another cancel, so the sum is much weaker than
its parts: ``washout = 1 - ||Σ_m P_m|| / Σ_m ||P_m||`` (0: no cancellation, 1: complete).

``P_m`` is computed by gradients on the linearised model with the middle layer's activation
masked to channel ``m`` (one batch element per path), so ``Σ_m P_m`` equals the expanded
weights exactly.

Config: ``target`` (``mixed3b:345``), ``mid_layer`` (``mixed3a``), ``source`` (``conv2d2:89``;
``conv2d2:auto`` = the source channel whose paths are strongest), ``n_mid`` (6),
``examples`` (``featurevis``: the target's feature visualization; ``dataset``: its top
Fashion-MNIST test images), ``n_examples`` (2), ``input_size`` (side of the zero input used
for the path gradients; default the model's).

Outputs: ``fig11_boundary.*``, ``fig12_washout.*`` (figures); ``fig12_washout.npz``
(``paths [n_mid + 1, kh, kw]``, ``total``, ``expanded`` (from expanded_weights),
``per_example [n_examples, kh, kw]``, ``mids``); ``.json`` (norms, washout). The washing out
is a property of trained weights (``weights: inception5h.pth``); random init is a smoke test
of the decomposition (which holds exactly for any weights).
"""

from __future__ import annotations

import numpy as np
import torch
from matplotlib.figure import Figure

from _common import feature_vis, resolve_target, sparse_images, start, weights_between
from circuits.expanded import expanded_weights, linearized, per_example_connections
from circuits.figures import DIVERGING, FigureResult, small_multiples, symmetric_limit
from circuits.layers import centre, replace_activation, run_until
from circuits.models import input_shape


def path_contributions(model, src: str, mid: str, dst: str, dst_ch: int, mids: list[int], size=None) -> torch.Tensor:
    """Contributions ``[len(mids) + 1, C_src, H, W]`` of ``src`` to ``dst[dst_ch]`` at the centre,
    through each middle channel in ``mids`` and (last row) through all the others, on the
    linearised model. Their sum over the first axis is the full linearised gradient."""
    c, h, w = input_shape(model)
    if size is not None:
        h = w = int(size)
    p = next(model.parameters())
    x = torch.zeros((1, c, h, w), dtype=p.dtype, device=p.device)
    n = len(mids) + 1
    store = {}

    def free(out: torch.Tensor) -> torch.Tensor:
        t = out.new_zeros((n, *out.shape[1:])).requires_grad_(True)
        store["free"] = t
        return t

    def mask(out: torch.Tensor) -> torch.Tensor:
        m = out.new_zeros((n, out.shape[1], 1, 1))
        for i, ch in enumerate(mids):
            m[i, ch] = 1.0
        m[-1] = 1.0
        m[-1, mids] = 0.0
        return out * m

    with torch.enable_grad(), linearized(model), replace_activation(model, src, free), replace_activation(model, mid, mask):
        out = run_until(model, x, [dst])[dst]
        sel = out[(slice(None), dst_ch, *centre(out.shape[2], out.shape[3]))].sum()
        (g,) = torch.autograd.grad(sel, store["free"])
    return g.detach()


def _crop_to(maps: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Crop ``[n, H, W]`` to a ``shape`` window centred on the support of the maps."""
    nz = np.abs(maps).sum(0) > 0
    if not nz.any():
        return maps[:, : shape[0], : shape[1]]
    ys, xs = np.flatnonzero(nz.any(1)), np.flatnonzero(nz.any(0))
    cy, cx = (ys[0] + ys[-1]) // 2, (xs[0] + xs[-1]) // 2
    y0, x0 = max(0, cy - shape[0] // 2), max(0, cx - shape[1] // 2)
    out = np.zeros((maps.shape[0], *shape), maps.dtype)
    part = maps[:, y0: y0 + shape[0], x0: x0 + shape[1]]
    out[:, : part.shape[1], : part.shape[2]] = part
    return out


def _examples(r, config: dict, layer: str, ch: int, target_img: np.ndarray) -> torch.Tensor:
    n = int(config.get("n_examples", 2))
    if config.get("examples", "featurevis") == "dataset":
        from circuits.datasets import load_fashion_mnist
        from circuits.featurevis import dataset_examples

        images, _ = load_fashion_mnist("test")
        images = images[: int(config.get("n_scan", 2000))]
        ex = dataset_examples(r.model, [f"{layer}:{ch}"], images, k=n, progress=False)[f"{layer}:{ch}"]
        return images[ex.indices]
    img = torch.as_tensor(target_img, dtype=torch.float32)
    img = img[None] if img.ndim == 2 else img.permute(2, 0, 1)
    return img[None]


def washout_figure(paths, labels, total, per_example, title) -> FigureResult:
    n_top, n_bot = len(paths), 1 + len(per_example)
    ncols = max(n_top, n_bot)
    m = symmetric_limit(np.concatenate([paths, total[None]]))
    fig = Figure(figsize=(ncols * 1.3 + 0.8, 3.4))
    axes = fig.subplots(2, ncols, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([]); ax.set_yticks([]); ax.axis("off")
    for i, (p, lab) in enumerate(zip(paths, labels)):
        axes[0, i].axis("on"); axes[0, i].imshow(p, cmap=DIVERGING, vmin=-m, vmax=m, interpolation="nearest")
        axes[0, i].set_title(lab, fontsize=6)
    axes[1, 0].axis("on")
    h = axes[1, 0].imshow(total, cmap=DIVERGING, vmin=-m, vmax=m, interpolation="nearest")
    axes[1, 0].set_title("expanded = Σ paths", fontsize=6)
    for j, pe in enumerate(per_example):
        mm = symmetric_limit(pe)
        axes[1, j + 1].axis("on"); axes[1, j + 1].imshow(pe, cmap=DIVERGING, vmin=-mm, vmax=mm, interpolation="nearest")
        axes[1, j + 1].set_title(f"per-example #{j}\n(own scale)", fontsize=6)
    fig.colorbar(h, ax=axes[0].tolist(), shrink=0.7)
    fig.suptitle(title, fontsize=8)
    return FigureResult(fig, {"paths": paths, "total": total, "vmin": -m, "vmax": m})


def run(config: dict) -> dict:
    r = start(config)
    mid = config.get("mid_layer", "mixed3a")
    layer, ch = resolve_target(config.get("target", "mixed3b:345"), r.model, mid)
    n_mid = int(config.get("n_mid", 6))
    W, kind_mid = weights_between(r.model, mid, layer, [ch])
    w = W[0]
    mids = w.flatten(1).norm(dim=1).argsort(descending=True, stable=True)[:n_mid].tolist()
    # figure 11: the boundary detector and its strongest mid-layer inputs
    images, (target_img,) = sparse_images(r, mid, mids, w.shape[0], extra=[f"{layer}:{ch}"])
    f11 = small_multiples(w, images, top_n=n_mid, labels=[f"{mid}:{c}" for c in range(w.shape[0])],
                          title=f"{layer}:{ch} and its strongest {mid} inputs ({kind_mid} weights)", cols=n_mid)
    r.save_figure(f11, "fig11_boundary")
    # figure 12: paths from the source through each mid channel
    src_spec = config.get("source", "conv2d2:89")
    src, _, src_idx = src_spec.partition(":")
    g = path_contributions(r.model, src, mid, layer, ch, mids, config.get("input_size"))  # [n_mid+1, C, H, W]
    if src_idx.strip() == "auto":
        strength = g.flatten(2).norm(dim=2).sum(0)  # Σ_m ||P_m|| per source channel
        src_ch = int(strength.argmax())
    else:
        src_ch = int(src_idx)
        if not 0 <= src_ch < g.shape[1]:
            raise ValueError(f"source channel {src_ch} out of range for {src} with {g.shape[1]} channels")
    E = expanded_weights(r.model, src, layer, [ch])[0, src_ch].float().cpu().numpy()
    P = _crop_to(g[:, src_ch].cpu().numpy(), E.shape)
    total = P.sum(0)
    part_norms = np.sqrt((P ** 2).sum(axis=(1, 2)))
    total_norm = float(np.sqrt((total ** 2).sum()))
    washout = 1.0 - total_norm / part_norms.sum() if part_norms.sum() > 0 else 0.0
    ex = _examples(r, config, layer, ch, target_img)
    pe = per_example_connections(r.model, ex, src, f"{layer}:{ch}", preprocess=True)[:, src_ch].cpu().numpy()
    labels = [f"via {mid}:{m}" for m in mids] + ["via all others"]
    f12 = washout_figure(P, labels, total, pe, f"{src}:{src_ch} → {layer}:{ch}: paths through {mid} (top) and their sum "
                         f"(bottom; washout {washout:.2f}) beside per-example gradients")
    r.save_figure(f12, "fig12_washout")
    summary = {"target": f"{layer}:{ch}", "mid_layer": mid, "mids": mids, "source": f"{src}:{src_ch}",
               "path_norms": part_norms, "sum_of_path_norms": float(part_norms.sum()), "expanded_norm": total_norm,
               "expanded_weights_norm": float(np.sqrt((E ** 2).sum())), "washout": float(washout),
               "per_example_norms": np.sqrt((pe ** 2).sum(axis=(1, 2))), "examples": config.get("examples", "featurevis")}
    r.save_numbers("fig12_washout", {"paths": P, "total": total, "expanded": E, "per_example": pe, "mids": mids}, summary)
    return r.result(summary)
