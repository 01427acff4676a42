"""Figures of one neuron's connections, computed from a model in one call.

Where :mod:`circuits.figures.smallmultiples` draws arrays, these functions fetch the arrays
from a model (direct or expanded weights from :mod:`circuits.figures.sections`, NMF factors,
feature visualizations) and draw them::

    fig = neuron_figure(model, "small-multiples", "mixed3b:60", upstream="mixed3a", top=12)
    fig.save("fig.png")
    for shape, fig, explained in nmf_figures(model, "mixed3b", upstream="mixed3a"):
        fig.save(f"nmf_{shape}.png")

Kinds (:data:`FIGURE_KINDS`): ``small-multiples`` (top inputs: feature visualization above
the weight slice), ``factors`` (the same, grouped by NMF factor), ``family`` (a grid between
input and output neurons), ``spatial`` (the direction at each kernel position, visualized),
``nmf`` (the NMF picture with its factors visualized), ``heatmap`` (weight slices only).

:func:`neuron_card` gathers one neuron at a glance (:class:`NeuronCard`: its variable name,
its strongest inputs with their weights and variable names, its top data set examples),
which a notebook shows as a small HTML card.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..layers import check_channel, get_layer, parse_neuron
from ..wiring import channel_counts, default_upstream
from . import smallmultiples as sm
from .sections import connections_to

__all__ = ["FIGURE_KINDS", "neuron_figure", "nmf_figures", "NeuronCard", "neuron_card"]

FIGURE_KINDS = ("small-multiples", "factors", "family", "spatial", "nmf", "heatmap")


def _neuron(model: nn.Module, target: str) -> tuple[str, int]:
    layer, channel = parse_neuron(target, "a weight figure shows the neuron's weights, the same at every position")
    get_layer(model, layer)
    counts = channel_counts(model)
    if layer not in counts:
        raise ValueError(f"layer {layer!r} has no channels to pick from")
    check_channel(layer, channel, counts[layer])
    return layer, channel


def _neuron_and_upstream(model: nn.Module, target: str, upstream: Optional[str], top: int) -> tuple[str, int, str]:
    """``(layer, channel, upstream layer)`` checked, with ``top`` (inputs shown) checked too."""
    if not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be a positive integer, got {top!r}")
    layer, ch = _neuron(model, target)
    up = upstream or default_upstream(model, layer)[0]
    get_layer(model, up)
    return layer, ch, up


def _weights_from(model: nn.Module, up: str, layer: str, ch: int) -> tuple[np.ndarray, str]:
    """``layer:ch``'s weights ``[in, kh, kw]`` from ``up`` and their kind (direct / expanded)."""
    found = connections_to(model, up, layer, [ch])
    if ch not in found:
        raise ValueError(f"{up} has no weights to {layer}:{ch} (it feeds another branch); choose another upstream layer")
    return found[ch]


def _images(model: nn.Module, layer: str, channels: Sequence[int], render: Mapping[str, Any], cache: Any) -> dict[int, np.ndarray]:
    from ..featurevis import variable_names

    names = variable_names(model, [f"{layer}:{c}" for c in channels], cache=cache, **dict(render))
    return {c: names[f"{layer}:{c}"] for c in channels}


def _direction_images(model: nn.Module, layer: str, vectors: np.ndarray, render: Mapping[str, Any], cache: Any) -> list[np.ndarray]:
    from ..featurevis import objectives, render as render_images

    objs = [objectives.direction(layer, torch.as_tensor(v, dtype=torch.float32)) for v in vectors]
    res = render_images(model, objs, cache=cache, **dict(render))
    return [res.images[i].numpy() for i in range(len(objs))]


