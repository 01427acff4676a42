"""Objectives: what a feature visualization maximises, one value per batch element.

An :class:`Objective` maps a dict of layer activations and their layouts to a tensor
``[B]``: its value for each batch element, ``obj(acts, layouts)``. The same object
therefore scores rendered images *and* data set images. ``layouts`` maps layer names to
:class:`circuits.layouts.Layout` (:func:`circuits.layouts.get_layouts`), so the channel is
always the feature axis and a position always one on the spatial or patch grid: on a ViT
block ``[B, 1 + h*w, d]`` channel ``n`` is feature ``n`` of the patch tokens (the class and
register tokens are left out), on a Swin stage ``[B, h, w, c]`` it is the last axis.
Without ``layouts`` an activation's layout is guessed from its shape
(:meth:`~circuits.layouts.Layout.guess`: 4-D is channels-first), which is right for CNNs
but not for channels-last layers.

* :func:`channel` — mean of one channel over all grid positions; for a dense layer, the
  feature itself.
* :func:`neuron` — one channel at one position (the centre, :func:`circuits.layers.centre`,
  by default).
* :func:`direction` — dot product of the activation vector over channels with ``vec``,
  at one position or averaged over positions.
* :func:`direction_cossim` — Lucid's ``direction_neuron_cossim``: ``dot * max(cos, 0.1) ** p``
  rewards both a large projection and alignment with ``vec`` (centre position by default).
* ``a + b``, ``a - b``, ``2 * a``, ``a / 3``, ``-a``, ``sum([...])`` combine objectives.

Target strings work everywhere: ``as_objective("mixed4a:476")`` is ``channel("mixed4a", 476)``
and ``"mixed4a:476@3,4"`` is ``neuron("mixed4a", 476, (3, 4))``.

Each objective knows the layers it reads (``.layers``), a stable text ``.key`` (used in cache
keys and seeds) and checks itself against the layer layouts (``.validate``) before any
optimisation starts, so a wrong channel or vector length fails fast with a clear message::

    layouts = get_layouts(model, objective.layers, input_shape=(3, 224, 224))
    objective.validate(layouts)
    values = objective(acts, layouts)        # [B]
"""

from __future__ import annotations

import hashlib
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch

from ..layers import Target, parse_target
from ..layouts import Layout

__all__ = [
    "Objective",
    "Channel",
    "Neuron",
    "Direction",
    "DirectionCossim",
    "channel",
    "neuron",
    "direction",
    "direction_cossim",
    "as_objective",
    "evaluate_batch",
]

Acts = Mapping[str, torch.Tensor]
Layouts = Optional[Mapping[str, Layout]]
Position = Union[tuple[int, int], str, None]


def _layout(acts: Acts, layouts: Layouts, layer: str) -> tuple[torch.Tensor, Layout]:
    """The activation of ``layer`` and its layout, fitted to the activation's shape."""
    t = acts[layer]
    shape = tuple(t.shape[1:])
    known = layouts.get(layer) if layouts is not None else None
    return t, (known.fit(shape) if known is not None else Layout.guess(shape))


class Objective:
    """Base class: ``obj(acts, layouts=None) -> [B]``; supports ``+``, ``-``, ``*``/``/`` by scalars."""

    layers: tuple[str, ...] = ()
    key: str = "objective"

    def __call__(self, acts: Acts, layouts: Layouts = None) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def validate(self, layouts: Mapping[str, Union[Layout, tuple[int, ...]]]) -> None:
        """Raise ``ValueError`` if this objective does not fit the layers. ``layouts`` maps each
        layer to its :class:`~circuits.layouts.Layout` (or, guessed from it, its activation
        shape without the batch)."""

    def __repr__(self) -> str:
        return f"<Objective {self.key}>"

    def __str__(self) -> str:
        return self.key

    # arithmetic -------------------------------------------------------------
    def __add__(self, other: object) -> "Objective":
        if isinstance(other, (int, float)) and other == 0:
            return self
        return Sum([self, as_objective(other)])  # type: ignore[arg-type]

    def __radd__(self, other: object) -> "Objective":
        if isinstance(other, (int, float)) and other == 0:  # sum([...]) starts from 0
            return self
        return Sum([as_objective(other), self])  # type: ignore[arg-type]

    def __neg__(self) -> "Objective":
        return Scaled(self, -1.0)

    def __sub__(self, other: object) -> "Objective":
        return self + (-as_objective(other))  # type: ignore[arg-type]

    def __rsub__(self, other: object) -> "Objective":
        return as_objective(other) + (-self)  # type: ignore[arg-type]

    def __mul__(self, factor: object) -> "Objective":
        if not isinstance(factor, (int, float)):
            raise TypeError(f"objectives can be multiplied by numbers only, got {type(factor).__name__}")
        return Scaled(self, float(factor))

    __rmul__ = __mul__

    def __truediv__(self, factor: object) -> "Objective":
        if not isinstance(factor, (int, float)) or factor == 0:
            raise TypeError(f"objectives can be divided by non-zero numbers only, got {factor!r}")
        return Scaled(self, 1.0 / float(factor))


