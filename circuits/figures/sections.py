"""The data of a neuron page's connection sections, computed from a model.

For a neuron and each upstream layer that reaches it: the weights (direct kernel, or expanded
weights across bottlenecks and pools), the top-``k`` inputs by L2 with their weight maps, a
colour scale, and the NMF factors of the weights with how much of them they explain
(:class:`NeuronConnections`). :func:`layer_connections` computes them for many neurons of one
layer at once (one connection computation per upstream layer, one batched NMF per kernel
shape) together with the L2 of *every* connection (:class:`LayerConnections`), from which a
page's outgoing connections are read; :func:`output_connections` gives the connections into
a dense layer (the logits). :mod:`circuits.figures.pages` draws them, and the atlas stores them.

What is factored: NMF finds spatial structure, so it is run only where the weights have more
distinct spatial positions than factors (:func:`distinct_positions`). A ``1×1`` kernel has one;
expanded weights through a ``2×2`` pool into a ``1×1`` conv are ``2×2`` but constant (one
distinct position): both are drawn as signed bars and not factored (3 factors would "explain"
them completely, which says nothing).
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..wiring import LayerGraph, adjacent_conv, channel_counts, concat_branches, layer_graph
from .palette import symmetric_limit
from .smallmultiples import rank_inputs

__all__ = [
    "NeuronConnections",
    "LayerConnections",
    "connections_to",
    "all_connections_to",
    "layer_connections",
    "layer_sections",
    "output_connections",
    "connection_strengths",
    "distinct_positions",
    "group_by_factor",
]


@dataclass
class NeuronConnections:
    """One section of a neuron page: the neuron's connections from one upstream layer.

    ``channels`` are the upstream channels shown, in display order; ``slices`` their weight
    maps ``[n, kh, kw]``; ``norms`` their L2; ``factors`` the dominant NMF factor of each (or
    ``None``); ``limit`` the section's colour scale ``m``; ``explained`` the fraction of the
    weights the NMF factors explain (``None`` when not factored); ``rgb`` the NMF picture;
    ``note`` why the section is not factored; ``warning`` a problem the page must show (e.g.
    the NMF returned non-finite values).
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
    warning: str = ""


@dataclass
class LayerConnections:
    """The connections into one layer from each of its upstream layers.

    Attributes:
        layer: the layer.
        sections: ``{channel: [NeuronConnections, ...]}`` for the channels asked for.
        norms: ``{upstream: [n_layer, n_upstream]}`` L2 of the weight slice of *every*
            connection (all channels of ``layer``; ``0`` where a channel is not reached).
        sums: ``{upstream: [n_layer, n_upstream]}`` the signed sum of each weight slice
            (positive: the input excites the neuron overall).
        kinds: ``{upstream: "direct" | "expanded" | "mixed"}``.
    """

    layer: str
    sections: dict[int, list[NeuronConnections]]
    norms: dict[str, np.ndarray] = field(default_factory=dict)
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)


def distinct_positions(weights: np.ndarray, rtol: float = 1e-5) -> int:
    """How many distinct spatial positions ``weights [..., in, kh, kw]`` has: positions whose
    weight vectors (over everything but the spatial axes) agree within ``rtol`` of the
    largest weight count once. ``1`` for a ``1×1`` kernel and for weights that a pool made
    constant over its window."""
    w = np.asarray(weights, dtype=np.float64)
    cols = w.reshape(-1, w.shape[-2] * w.shape[-1]).T  # [positions, everything else]
    scale = float(np.abs(cols).max()) if cols.size else 0.0
    if scale == 0.0:
        return 1
    keys = np.round(cols / (rtol * scale)).astype(np.int64)
    return int(np.unique(keys, axis=0).shape[0])