def neuron_figure(
    model: nn.Module,
    kind: str,
    target: str,
    upstream: Optional[str] = None,
    *,
    top: int = 12,
    neurons: Optional[Sequence[int]] = None,
    inputs: Optional[Sequence[int]] = None,
    k: int = 3,
    render: Optional[Mapping[str, Any]] = None,
    cache: Any = True,
) -> sm.FigureResult:
    """One figure of ``target``'s connections from ``upstream``.

    Args:
        model: the model.
        kind: one of :data:`FIGURE_KINDS`.
        target: the neuron, ``"layer:channel"`` (a position is refused: the weights are the
            same at every position).
        upstream: the upstream layer (default: the first of :func:`circuits.wiring.default_upstream`).
        top: input neurons shown (the strongest by L2).
        neurons: ``family``: the output channels (``target``'s channel is added first).
        inputs: ``family``: the input channels (default: the ``top`` strongest over the family).
        k: NMF factors (``factors``, ``nmf``).
        render: feature-visualization settings (:func:`circuits.featurevis.render` keywords).
        cache: the feature-visualization cache.

    Raises ``ValueError`` (one line) when ``upstream`` does not reach the neuron, the kernel
    is too small to factor, or family members have differently sized kernels.
    """
    if kind not in FIGURE_KINDS:
        raise ValueError(f"figure kind must be one of {', '.join(FIGURE_KINDS)}; got {kind!r}")
    layer, ch, up = _neuron_and_upstream(model, target, upstream, top)
    render = dict(render or {})
    title = f"{up} → {layer}:{ch}"
    if kind == "family":
        outs = list(dict.fromkeys([ch] + [int(c) for c in (neurons or [])]))
        found = connections_to(model, up, layer, outs)
        missing = [c for c in outs if c not in found]
        if missing:
            raise ValueError(f"{up} has no weights to {layer}:{missing[0]} (another branch?); choose another upstream layer or neurons")
        if len({found[c][0].shape for c in outs}) > 1:
            raise ValueError(f"the neurons {outs} have differently sized kernels from {up} (different branches); pick one branch")
        W = np.stack([found[c][0] for c in outs])  # [n_out, in, kh, kw]
        ins = [int(i) for i in inputs] if inputs is not None else [int(i) for i in sm.rank_family_inputs(W, top)[0]]
        in_imgs = _images(model, up, ins, render, cache)
        out_imgs = _images(model, layer, outs, render, cache)
        return sm.family_grid(
            W, [in_imgs[i] for i in ins], [out_imgs[c] for c in outs], inputs=ins, outputs=list(range(len(outs))),
            in_labels=[f"{up}:{i}" for i in ins], out_labels=[f"{layer}:{c}" for c in outs], title=f"{up} → {layer}",
        )
    w, wkind = _weights_from(model, up, layer, ch)
    title += f" ({wkind})"
    labels = [f"{up}:{i}" for i in range(w.shape[0])]
    if kind == "heatmap":
        order = sm.rank_inputs(w, top)[0]
        return sm.weight_heatmap(w[order], titles=[labels[i] for i in order])
    if kind == "small-multiples":
        order = sm.rank_inputs(w, top)[0]
        imgs = _images(model, up, [int(i) for i in order], render, cache)
        return sm.small_multiples(w, [imgs.get(i) for i in range(w.shape[0])], top_n=top, labels=labels, title=title)
    if kind == "spatial":
        dirs, _ = sm.spatial_directions(w)
        return sm.spatial_position_grid(w, _direction_images(model, up, dirs, render, cache), title=title)
    from ..nmf import factors_rgb, neuron_factors

    if w.shape[1] * w.shape[2] < k:
        raise ValueError(f"the {w.shape[1]}×{w.shape[2]} kernel from {up} has fewer positions than {k} factors")
    f = neuron_factors(w[None], k)
    loadings = np.asarray(f.loadings[0].detach().cpu())
    spatial = np.asarray(f.spatial[0].detach().cpu())
    explained = float(f.explained[0])
    if kind == "factors":
        order, _ = sm.factor_order(w, loadings, top, spatial)
        imgs = _images(model, up, [int(i) for i in order], render, cache)
        return sm.factor_ordered_multiples(
            w, loadings, [imgs.get(i) for i in range(w.shape[0])], top_n=top, spatial_maps=spatial,
            labels=labels, title=f"{title}, NMF explains {explained:.0%}",
        )
    rgb = factors_rgb(f, scale=1)[0]
    fimgs = _direction_images(model, up, loadings[: min(3, k)], render, cache)
    return sm.nmf_rgb_figure(rgb, factor_images=fimgs if len(fimgs) == 3 else None, title=f"{title}: NMF explains {explained:.0%}")