def _layer_layout(layouts: Mapping[str, Union[Layout, tuple[int, ...]]], layer: str) -> Layout:
    if layer not in layouts:
        raise ValueError(f"layer {layer!r} was not computed (have: {sorted(layouts)})")
    known = layouts[layer]
    return known if isinstance(known, Layout) else Layout.guess(tuple(known))


def _check_position(layer: str, layout: Layout, position: Position) -> None:
    if position is None:
        return
    if position == "center":
        layout.centre()  # a token layer without a known grid has no centre
        return
    layout.check_position(layer, position)  # type: ignore[arg-type]


class Channel(Objective):
    """Mean activation of channel ``n`` of ``layer`` over all grid positions (patch tokens
    only on token layers; dense: feature ``n``)."""

    def __init__(self, layer: str, n: int):
        self.layer, self.n = layer, int(n)
        self.layers = (layer,)
        self.key = f"{layer}:{self.n}"

    def __call__(self, acts: Acts, layouts: Layouts = None) -> torch.Tensor:
        t, layout = _layout(acts, layouts, self.layer)
        return layout.positions(t)[:, self.n].mean(-1)

    def validate(self, layouts: Mapping[str, Union[Layout, tuple[int, ...]]]) -> None:
        _layer_layout(layouts, self.layer).check_channel(self.layer, self.n)


class Neuron(Objective):
    """Channel ``n`` of ``layer`` at one position ``(y, x)`` (the centre by default)."""

    def __init__(self, layer: str, n: int, position: Position = None):
        self.layer, self.n = layer, int(n)
        self.position: Position = "center" if position is None else (int(position[0]), int(position[1]))  # type: ignore[index]
        self.layers = (layer,)
        pos = "" if self.position == "center" else f"@{self.position[0]},{self.position[1]}"  # type: ignore[index]
        self.key = f"{layer}:{self.n}{pos}" if pos else f"neuron({layer}:{self.n})"

    def __call__(self, acts: Acts, layouts: Layouts = None) -> torch.Tensor:
        t, layout = _layout(acts, layouts, self.layer)
        return layout.at(t, self.position, self.layer)[:, self.n]  # type: ignore[arg-type]

    def validate(self, layouts: Mapping[str, Union[Layout, tuple[int, ...]]]) -> None:
        layout = _layer_layout(layouts, self.layer)
        layout.check_channel(self.layer, self.n)
        _check_position(self.layer, layout, self.position)


def _as_vector(vec: object) -> torch.Tensor:
    v = torch.as_tensor(np.asarray(vec.detach().cpu() if isinstance(vec, torch.Tensor) else vec), dtype=torch.float32)
    if v.ndim != 1 or v.numel() == 0:
        raise ValueError(f"a direction must be a 1-D vector over channels, got shape {tuple(v.shape)}")
    if not torch.isfinite(v).all():
        raise ValueError("a direction vector must be finite (it contains NaN or Inf)")
    return v


def _vec_digest(v: torch.Tensor) -> str:
    return hashlib.sha256(v.numpy().astype("<f4").tobytes()).hexdigest()[:12]