def group_by_factor(norms: np.ndarray, loadings: np.ndarray, spatial: np.ndarray, chosen: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Order ``chosen`` input channels by dominant NMF factor, then by L2 within a group.

    A channel's strength on factor ``f`` is ``|loadings[f, c]| * ||spatial[f]||``; its
    dominant factor is the strongest. Returns ``(order, dominant)``: factor 0's group first,
    each group by ``norms`` largest first (ties keep channel order), and the dominant factor
    of each channel in ``order``.
    """
    chosen = np.asarray(chosen)
    strength = np.abs(loadings[:, chosen]) * np.sqrt((spatial.reshape(spatial.shape[0], -1) ** 2).sum(1))[:, None]
    dominant = strength.argmax(axis=0)
    keys = np.lexsort((chosen, -norms[chosen], dominant))
    return chosen[keys], dominant[keys]


def _factor(weights: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """NMF of ``weights [n, in, kh, kw]`` → ``(spatial [n,k,kh,kw], loadings [n,k,in], explained [n], rgb [n,H,W,3])``."""
    from .. import nmf

    f = nmf.neuron_factors(torch.as_tensor(weights, dtype=torch.float32), k)

    def arr(t: object) -> np.ndarray:
        return np.asarray(t.detach().cpu() if isinstance(t, torch.Tensor) else t, dtype=np.float64)

    spatial, loadings, explained = arr(f.spatial), arr(f.loadings), arr(f.explained).reshape(-1)
    finite = np.isfinite(spatial).reshape(len(spatial), -1).all(1) & np.isfinite(loadings).reshape(len(loadings), -1).all(1) \
        & np.isfinite(explained)
    rgb = np.zeros((len(spatial), *spatial.shape[-2:], 3))
    if finite.any():
        rgb[finite] = np.asarray(nmf.factors_rgb(torch.as_tensor(spatial[finite]), scale=1))
    explained = np.where(finite, explained, np.nan)
    return spatial, loadings, explained, rgb


def _factor_or_flag(weights: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """:func:`_factor`, with each neuron's failure (an error or non-finite values) as a message
    instead of an exception: the batch is retried one neuron at a time when it fails."""
    try:
        spatial, loadings, explained, rgb = _factor(weights, k)
        errors = ["" for _ in range(len(weights))]
    except (ValueError, RuntimeError, FloatingPointError):
        n, cin, kh, kw = weights.shape
        spatial, loadings = np.zeros((n, k, kh, kw)), np.zeros((n, k, cin))
        explained, rgb, errors = np.full(n, np.nan), np.zeros((n, kh, kw, 3)), []
        for j in range(n):
            try:
                s, l, e, r = _factor(weights[j:j + 1], k)
                spatial[j], loadings[j], explained[j], rgb[j] = s[0], l[0], e[0], r[0]
                errors.append("")
            except (ValueError, RuntimeError, FloatingPointError) as err:
                errors.append(f"NMF failed: {err}")
    errors = [e or ("" if np.isfinite(x) else "NMF returned non-finite values") for e, x in zip(errors, explained)]
    return spatial, loadings, explained, rgb, errors


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

    Raises:
        ValueError: non-finite weights (named by the first neuron that has them).
    """
    from ..expanded import connection_weights

    channels = [int(c) for c in channels]
    graph = graph or layer_graph(model)
    conn = connection_weights(model, upstream, layer, channels=channels)
    W = _as_numpy4(conn.weights)
    bad = ~np.isfinite(W).reshape(len(W), -1).all(1) if W.size else np.zeros(0, bool)
    if bad.any():
        raise ValueError(f"non-finite weights from {upstream!r} to {layer}:{channels[int(np.argmax(bad))]} "
                         f"({int(bad.sum())} neuron(s)); check the model's parameters")
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


#: ``{model: {(stamp, upstream, layer): found}}``: :func:`all_connections_to`'s recent results,
#: held only as long as the model lives (weak keys), at most ``_MEMO_PER_MODEL`` per model.
_ALL_CONNECTIONS_MEMO: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_MEMO_PER_MODEL = 4


def _model_stamp(model: nn.Module) -> tuple:
    """Everything besides the layer names that connection weights depend on and that can change
    in place: the module tree (names, types, train/eval mode, hooks), every parameter and
    buffer (storage, in-place version counter, shape, dtype, device) and the input shape."""
    modules = tuple((n, type(m), m.training, len(m._forward_hooks), len(m._forward_pre_hooks))
                    for n, m in model.named_modules())
    tensors = tuple((t.data_ptr(), t._version, tuple(t.shape), t.dtype, str(t.device))
                    for t in itertools.chain(model.parameters(), model.buffers()))
    return modules, tensors, tuple(getattr(model, "input_shape", None) or ())


def all_connections_to(model: nn.Module, upstream: str, layer: str,
                       graph: Optional[LayerGraph] = None) -> dict[int, tuple[np.ndarray, str]]:
    """:func:`connections_to` for *every* channel of ``layer``, remembered for the model.

    The pages and the atlas ask for the same all-channel connections several times (a
    layer's sections, then its upstream neurons' outgoing connections; the atlas estimate
    builds its miniature pages twice), and through attention or a wide layer each costs one
    backward pass per channel. The result is kept while the model lives and is reused only
    while nothing it depends on has changed (:func:`_model_stamp`: an optimiser step, a
    ``load_state_dict``, a swapped module, a hook or ``.train()`` invalidates it). The weight
    arrays are read-only."""
    stamp = _model_stamp(model)
    memo = _ALL_CONNECTIONS_MEMO.setdefault(model, {})
    key = (stamp, upstream, layer)
    if key in memo:
        found = memo.pop(key)
        memo[key] = found  # most recently used last
        return dict(found)
    found = connections_to(model, upstream, layer, range(channel_counts(model)[layer]), graph)
    for w, _kind in found.values():
        w.flags.writeable = False
    for old in [k for k in memo if k[0] != stamp]:  # the model changed: those can never be asked for again
        del memo[old]
    memo[key] = found
    while len(memo) > _MEMO_PER_MODEL:
        del memo[next(iter(memo))]
    return dict(found)


def _sections_of(found: dict[int, tuple[np.ndarray, str]], channels: Sequence[int], up: str, *, top_k: int,
                 factor_threshold: float, n_factors: int) -> dict[int, NeuronConnections]:
    """The sections from ``up`` of ``channels`` (those ``found`` reaches)."""
    out: dict[int, NeuronConnections] = {}
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for c in channels:
        if c in found:
            by_shape.setdefault(found[c][0].shape, []).append(c)
    for shape, chs in by_shape.items():
        spatial_ok = [c for c in chs if distinct_positions(found[c][0]) > n_factors]
        fac = _factor_or_flag(np.stack([found[c][0] for c in spatial_ok]), n_factors) if spatial_ok else None
        row = {c: j for j, c in enumerate(spatial_ok)}
        for c in chs:
            w, kind = found[c]
            k = min(top_k, w.shape[0])
            order, norms = rank_inputs(w, k)
            sec = NeuronConnections(
                upstream=up, kind=kind, n_inputs=w.shape[0], channels=[int(x) for x in order],
                slices=w[order], norms=norms[order], limit=symmetric_limit(w[order]),
            )
            if c not in row:
                n_pos = distinct_positions(w)
                if w.shape[1] * w.shape[2] == 1:
                    sec.note = "1×1 kernel: no spatial structure to factor"
                else:
                    sec.note = (f"{w.shape[1]}×{w.shape[2]} weights with {n_pos} distinct position"
                                f"{'s' if n_pos != 1 else ''} (e.g. through a pool): no spatial structure to factor")
            else:
                spatial, loadings, explained, rgb, errors = fac  # type: ignore[misc]
                j = row[c]
                if errors[j]:
                    sec.warning = errors[j]
                else:
                    sec.explained = float(explained[j])
                    sec.rgb = rgb[j]
                    if sec.explained >= factor_threshold:
                        forder, fdom = group_by_factor(norms, loadings[j], spatial[j], order)
                        sec.channels = [int(x) for x in forder]
                        sec.slices = w[forder]
                        sec.norms = norms[forder]
                        sec.factors = [int(x) for x in fdom]
                        sec.by_factor = True
            out[c] = sec
    return out


def connection_strengths(found: dict[int, tuple[np.ndarray, str]], n_out: int, n_in: int
                         ) -> tuple[np.ndarray, np.ndarray]:
    """``(norms, sums)``, each ``[n_out, n_in]``: the L2 and the signed sum of every weight
    slice in ``found`` (:func:`connections_to`'s ``{channel: (weights [in, kh, kw], kind)}``);
    ``0`` for channels it does not reach."""
    norms, sums = np.zeros((n_out, n_in)), np.zeros((n_out, n_in))
    for c, (w, _kind) in found.items():
        flat = w.reshape(w.shape[0], -1)
        norms[c] = np.sqrt((flat ** 2).sum(1))
        sums[c] = flat.sum(1)
    return norms, sums


def layer_connections(
    model: nn.Module,
    layer: str,
    channels: Sequence[int],
    upstream: Sequence[str],
    *,
    top_k: int = 50,
    factor_threshold: float = 0.8,
    n_factors: int = 3,
) -> LayerConnections:
    """The sections of ``layer``'s neuron pages for ``channels`` and the L2 of every connection.

    For each layer of ``upstream``: one connection computation for *all* of ``layer``'s
    channels (:func:`connections_to`), whose L2 per ``(channel, input)`` goes into
    :attr:`LayerConnections.norms` (the outgoing connections of the upstream neurons), and
    for each of ``channels`` that it reaches the top-``top_k`` inputs by L2 with their
    weight slices ``[k, kh, kw]``, the section's colour scale and ``n_factors`` NMF factors
    (one batched NMF per kernel shape, only where the weights have more distinct positions
    than factors). Cells are grouped by dominant factor (by L2 within a group) when the
    factors explain at least ``factor_threshold`` of the weights, else ordered by L2.
    """
    channels = [int(c) for c in channels]
    graph = layer_graph(model)
    counts = channel_counts(model)
    n_out = counts[layer]
    result = LayerConnections(layer, {c: [] for c in channels})
    for up in upstream:
        found = all_connections_to(model, up, layer, graph)
        norms, sums = connection_strengths(found, n_out, counts[up])
        kinds = {kind for _w, kind in found.values()}
        result.norms[up], result.sums[up] = norms, sums
        result.kinds[up] = kinds.pop() if len(kinds) == 1 else "mixed"
        secs = _sections_of(found, channels, up, top_k=top_k, factor_threshold=factor_threshold, n_factors=n_factors)
        for c in channels:
            if c in secs:
                result.sections[c].append(secs[c])
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
    """The weights/NMF sections of ``layer``'s neuron pages: ``{channel: [NeuronConnections, ...]}``
    (:attr:`LayerConnections.sections` of :func:`layer_connections`). This is what the atlas
    computes in its tables tasks and passes to :meth:`circuits.figures.pages.PageData.build`."""
    return layer_connections(model, layer, channels, upstream, top_k=top_k, factor_threshold=factor_threshold,
                             n_factors=n_factors).sections


def output_connections(model: nn.Module, from_layer: str, to_layer: str) -> tuple[np.ndarray, np.ndarray]:
    """Connections into a dense layer (e.g. the logits): ``(norms, sums)``, each ``[n_to, n_from]``.

    ``∂ to_layer[o] / ∂ from_layer[i, y, x]`` of the linearised model
    (:func:`circuits.expanded.linearized`; it does not depend on the input), reduced over the
    positions ``(y, x)``: its L2 and its signed sum (the effect of a unit activation at every
    position; for a global average pool followed by a linear layer, the layer's weight).

    Raises:
        ValueError: ``to_layer`` has a spatial grid (use :func:`connections_to`), or the
            result is not finite.
    """
    from ..expanded import linearized
    from ..layers import example_input, replace_activation, run_until
    from ..layouts import get_layouts

    layouts = get_layouts(model, [from_layer, to_layer])
    lay_to, lay_from = layouts[to_layer], layouts[from_layer]
    if lay_to.n_positions != 1:
        raise ValueError(f"{to_layer!r} has a spatial grid ({lay_to}); its connections are kernels: use connections_to")
    n = lay_to.channels
    x = example_input(model, batch=n)
    free: dict[str, torch.Tensor] = {}

    def make_free(out: torch.Tensor) -> torch.Tensor:
        free["t"] = torch.zeros_like(out).requires_grad_(True)
        return free["t"]

    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), replace_activation(model, from_layer, make_free), linearized(model):
            out = lay_to.canonical(run_until(model, x, [to_layer])[to_layer])[:, :, 0, 0]
            picked = out[torch.arange(n), torch.arange(n)]
            (grad,) = torch.autograd.grad(picked.sum(), free["t"])
    finally:
        model.train(was_training)
    g = lay_from.canonical(grad.detach()).double().flatten(2).cpu().numpy()  # [n_to, n_from, positions]
    if not np.isfinite(g).all():
        raise ValueError(f"non-finite connections from {from_layer!r} to {to_layer!r}")
    return np.sqrt((g ** 2).sum(2)), g.sum(2)
