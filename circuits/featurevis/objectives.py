"""Objectives: what a feature visualization maximises, one value per batch element.

An :class:`Objective` maps a dict of layer activations (``[B, C, H, W]`` for conv layers,
``[B, F]`` for dense layers such as logits) to a tensor ``[B]``: its value for each batch
element. The same object therefore scores rendered images *and* data set images.

* :func:`channel` — mean of one channel over all positions (``acts[:, n].mean((-2, -1))``);
  for a dense layer, the feature itself.
* :func:`neuron` — one channel at one position (the centre by default).
* :func:`direction` — dot product of the activation vector over channels with ``vec``,
  at one position or averaged over positions.
* :func:`direction_cossim` — Lucid's ``direction_neuron_cossim``: ``dot * max(cos, 0.1) ** p``
  rewards both a large projection and alignment with ``vec`` (centre position by default).
* ``a + b``, ``a - b``, ``2 * a``, ``a / 3``, ``-a``, ``sum([...])`` combine objectives.

Target strings work everywhere: ``as_objective("mixed4a:476")`` is ``channel("mixed4a", 476)``
and ``"mixed4a:476@3,4"`` is ``neuron("mixed4a", 476, (3, 4))``.

Each objective knows the layers it reads (``.layers``), a stable text ``.key`` (used in cache
keys and seeds) and checks itself against the layer shapes (``.validate``) before any
optimisation starts, so a wrong channel or vector length fails fast with a clear message.
"""

from __future__ import annotations

import hashlib
from typing import Mapping, Sequence, Union

import numpy as np
import torch

from ..layers import Target, centre, check_channel, parse_target

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
Position = Union[tuple[int, int], str, None]


def _spatial(t: torch.Tensor) -> torch.Tensor:
    """``[B, C, ...]`` → ``[B, C, P]`` (P = number of positions; 1 for dense layers)."""
    if t.ndim == 2:
        return t[:, :, None]
    return t.flatten(2)