class _DirectionBase(Objective):
    def __init__(self, layer: str, vec: object, position: Position):
        self.layer = layer
        self.vec = _as_vector(vec)
        self.position = position if position in (None, "center") else (int(position[0]), int(position[1]))  # type: ignore[index]
        self.layers = (layer,)
        self._cache: dict[tuple, torch.Tensor] = {}

    def _pos_text(self) -> str:
        if self.position is None:
            return "mean"
        if self.position == "center":
            return "center"
        return f"{self.position[0]},{self.position[1]}"  # type: ignore[index]

    def _v(self, like: torch.Tensor) -> torch.Tensor:
        k = (like.device, like.dtype)
        if k not in self._cache:
            self._cache[k] = self.vec.to(device=like.device, dtype=like.dtype)
        return self._cache[k]

    def validate(self, layouts: Mapping[str, Union[Layout, tuple[int, ...]]]) -> None:
        layout = _layer_layout(layouts, self.layer)
        if self.vec.numel() != layout.channels:
            raise ValueError(
                f"direction vector has length {self.vec.numel()}, but layer {self.layer!r} has "
                f"{layout.channels} channels; the vector must have one entry per channel"
            )
        _check_position(self.layer, layout, self.position)

    def _vectors(self, acts: Acts, layouts: Layouts) -> torch.Tensor:
        """``[B, C, P]`` activation vectors at the chosen position(s)."""
        t, layout = _layout(acts, layouts, self.layer)
        if self.position is None:
            return layout.positions(t)
        return layout.at(t, self.position, self.layer)[:, :, None]  # type: ignore[arg-type]


class Direction(_DirectionBase):
    """``<acts[:, :, y, x], vec>`` at a position, or its mean over positions (``position=None``)."""

    def __init__(self, layer: str, vec: object, position: Position = None):
        super().__init__(layer, vec, position)
        self.key = f"direction({layer},{_vec_digest(self.vec)},{self._pos_text()})"

    def __call__(self, acts: Acts, layouts: Layouts = None) -> torch.Tensor:
        a = self._vectors(acts, layouts)
        return torch.einsum("bcp,c->bp", a, self._v(a)).mean(-1)


class DirectionCossim(_DirectionBase):
    """Lucid's ``direction_neuron_cossim``: ``dot * max(cossim, 0.1) ** cossim_pow`` where
    ``dot = <a, v> / C`` (Lucid's mean), ``cossim = <a, v> / (eps + |a| |v|)``; at the centre
    by default, or averaged over positions with ``position=None``. The floor 0.1 keeps the
    objective's sign that of ``dot`` (Lucid's notebooks do the same)."""

    def __init__(self, layer: str, vec: object, position: Position = "center", cossim_pow: float = 1.0, eps: float = 1e-4):
        super().__init__(layer, vec, position)
        self.cossim_pow, self.eps = float(cossim_pow), float(eps)
        self.key = f"direction_cossim({layer},{_vec_digest(self.vec)},{self._pos_text()},{self.cossim_pow:g})"

    def __call__(self, acts: Acts, layouts: Layouts = None) -> torch.Tensor:
        a = self._vectors(acts, layouts)
        v = self._v(a)
        raw = torch.einsum("bcp,c->bp", a, v)
        dot = raw / v.numel()
        cos = raw / (self.eps + a.norm(dim=1) * v.norm())
        return (dot * cos.clamp(min=0.1) ** self.cossim_pow).mean(-1)


class Sum(Objective):
    """Sum of objectives."""

    def __init__(self, terms: Sequence[Objective]):
        flat: list[Objective] = []
        for t in terms:
            flat.extend(t.terms if isinstance(t, Sum) else [t])
        self.terms = flat
        self.layers = tuple(dict.fromkeys(l for t in flat for l in t.layers))
        self.key = "(" + " + ".join(t.key for t in flat) + ")"

    def __call__(self, acts: Acts, layouts: Layouts = None) -> torch.Tensor:
        out = self.terms[0](acts, layouts)
        for t in self.terms[1:]:
            out = out + t(acts, layouts)
        return out

    def validate(self, layouts: Mapping[str, Union[Layout, tuple[int, ...]]]) -> None:
        for t in self.terms:
            t.validate(layouts)


