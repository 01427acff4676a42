"""The data of a neuron page's connection sections, computed from a model.

For a neuron and each upstream layer that reaches it: the weights (direct kernel, or expanded
weights across bottlenecks and pools), the top-``k`` inputs by L2 with their weight maps, a
colour scale, and the NMF factors of the weights with how much of them they explain
(:class:`NeuronConnections`). :func:`layer_sections` computes them for many neurons of one
layer at once (one connection computation per upstream layer, one batched NMF per kernel
shape); :mod:`circuits.figures.pages` draws them, and the atlas stores them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..wiring import LayerGraph, adjacent_conv, concat_branches, layer_graph
from .palette import symmetric_limit
from .smallmultiples import factor_order, rank_inputs

__all__ = ["NeuronConnections", "connections_to", "layer_sections"]


@dataclass
class NeuronConnections:
    """One section of a neuron page: the neuron's connections from one upstream layer.

    ``channels`` are the upstream channels shown, in display order; ``slices`` their weight
    maps ``[n, kh, kw]``; ``norms`` their L2; ``factors`` the dominant NMF factor of each (or
    ``None``); ``limit`` the section's colour scale ``m``; ``explained`` the fraction of the
    weights the NMF factors explain (``None`` when not factored); ``rgb`` the NMF picture.
    """

    upstream: str
    kind: str
    n_inputs: int
    channels: list[int]
    slices: np.ndarray
    norms: np.ndarray
    limit: float
    factors: Optional[list[int]] = None
    explained: Optional[float] = None
    by_factor: bool = False
    rgb: Optional[np.ndarray] = None
    note: str = ""


def _factor(weights: np.ndarray, k: int) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """NMF of ``weights [n, in, kh, kw]`` → ``(spatial [n,k,kh,kw], loadings [n,k,in], explained [n], rgb [n,H,W,3])``,
    or ``None`` when the kernel has fewer positions than factors (nothing spatial to factor)."""
    kh, kw = weights.shape[-2:]
    if kh * kw < k:
        return None
    from .. import nmf

    f = nmf.neuron_factors(torch.as_tensor(weights, dtype=torch.float32), k)
    spatial = np.asarray(f.spatial.detach().cpu() if isinstance(f.spatial, torch.Tensor) else f.spatial)
    loadings = np.asarray(f.loadings.detach().cpu() if isinstance(f.loadings, torch.Tensor) else f.loadings)
    explained = np.asarray(f.explained.detach().cpu() if isinstance(f.explained, torch.Tensor) else f.explained)
    rgb = np.asarray(nmf.factors_rgb(f, scale=1))
    return spatial, loadings, explained.reshape(-1), rgb


def _crop_to_support(w: np.ndarray) -> np.ndarray:
    """Crop ``[n, in, kh, kw]`` to the bounding box where any weight is non-zero."""
    nz = np.abs(w).reshape(-1, *w.shape[-2:]).max(axis=0) > 0
    if not nz.any():
        return w
    ys, xs = np.where(nz.any(axis=1))[0], np.where(nz.any(axis=0))[0]
    return w[..., ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1]


def _as_numpy4(w: object) -> np.ndarray:
    a = w.detach().cpu().numpy() if isinstance(w, torch.Tensor) else np.asarray(w)
    if a.ndim == 2:
        a = a[:, :, None, None]
    return a.astype(np.float64)


def connections_to(
    model: nn.Module,
    upstream: str,
    layer: str,
    channels: Sequence[int],
    graph: Optional[LayerGraph] = None,
) -> dict[int, tuple[np.ndarray, str]]:
    """``{channel: (weights [in, kh, kw], kind)}`` from ``upstream`` for the channels it reaches.

    One call of :func:`circuits.expanded.connection_weights` for the layer (expanded weights
    across bottlenecks/pools, or the direct kernel); a channel whose weights are all zero is
    not reached (e.g. another branch's bottleneck) and left out. When ``layer`` concatenates
    branches, each branch's neurons get their own footprint (the bounding box of their
    non-zero weights: 1×1 for a 1×1 branch), and a branch that is a convolution of
    ``upstream`` itself gets its *direct* kernel (``kind="direct"``), e.g.
    ``mixed3b_3x3_bottleneck → mixed3b:60``.
    """
    from ..expanded import connection_weights

    channels = [int(c) for c in channels]
    graph = graph or layer_graph(model)
    conn = connection_weights(model, upstream, layer, channels=channels)
    W = _as_numpy4(conn.weights)
    scale = float(np.abs(W).max()) if W.size else 0.0
    if scale == 0.0:
        return {}
    live = [i for i, c in enumerate(channels) if np.abs(W[i]).max() > 1e-6 * scale]
    branches = concat_branches(model, layer, graph)
    if not branches:
        return {channels[i]: (W[i], str(conn.kind)) for i in live}
    result: dict[int, tuple[np.ndarray, str]] = {}
    for branch, first, n in branches:
        mine = [i for i in live if first <= channels[i] < first + n]
        if not mine:
            continue
        conv = adjacent_conv(model, upstream, branch, graph)
        if conv is not None:
            k = conv.weight.detach().cpu().numpy().astype(np.float64)
            for i in mine:
                result[channels[i]] = (k[channels[i] - first], "direct")
        else:
            sub = _crop_to_support(W[mine])
            for j, i in enumerate(mine):
                result[channels[i]] = (sub[j], str(conn.kind))
    return result


def layer_sections(
    model: nn.Module,
    layer: str,
    channels: Sequence[int],
    upstream: Sequence[str],
    *,
    top_k: int = 50,
    factor_threshold: float = 0.8,
    n_factors: int = 3,
) -> dict[int, list[NeuronConnections]]:
    """The weights/NMF sections of ``layer``'s neuron pages: ``{channel: [NeuronConnections, ...]}``.

    For each of ``channels`` and each layer of ``upstream`` that reaches it (see
    :func:`connections_to`), the top-``top_k`` inputs by L2 with their weight slices
    ``[k, kh, kw]``, the section's colour scale and ``n_factors`` NMF factors (one batched NMF
    per kernel shape); cells are ordered by factor when the factors explain at least
    ``factor_threshold`` of the weights, else by L2. This is what the pages compute per
    layer (:func:`circuits.figures.pages.compute_pages`); the atlas computes it in its tables
    tasks and passes the stored result to :func:`circuits.figures.pages.assemble_pages`.
    """
    channels = [int(c) for c in channels]
    out: dict[int, list[NeuronConnections]] = {c: [] for c in channels}
    graph = layer_graph(model)
    for up in upstream:
        found = connections_to(model, up, layer, channels, graph)
        # factor neurons that share a kernel shape together (one batched NMF per shape)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for c, (w, _) in found.items():
            by_shape.setdefault(w.shape, []).append(c)
        for shape, chs in by_shape.items():
            fac = _factor(np.stack([found[c][0] for c in chs]), n_factors)
            for j, c in enumerate(chs):
                w, kind = found[c]
                k = min(top_k, w.shape[0])
                order, norms = rank_inputs(w, k)
                sec = NeuronConnections(
                    upstream=up, kind=kind, n_inputs=w.shape[0], channels=[int(x) for x in order],
                    slices=w[order], norms=norms[order], limit=symmetric_limit(w[order]),
                )
                if fac is None:
                    sec.note = f"{w.shape[1]}×{w.shape[2]} kernel: no spatial structure to factor"
                else:
                    spatial, loadings, explained, rgb = fac
                    sec.explained = float(explained[j])
                    sec.rgb = rgb[j]
                    if sec.explained >= factor_threshold:
                        forder, fdom = factor_order(w, loadings[j], k, spatial[j])
                        sec.channels = [int(x) for x in forder]
                        sec.slices = w[forder]
                        sec.norms = norms[forder]
                        sec.factors = [int(x) for x in fdom]
                        sec.by_factor = True
                out[c].append(sec)
    return out