class Objective:
    """Base class: ``obj(acts) -> [B]``; supports ``+``, ``-``, ``*``/``/`` by scalars."""

    layers: tuple[str, ...] = ()
    key: str = "objective"

    def __call__(self, acts: Acts) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def validate(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Raise ``ValueError`` if this objective does not fit the layer shapes (batch excluded)."""

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


def _layer_shape(shapes: Mapping[str, tuple[int, ...]], layer: str) -> tuple[int, ...]:
    if layer not in shapes:
        raise ValueError(f"layer {layer!r} was not computed (have: {sorted(shapes)})")
    return tuple(shapes[layer])


def _check_position(layer: str, shape: tuple[int, ...], position: Position) -> None:
    if position is None or position == "center":
        return
    if len(shape) < 3:
        raise ValueError(f"layer {layer!r} is dense (shape {shape}); a position makes no sense there")
    y, x = position  # type: ignore[misc]
    h, w = shape[-2], shape[-1]
    if not (0 <= y < h and 0 <= x < w):
        raise ValueError(f"position (y={y}, x={x}) is outside layer {layer!r}, which is {h}x{w} (valid y 0..{h - 1}, x 0..{w - 1})")


def _at(t: torch.Tensor, position: Position) -> torch.Tensor:
    """``[B, C, H, W]`` → ``[B, C]`` at ``position`` (``"center"`` = ``(H // 2, W // 2)``)."""
    if t.ndim == 2:
        return t
    if position == "center":
        return t[(slice(None), slice(None), *centre(t.shape[-2], t.shape[-1]))]
    y, x = position  # type: ignore[misc]
    return t[:, :, y, x]


class Channel(Objective):
    """Mean activation of channel ``n`` of ``layer`` over all positions (dense: feature ``n``)."""

    def __init__(self, layer: str, n: int):
        self.layer, self.n = layer, int(n)
        self.layers = (layer,)
        self.key = f"{layer}:{self.n}"

    def __call__(self, acts: Acts) -> torch.Tensor:
        t = acts[self.layer]
        return t[:, self.n] if t.ndim == 2 else _spatial(t)[:, self.n].mean(-1)

    def validate(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        check_channel(self.layer, self.n, _layer_shape(shapes, self.layer)[0])


class Neuron(Objective):
    """Channel ``n`` of ``layer`` at one position ``(y, x)`` (the centre by default)."""

    def __init__(self, layer: str, n: int, position: Position = None):
        self.layer, self.n = layer, int(n)
        self.position: Position = "center" if position is None else (int(position[0]), int(position[1]))  # type: ignore[index]
        self.layers = (layer,)
        pos = "" if self.position == "center" else f"@{self.position[0]},{self.position[1]}"  # type: ignore[index]
        self.key = f"{layer}:{self.n}{pos}" if pos else f"neuron({layer}:{self.n})"

    def __call__(self, acts: Acts) -> torch.Tensor:
        return _at(acts[self.layer], self.position)[:, self.n]

    def validate(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        shape = _layer_shape(shapes, self.layer)
        check_channel(self.layer, self.n, shape[0])
        _check_position(self.layer, shape, self.position)


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

    def validate(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        shape = _layer_shape(shapes, self.layer)
        if self.vec.numel() != shape[0]:
            raise ValueError(
                f"direction vector has length {self.vec.numel()}, but layer {self.layer!r} has "
                f"{shape[0]} channels; the vector must have one entry per channel"
            )
        _check_position(self.layer, shape, self.position)

    def _vectors(self, t: torch.Tensor) -> torch.Tensor:
        """``[B, C, P]`` activation vectors at the chosen position(s)."""
        if self.position is None:
            return _spatial(t)
        return _at(t, self.position)[:, :, None]


class Direction(_DirectionBase):
    """``<acts[:, :, y, x], vec>`` at a position, or its mean over positions (``position=None``)."""

    def __init__(self, layer: str, vec: object, position: Position = None):
        super().__init__(layer, vec, position)
        self.key = f"direction({layer},{_vec_digest(self.vec)},{self._pos_text()})"

    def __call__(self, acts: Acts) -> torch.Tensor:
        a = self._vectors(acts[self.layer])
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

    def __call__(self, acts: Acts) -> torch.Tensor:
        a = self._vectors(acts[self.layer])
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

    def __call__(self, acts: Acts) -> torch.Tensor:
        out = self.terms[0](acts)
        for t in self.terms[1:]:
            out = out + t(acts)
        return out

    def validate(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        for t in self.terms:
            t.validate(shapes)


class Scaled(Objective):
    """``factor * objective``."""

    def __init__(self, obj: Objective, factor: float):
        self.obj, self.factor = obj, float(factor)
        self.layers = obj.layers
        self.key = f"{self.factor:g}*{obj.key}"

    def __call__(self, acts: Acts) -> torch.Tensor:
        return self.factor * self.obj(acts)

    def validate(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.obj.validate(shapes)


def channel(layer: str, n: int) -> Channel:
    """Mean of channel ``n`` over all positions of ``layer`` (dense layers: feature ``n``)."""
    return Channel(layer, n)


def neuron(layer: str, n: int, position: tuple[int, int] | None = None) -> Neuron:
    """Channel ``n`` at ``position = (y, x)`` (default: the centre ``(H // 2, W // 2)``)."""
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


def evaluate_batch(objectives: Sequence[Objective], acts: Acts) -> torch.Tensor:
    """Values ``[B]`` where element ``i`` is ``objectives[i]`` evaluated on batch element ``i``.

    Plain :class:`Channel` objectives are gathered in one indexing operation per layer; the
    others are evaluated on their own slice of the batch.
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
        t = acts[layer]
        dev = t.device
        r = torch.tensor(rows, device=dev)
        c = torch.tensor([objectives[i].n for i in rows], device=dev)  # type: ignore[attr-defined]
        vals = t[r, c] if t.ndim == 2 else _spatial(t)[r, c].mean(-1)
        parts.append((rows, vals))
    for i in others:
        vals = objectives[i]({k: v[i:i + 1] for k, v in acts.items()})
        parts.append(([i], vals.reshape(1)))
    if len(parts) == 1 and parts[0][0] == list(range(b)):
        return parts[0][1]
    order = [i for rows, _ in parts for i in rows]
    vals = torch.cat([v for _, v in parts])
    inverse = torch.empty(b, dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(b)
    return vals[inverse.to(vals.device)]