class Scaled(Objective):
    """``factor * objective``."""

    def __init__(self, obj: Objective, factor: float):
        self.obj, self.factor = obj, float(factor)
        self.layers = obj.layers
        self.key = f"{self.factor:g}*{obj.key}"

    def __call__(self, acts: Acts, layouts: Layouts = None) -> torch.Tensor:
        return self.factor * self.obj(acts, layouts)

    def validate(self, layouts: Mapping[str, Union[Layout, tuple[int, ...]]]) -> None:
        self.obj.validate(layouts)


def channel(layer: str, n: int) -> Channel:
    """Mean of channel ``n`` over all grid positions of ``layer`` (token layers: over the patch
    tokens; dense layers: feature ``n``)."""
    return Channel(layer, n)


def neuron(layer: str, n: int, position: tuple[int, int] | None = None) -> Neuron:
    """Channel ``n`` at ``position = (y, x)`` on the spatial/patch grid (default: the centre,
    :func:`circuits.layers.centre`)."""
    return Neuron(layer, n, position)


def direction(layer: str, vec: object, position: tuple[int, int] | str | None = None) -> Direction:
    """Dot product of the activation vector ``[C]`` with ``vec [C]``; averaged over positions
    when ``position`` is ``None``, else at ``(y, x)`` or ``"center"``."""
    return Direction(layer, vec, position)


def direction_cossim(
    layer: str, vec: object, position: tuple[int, int] | str | None = "center", cossim_pow: float = 1.0
) -> DirectionCossim:
    """Cosine-weighted direction (Lucid's ``direction_neuron_cossim``); centre position by default."""
    return DirectionCossim(layer, vec, position, cossim_pow)


def as_objective(target: Union[str, Target, Objective]) -> Objective:
    """An :class:`Objective` from a target string/:class:`Target` or an objective itself.

    ``"layer:n"`` → :func:`channel`; ``"layer:n@y,x"`` → :func:`neuron` at that position.
    """
    if isinstance(target, Objective):
        return target
    if not isinstance(target, (str, Target)):
        raise TypeError(f"a target is a string like 'mixed4a:476', a Target or an Objective; got {type(target).__name__}")
    t = parse_target(target)
    if t.channel is None:
        raise ValueError(f"target {str(target)!r} names a layer but no channel; use 'layer:channel', e.g. '{t.layer}:0'")
    if t.position is None:
        return Channel(t.layer, t.channel)
    return Neuron(t.layer, t.channel, t.position)


def evaluate_batch(objectives: Sequence[Objective], acts: Acts, layouts: Layouts = None) -> torch.Tensor:
    """Values ``[B]`` where element ``i`` is ``objectives[i]`` evaluated on batch element ``i``.

    ``layouts`` as for :class:`Objective`. Plain :class:`Channel` objectives are gathered in
    one indexing operation per layer; the others are evaluated on their own slice of the batch.
    """
    b = len(objectives)
    parts: list[tuple[list[int], torch.Tensor]] = []
    groups: dict[str, list[int]] = {}
    others: list[int] = []
    for i, o in enumerate(objectives):
        if type(o) is Channel:
            groups.setdefault(o.layer, []).append(i)
        else:
            others.append(i)
    for layer, rows in groups.items():
        t, layout = _layout(acts, layouts, layer)
        dev = t.device
        r = torch.tensor(rows, device=dev)
        c = torch.tensor([objectives[i].n for i in rows], device=dev)  # type: ignore[attr-defined]
        parts.append((rows, layout.positions(t)[r, c].mean(-1)))
    for i in others:
        vals = objectives[i]({k: v[i:i + 1] for k, v in acts.items()}, layouts)
        parts.append(([i], vals.reshape(1)))
    if len(parts) == 1 and parts[0][0] == list(range(b)):
        return parts[0][1]
    order = [i for rows, _ in parts for i in rows]
    vals = torch.cat([v for _, v in parts])
    inverse = torch.empty(b, dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(b)
    return vals[inverse.to(vals.device)]