def nmf_figures(
    model: nn.Module,
    layer: str,
    upstream: Optional[str] = None,
    channels: Optional[Sequence[int]] = None,
    k: int = 3,
) -> list[tuple[tuple[int, int], sm.FigureResult, dict[int, float]]]:
    """NMF pictures (``k`` spatial factors as RGB) of ``layer``'s neurons' weights from ``upstream``.

    Neurons are factored together per kernel shape (one batched NMF each); a 1×1 (or too
    small) kernel has no spatial structure and is left out. Returns ``[(kernel (kh, kw),
    figure, {channel: explained fraction})]``. ``channels`` default: the first 16 whose
    weights from ``upstream`` are spatial (so a block whose first channels are a 1×1 branch
    still gives a picture). Raises ``ValueError`` when nothing can be factored.
    """
    from ..nmf import factors_rgb, neuron_factors

    get_layer(model, layer)
    counts = channel_counts(model)
    if layer not in counts:
        raise ValueError(f"layer {layer!r} has no channels")
    up = upstream or default_upstream(model, layer)[0]
    get_layer(model, up)
    if channels is not None:
        from ..layers import check_channel

        for c in channels:
            check_channel(layer, int(c), counts[layer])
    candidates = [int(c) for c in channels] if channels is not None else list(range(counts[layer]))
    found = connections_to(model, up, layer, candidates)
    if not found:
        raise ValueError(f"{up} has no weights to any of the chosen channels of {layer}")
    factorable = [c for c in candidates if c in found and found[c][0].shape[1] * found[c][0].shape[2] >= k]
    if channels is None:
        factorable = factorable[:16]
    if not factorable:
        raise ValueError(f"nothing to factor: every chosen neuron of {layer} has a 1×1 (or too small) kernel from {up}")
    by_shape: dict[tuple[int, int], list[int]] = {}
    for c in factorable:
        by_shape.setdefault(tuple(found[c][0].shape[1:]), []).append(c)  # type: ignore[arg-type]
    out = []
    for shape, chs in by_shape.items():
        f = neuron_factors(np.stack([found[c][0] for c in chs]), k)
        pics = factors_rgb(f, scale=max(1, 24 // max(shape)))
        explained = {c: float(f.explained[j]) for j, c in enumerate(chs)}
        fig = sm.nmf_rgb_figure(np.stack([pics[j] for j in range(len(chs))]),
                                labels=[f"{layer}:{c} {explained[c]:.0%}" for c in chs],
                                title=f"NMF of {up} → {layer} weights")
        out.append((shape, fig, explained))
    return out


@dataclass(repr=False)
class NeuronCard:
    """One neuron at a glance (see :func:`neuron_card`).

    Attributes:
        target: the neuron, ``"layer:channel"``.
        image: its variable name (feature visualization), ``[H, W, 3]`` or ``[H, W]`` in ``[0, 1]``.
        upstream: the layer its inputs come from.
        kind: ``"direct"`` (a kernel) or ``"expanded"`` (expanded weights).
        inputs: the strongest upstream channels (L2 of the weight slice), strongest first.
        norms: ``[n]`` their L2 norms.
        weights: ``[n, kh, kw]`` their weight slices (one colour scale: :attr:`limit`).
        input_images: the inputs' variable names, in the order of :attr:`inputs`.
        n_inputs: upstream channels in all.
        examples: ``[k, C, H, W]`` the data set images that activate the neuron most, strongest
            first (``None`` without a data set).
        example_values: ``[k]`` the neuron's activation on them.
        example_indices: ``[k]`` their positions in the data set.
        dataset_name: how the data set is named.
        notes: lines shown under the card.

    In a notebook the card shows itself (``_repr_html_``): thumbnails inlined as PNG (variable
    names 96 px, weight maps 48 px), red excites / blue inhibits, non-finite weights or
    activations flagged in red, under 200 KB of HTML (:mod:`circuits._display`).
    """

    target: str
    image: Optional[np.ndarray]
    upstream: str
    kind: str
    inputs: list[int]
    norms: np.ndarray
    weights: np.ndarray
    input_images: list[Optional[np.ndarray]]
    n_inputs: int
    examples: Optional[np.ndarray] = None
    example_values: Optional[np.ndarray] = None
    example_indices: Optional[np.ndarray] = None
    dataset_name: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def limit(self) -> float:
        """The colour scale ``m`` of :attr:`weights` (largest finite ``|w|``)."""
        from .palette import symmetric_limit

        return symmetric_limit(self.weights)

    def __repr__(self) -> str:
        examples = 0 if self.examples is None else len(self.examples)
        return (f"NeuronCard({self.target!r}, top inputs from {self.upstream} ({self.kind}): {self.inputs}, "
                f"{examples} {self.dataset_name or 'data set'} examples)")

    def _repr_html_(self) -> str:
        from .. import _display as D

        budget = D.HtmlBudget()
        name = D.image_html(self.image, alt=self.target) if self.image is not None else "(no feature visualization)"
        budget.add("<h4>variable name</h4>" + D.tile([(name, self.target)]))
        limit = self.limit
        cells = []
        for i, c in enumerate(self.inputs):
            vis = self.input_images[i] if i < len(self.input_images) else None
            thumb = D.image_html(vis, size=48, alt=f"{self.upstream}:{c}") if vis is not None else ""
            cells.append((thumb + D.weights_html(self.weights[i], limit, alt=f"weights from {self.upstream}:{c}"),
                          f"{self.upstream}:{c}\nL2 {float(self.norms[i]):.3g}"))
        budget.add(f"<h4>top {len(self.inputs)} of {self.n_inputs} inputs from {D.value_html(self.upstream)} "
                   f"({D.value_html(self.kind)} weights; red excites, blue inhibits)</h4>" + D.tile(cells))
        flag = D.nan_flag(*D.count_nonfinite(self.weights), what="weights")
        if self.examples is not None and len(self.examples):
            values = self.example_values if self.example_values is not None else np.full(len(self.examples), math.nan)
            indices = self.example_indices if self.example_indices is not None else np.arange(len(self.examples))
            ex = [(D.image_html(img, size=64, alt=f"example {int(i)}"), f"#{int(i)}\n{float(v):.3g}")
                  for img, v, i in zip(self.examples, values, indices)]
            budget.add(f"<h4>top {len(ex)} {D.value_html(self.dataset_name or 'data set')} examples</h4>" + D.tile(ex))
            flag += D.nan_flag(*D.count_nonfinite(values), what="activations")
        return D.container("NeuronCard", self.target, budget, self.notes, flag)


def neuron_card(
    model: nn.Module,
    target: str,
    upstream: Optional[str] = None,
    *,
    top: int = 6,
    images: Optional[torch.Tensor] = None,
    dataset_name: str = "data set",
    n_examples: int = 6,
    render: Optional[Mapping[str, Any]] = None,
    cache: Any = True,
) -> NeuronCard:
    """Gather one neuron's card: variable name, strongest inputs from ``upstream``, data set examples.

    Args:
        model: the model.
        target: the neuron, ``"layer:channel"`` (no position).
        upstream: the upstream layer (default: the first of :func:`circuits.wiring.default_upstream`).
        top: inputs shown (the strongest by L2 of their weight slice).
        images: data set images ``[N, C, H, W]`` in ``[0, 1]`` for the examples (``None``: no examples).
        dataset_name: how the data set is named on the card.
        n_examples: data set examples shown.
        render: feature-visualization settings (:func:`circuits.featurevis.render` keywords, e.g. ``steps=64``).
        cache: the feature-visualization cache (``True``: default folder; ``None``: off).

    Returns:
        a :class:`NeuronCard`; in a notebook it shows itself as a small HTML card.

    Example::

        >>> card = neuron_card(model, "mixed3b:60", top=6, images=test_images, render={"steps": 64})  # doctest: +SKIP
        >>> card.inputs, card.weights.shape                                                           # doctest: +SKIP
        ([12, 3, ...], (6, 5, 5))
    """
    if not isinstance(n_examples, int) or n_examples < 1:
        raise ValueError(f"n_examples must be a positive integer, got {n_examples!r}")
    layer, ch, up = _neuron_and_upstream(model, target, upstream, top)
    w, wkind = _weights_from(model, up, layer, ch)
    w = np.asarray(w)
    order = [int(i) for i in sm.rank_inputs(w, top)[0]]
    norms = np.sqrt((w[order] ** 2).reshape(len(order), -1).sum(1))
    render = dict(render or {})
    render.setdefault("progress", False)
    from ..featurevis import variable_names

    names = variable_names(model, [f"{layer}:{ch}"] + [f"{up}:{i}" for i in order], cache=cache, **render)
    card = NeuronCard(f"{layer}:{ch}", names[f"{layer}:{ch}"], up, wkind, order, norms, w[order],
                      [names[f"{up}:{i}"] for i in order], int(w.shape[0]), dataset_name=dataset_name)
    if images is not None:
        from ..featurevis import dataset_examples

        data = torch.as_tensor(images)
        ex = dataset_examples(model, [card.target], data, k=n_examples, progress=False)[card.target]
        idx = ex.indices.cpu().numpy()
        card.examples = data[torch.as_tensor(idx)].detach().cpu().float().numpy()
        card.example_values = ex.values.cpu().numpy()
        card.example_indices = idx
    return card
