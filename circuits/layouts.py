"""Activation layouts: where the channels and the positions are in a layer's activation.

Every layer's activation is one of four layouts (``B`` is the batch):

========== ===================================== =============================================
kind       activation                            models
========== ===================================== =============================================
``nchw``   ``[B, C, H, W]``                      CNNs (conv, batch norm, pooling outputs)
``nhwc``   ``[B, H, W, C]``                      Swin stages, ConvNeXt blocks' internals
``tokens`` ``[B, n_prefix + H*W, C]``            ViT blocks: class/register tokens first,
                                                 then the patch grid ``H × W`` row by row
``dense``  ``[B, C]``                            heads, logits
========== ===================================== =============================================

A :class:`Layout` says which; it views any activation as the canonical ``[B, C, H, W]``
(:meth:`Layout.canonical`: patch tokens only for ``tokens``, ``[B, C, 1, 1]`` for ``dense``),
hands out the prefix tokens (:meth:`Layout.prefix`) and puts a canonical tensor back into the
layer's layout (:meth:`Layout.from_canonical`). So everywhere, ``layer:channel`` is the
feature axis and ``@y,x`` a position on the spatial or patch grid.

Layouts are detected once per model and input shape from one probe forward pass
(:func:`circuits.layers.trace`): the module types (convolutions and poolings are
channels-first; ``nn.Linear`` and ``nn.LayerNorm`` act on the last axis; ``Permute`` modules
move the channel axis), the tensors each module passes on, the patch embedding's grid and
the token count. The result is remembered on the model (a plain attribute that lives and
dies with it). Where detection gets a layer wrong, :func:`set_layout` is the one way to say
what it is; it is remembered on the model as well and used by every consumer::

    from circuits import layouts
    lay = layouts.get_layout(vit, "encoder.layers.encoder_layer_6")
    lay.kind, lay.channels, lay.grid, lay.n_prefix   # ('tokens', 768, (14, 14), 1)
    grid = lay.canonical(act)        # [B, 768, 14, 14]: the patch tokens on their grid
    cls = lay.prefix(act)            # [B, 1, 768]: the class token
    back = lay.from_canonical(grid, prefix=cls)   # == act
    layouts.set_layout(model, "blocks.3", "nhwc")  # override a detection

Per-call names (``layer1.0.relu#2``) work as in :mod:`circuits.layers`; a bare name of a
module that runs more than once raises :class:`circuits.layers.AmbiguousLayerError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .layers import (
    LayerCall,
    centre,
    check_channel,
    example_input,
    get_layer,
    per_call_name,
    split_call,
    structure_key,
    trace,
)

__all__ = [
    "KINDS",
    "Layout",
    "get_layout",
    "get_layouts",
    "set_layout",
    "clear_layout",
    "channels",
    "grid_size",
]

KINDS = ("nchw", "nhwc", "tokens", "dense")

#: the most prefix tokens (class, distillation, register tokens) a token layer is assumed to have
MAX_PREFIX = 32

_DETECTED_ATTR = "_circuits_layouts"  # {(fingerprint, input shape): {layer: layout tuple}}
_USER_ATTR = "_circuits_layout_overrides"  # {layer: (kind, n_prefix, grid)}

_RANK = {"nchw": 3, "nhwc": 3, "tokens": 2, "dense": 1}  # per-example rank
_EXPECTED = {
    "nchw": "[batch, channels, h, w]",
    "nhwc": "[batch, h, w, channels]",
    "tokens": "[batch, tokens, channels]",
    "dense": "[batch, features]",
}


def _check_kind(kind: object) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown layout {kind!r}; valid: {', '.join(KINDS)}")
    return kind  # type: ignore[return-value]


def _square_split(n_tokens: int) -> Optional[tuple[int, int]]:
    """``(n_prefix, side)`` with the fewest prefix tokens that leave a square grid."""
    for p in range(0, min(MAX_PREFIX, n_tokens - 1) + 1):
        side = math.isqrt(n_tokens - p)
        if side * side == n_tokens - p:
            return p, side
    return None


@dataclass(frozen=True)
class Layout:
    """How one layer's activation is laid out; see the module docstring for the four kinds.

    Attributes:
        kind: ``"nchw"``, ``"nhwc"``, ``"tokens"`` or ``"dense"``.
        channels: size of the feature/channel axis (``layer:channel`` indexes it).
        height, width: the spatial or patch grid (``1 × 1`` for dense layers; ``None`` for a
            token layer whose patch grid is unknown: then only channel means work).
        n_prefix: tokens before the patch grid (class, distillation, register tokens);
            ``0`` for the other kinds.
        source: ``"detected"``, ``"user"`` (:func:`set_layout`) or ``"guessed"`` (from the
            shape alone, :meth:`guess`); not part of equality.

    Example:
        >>> lay = Layout("tokens", channels=32, height=4, width=4, n_prefix=1)
        >>> lay.shape, lay.channel_axis, lay.centre()
        ((17, 32), 2, (2, 2))
    """

    kind: str
    channels: int
    height: Optional[int] = 1
    width: Optional[int] = 1
    n_prefix: int = 0
    source: str = field(default="detected", compare=False)

    def __post_init__(self) -> None:
        _check_kind(self.kind)
        if self.channels < 1:
            raise ValueError(f"a layout has at least one channel, got {self.channels}")
        if (self.height is None) != (self.width is None):
            raise ValueError("a layout's grid is both height and width, or neither (unknown)")
        if self.height is None and self.kind != "tokens":
            raise ValueError(f"only a token layout may have an unknown grid, not {self.kind!r}")
        if self.height is not None and (self.height < 1 or self.width < 1):  # type: ignore[operator]
            raise ValueError(f"a grid is at least 1×1, got {self.height}×{self.width}")
        if self.kind == "dense" and (self.height, self.width) != (1, 1):
            raise ValueError("a dense layout has no grid (height = width = 1)")
        if self.n_prefix < 0 or (self.n_prefix and self.kind != "tokens"):
            raise ValueError(f"only token layouts have prefix tokens (n_prefix >= 0); got {self.n_prefix} for {self.kind!r}")

    # ------------------------------------------------------------------ description
    @property
    def channel_axis(self) -> int:
        """The channel axis of the activation, batch included (1, 3, 2 or 1)."""
        return {"nchw": 1, "nhwc": 3, "tokens": 2, "dense": 1}[self.kind]

    @property
    def grid(self) -> Optional[tuple[int, int]]:
        """``(height, width)`` of the spatial/patch grid; ``None`` when unknown."""
        return None if self.height is None else (self.height, self.width)  # type: ignore[return-value]

    @property
    def n_positions(self) -> Optional[int]:
        """Number of grid positions (patch tokens); ``None`` when the grid is unknown."""
        return None if self.height is None else self.height * self.width  # type: ignore[operator]

    @property
    def shape(self) -> Optional[tuple[int, ...]]:
        """The activation's shape without the batch; ``None`` when the grid is unknown."""
        if self.kind == "nchw":
            return (self.channels, self.height, self.width)  # type: ignore[return-value]
        if self.kind == "nhwc":
            return (self.height, self.width, self.channels)  # type: ignore[return-value]
        if self.kind == "dense":
            return (self.channels,)
        return None if self.height is None else (self.n_prefix + self.n_positions, self.channels)  # type: ignore[operator]

    def __str__(self) -> str:
        if self.kind == "dense":
            return f"dense [{self.channels}]"
        grid = "?×?" if self.height is None else f"{self.height}×{self.width}"
        if self.kind == "tokens":
            return f"tokens: {self.n_prefix} prefix + {grid} patches, {self.channels} channels"
        return f"{self.kind}: {self.channels} channels on {grid}"

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_shape(
        cls,
        shape: Sequence[int],
        kind: str,
        n_prefix: Optional[int] = None,
        grid: Optional[Sequence[int]] = None,
        source: str = "detected",
        layer: str = "this layer",
    ) -> "Layout":
        """The layout of an activation of ``shape`` (batch excluded) read as ``kind``.

        For ``tokens``, ``n_prefix`` and ``grid`` fix the split of the token axis; given
        neither, the split is the fewest prefix tokens (at most :data:`MAX_PREFIX`) that
        leave a square grid.
        """
        _check_kind(kind)
        shape = tuple(int(v) for v in shape)
        if len(shape) != _RANK[kind]:
            raise ValueError(
                f"layout {kind!r} needs an activation {_EXPECTED[kind]}; {layer} outputs "
                f"[batch, {', '.join(map(str, shape))}]"
            )
        if kind == "nchw":
            return cls("nchw", shape[0], shape[1], shape[2], source=source)
        if kind == "nhwc":
            return cls("nhwc", shape[2], shape[0], shape[1], source=source)
        if kind == "dense":
            return cls("dense", shape[0], source=source)
        n_tokens, dim = shape
        if grid is not None:
            h, w = (int(v) for v in grid)
            p = n_tokens - h * w if n_prefix is None else int(n_prefix)
            if p < 0 or p + h * w != n_tokens:
                raise ValueError(
                    f"{layer} has {n_tokens} tokens, which is not {p} prefix + a {h}×{w} grid"
                )
            return cls("tokens", dim, h, w, p, source=source)
        if n_prefix is not None:
            p = int(n_prefix)
            side = math.isqrt(max(n_tokens - p, 0))
            if p < 0 or p >= n_tokens:
                raise ValueError(f"{layer} has {n_tokens} tokens; n_prefix must be 0..{n_tokens - 1}, got {p}")
            if side * side == n_tokens - p:
                return cls("tokens", dim, side, side, p, source=source)
            return cls("tokens", dim, None, None, p, source=source)
        split = _square_split(n_tokens)
        if split is None:
            return cls("tokens", dim, None, None, 0, source=source)
        return cls("tokens", dim, split[1], split[1], split[0], source=source)

    @classmethod
    def guess(cls, shape: Sequence[int]) -> "Layout":
        """A layout from the shape alone (no model): ``[C, H, W]`` → ``nchw``, ``[T, C]`` →
        ``tokens`` (square-grid split), ``[C]`` → ``dense``. It cannot tell ``nhwc``; use
        :func:`get_layout` where the model is at hand."""
        rank = len(tuple(shape))
        kind = {3: "nchw", 2: "tokens", 1: "dense"}.get(rank)
        if kind is None:
            raise ValueError(f"an activation [batch, {', '.join(map(str, shape))}] has no layout; valid: {_describe_kinds()}")
        return cls.from_shape(shape, kind, source="guessed")

    def fit(self, shape: Sequence[int]) -> "Layout":
        """This layout for an activation of another ``shape`` (batch excluded) of the same
        layer, e.g. at another input size: same kind and prefix, its own channels and grid."""
        shape = tuple(int(v) for v in shape)
        if shape == self.shape:
            return self
        if len(shape) != _RANK[self.kind]:
            raise ValueError(
                f"an activation [batch, {', '.join(map(str, shape))}] does not fit layout "
                f"{self.kind!r}, which is {_EXPECTED[self.kind]}"
            )
        if self.kind != "tokens":
            return replace(Layout.from_shape(shape, self.kind), source=self.source)
        n_tokens, dim = shape
        n = n_tokens - self.n_prefix
        if n < 1:
            raise ValueError(f"{n_tokens} tokens do not fit a layout with {self.n_prefix} prefix tokens")
        grid: Optional[tuple[int, int]] = None
        if self.height is not None and self.height * self.width == n:  # type: ignore[operator]
            grid = (self.height, self.width)  # type: ignore[assignment]
        elif self.height is not None:
            # the same aspect ratio as the known grid, scaled
            h = math.isqrt(n * self.height // self.width)  # type: ignore[operator]
            for hh in (h, h + 1):
                if hh > 0 and n % hh == 0 and hh * self.width == (n // hh) * self.height:  # type: ignore[operator]
                    grid = (hh, n // hh)
        if grid is None:
            return Layout.from_shape(shape, "tokens", n_prefix=self.n_prefix, source=self.source)
        return Layout("tokens", dim, grid[0], grid[1], self.n_prefix, source=self.source)

    # ------------------------------------------------------------------ views
    def _check(self, t: torch.Tensor) -> None:
        want = self.shape
        if want is None:
            ok = t.ndim == 3 and t.shape[1] > self.n_prefix and t.shape[2] == self.channels
        else:
            ok = tuple(t.shape[1:]) == want
        if not ok:
            raise ValueError(
                f"activation of shape {tuple(t.shape)} does not match the layout ({self}); "
                "fit the layout to it first (layout.fit(shape))"
            )

    def _need_grid(self, what: str) -> tuple[int, int]:
        if self.height is None:
            raise ValueError(
                f"{what} needs the patch grid, which is unknown for this token layer "
                f"({self}); state it with set_layout(model, layer, 'tokens', n_prefix=..., grid=(h, w))"
            )
        return self.height, self.width  # type: ignore[return-value]

    def canonical(self, t: torch.Tensor) -> torch.Tensor:
        """The activation as ``[B, C, H, W]`` (a view where possible): ``nhwc`` permuted,
        ``tokens`` without the prefix tokens on the patch grid, ``dense`` as ``[B, C, 1, 1]``."""
        self._check(t)
        if self.kind == "nchw":
            return t
        if self.kind == "nhwc":
            return t.permute(0, 3, 1, 2)
        if self.kind == "dense":
            return t[:, :, None, None]
        h, w = self._need_grid("the canonical [B, C, H, W] view")
        return t[:, self.n_prefix:].unflatten(1, (h, w)).permute(0, 3, 1, 2)

    def positions(self, t: torch.Tensor) -> torch.Tensor:
        """``[B, C, P]``: the channel vectors at all ``P`` grid positions (patch tokens only;
        ``P = 1`` for dense layers). Needs no grid, so it works for every token layer."""
        self._check(t)
        if self.kind == "nchw":
            return t.flatten(2)
        if self.kind == "nhwc":
            return t.flatten(1, 2).transpose(1, 2)
        if self.kind == "dense":
            return t[:, :, None]
        return t[:, self.n_prefix:].transpose(1, 2)

    def prefix(self, t: torch.Tensor) -> torch.Tensor:
        """``[B, n_prefix, C]``: the class/register tokens (empty ``[B, 0, C]`` for other kinds)."""
        self._check(t)
        if self.kind == "tokens":
            return t[:, : self.n_prefix]
        return t.new_zeros((t.shape[0], 0, self.channels))

    def at(self, t: torch.Tensor, position: Union[tuple[int, int], str], layer: str = "this layer") -> torch.Tensor:
        """``[B, C]``: the channel vector at ``position = (y, x)`` or ``"center"``
        (:func:`circuits.layers.centre`); a dense layer's features for ``"center"``."""
        self._check(t)
        if self.kind == "dense" and position == "center":
            return t
        if position == "center":
            position = self.centre()
        else:
            self.check_position(layer, position)  # type: ignore[arg-type]
        y, x = position  # type: ignore[misc]
        if self.kind == "nchw":
            return t[:, :, y, x]
        if self.kind == "nhwc":
            return t[:, y, x, :]
        return t[:, self.n_prefix + y * self.width + x, :]  # type: ignore[operator]

    def from_canonical(self, x: torch.Tensor, prefix: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Put a canonical ``[B, C, H, W]`` tensor back into this layout (contiguous).

        For a token layout with prefix tokens, ``prefix [B, n_prefix, C]`` gives them (there
        is no neutral value to invent); :meth:`canonical` and :meth:`prefix` invert it.
        """
        h, w = self._need_grid("from_canonical") if self.kind == "tokens" else (self.height, self.width)
        want = (self.channels, h, w)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(
                f"from_canonical needs [batch, {', '.join(map(str, want))}] for layout ({self}), got {tuple(x.shape)}"
            )
        if self.kind == "nchw":
            return x
        if self.kind == "nhwc":
            return x.permute(0, 2, 3, 1).contiguous()
        if self.kind == "dense":
            return x[:, :, 0, 0]
        tokens = x.flatten(2).transpose(1, 2)
        if self.n_prefix == 0:
            return tokens.contiguous()
        want_prefix = (x.shape[0], self.n_prefix, self.channels)
        if prefix is None or tuple(prefix.shape) != want_prefix:
            got = "none" if prefix is None else str(tuple(prefix.shape))
            raise ValueError(f"this token layout has {self.n_prefix} prefix token(s): pass prefix {want_prefix} (got {got})")
        return torch.cat([prefix.to(tokens.dtype), tokens], dim=1)

    # ------------------------------------------------------------------ checks
    def centre(self) -> tuple[int, int]:
        """The centre of the grid, :func:`circuits.layers.centre` (``(0, 0)`` for dense)."""
        h, w = self._need_grid("the centre position") if self.kind == "tokens" else (self.height, self.width)
        return centre(h, w)  # type: ignore[arg-type]

    def check_channel(self, layer: str, channel: int) -> None:
        """One-line ``ValueError`` naming the valid range when ``channel`` is out of range."""
        check_channel(layer, channel, self.channels)

    def check_position(self, layer: str, position: tuple[int, int]) -> None:
        """One-line ``ValueError`` when ``position = (y, x)`` is not on the layer's grid."""
        if self.kind == "dense":
            raise ValueError(
                f"layer {layer!r} is dense ([batch, {self.channels}]); it has no positions: "
                f"drop '@y,x' (e.g. '{layer}:0')"
            )
        h, w = self._need_grid(f"a position on layer {layer!r}")
        y, x = position
        if not (0 <= y < h and 0 <= x < w):
            grid = "patch grid" if self.kind == "tokens" else "map"
            raise ValueError(
                f"position (y={y}, x={x}) is outside layer {layer!r}, whose {grid} is {h}x{w} "
                f"(valid y 0..{h - 1}, x 0..{w - 1})"
            )


def _describe_kinds() -> str:
    return "; ".join(f"{k} {_EXPECTED[k]}" for k in KINDS)


# --------------------------------------------------------------------------- detection

_CHANNELS_FIRST = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.LPPool2d,
    nn.FractionalMaxPool2d,
    nn.Upsample,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
    nn.Dropout2d,
)
_LAST_AXIS_NORMS: tuple[type, ...] = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def _axis_from_module(module: nn.Module, out: torch.Tensor, inputs: Sequence[torch.Tensor], known: Mapping[int, Layout]) -> Optional[str]:
    """``"first"``/``"last"``: where the module type puts the channels of ``out``; else ``None``."""
    if isinstance(module, _CHANNELS_FIRST):
        return "first"
    if isinstance(module, nn.Linear):
        return "last"
    if isinstance(module, _LAST_AXIS_NORMS):
        base = next(b for b in _LAST_AXIS_NORMS if isinstance(module, b))
        name = type(module).__name__.lower()
        if type(module).forward is base.forward:
            return "last"  # torch's own forward normalises the trailing axes, always
        if "2d" in name or "channelsfirst" in name or "channels_first" in name:
            return "first"
        normalized = tuple(getattr(module, "normalized_shape", ()) or ())
        if normalized and out.ndim >= 3:
            last, first = normalized[-1] == out.shape[-1], normalized[-1] == out.shape[1]
            if last != first:
                return "last" if last else "first"
        return None
    if isinstance(module, nn.Flatten) and inputs and out.ndim >= 3:
        before = known.get(id(inputs[0]))
        if before is not None and before.kind == "nchw" and module.start_dim % inputs[0].ndim >= 2:
            return "first"  # [B, C, H, W] → [B, C, H·W]: the channels stay on axis 1
    dims = getattr(module, "dims", None)  # torchvision.ops.misc.Permute and look-alikes
    if isinstance(dims, (list, tuple)) and sorted(dims) == list(range(out.ndim)) and inputs:
        before = known.get(id(inputs[0]))
        if before is not None and before.kind in ("nchw", "nhwc") and out.ndim == 4:
            moved = list(dims).index(before.channel_axis)
            return {1: "first", 3: "last"}.get(moved)
    return None


class _Detector:
    """Walks a traced forward pass and gives every module call a layout."""

    def __init__(self, model: nn.Module, x: torch.Tensor, overrides: Mapping[str, tuple]):
        self.model = model
        self.overrides = overrides
        self.known: dict[int, Layout] = {}  # id(tensor) -> layout (the trace keeps tensors alive)
        self.grids: list[tuple[int, int, int]] = []  # (channels, h, w) of 4-D activations so far
        if x.ndim in (2, 3, 4):
            self.known[id(x)] = Layout.guess(tuple(x.shape[1:]))
            self._note(self.known[id(x)])

    def _note(self, lay: Layout) -> None:
        if lay.kind in ("nchw", "nhwc"):
            self.grids.append((lay.channels, lay.height, lay.width))  # type: ignore[arg-type]

    def _override(self, call: LayerCall) -> Optional[tuple]:
        for key in (call.name, f"{call.module_name}#{call.call}", call.module_name):  # this call, then all
            if key in self.overrides:
                return self.overrides[key]
        return None

    def _tokens(self, shape: tuple[int, int], inputs: Sequence[torch.Tensor]) -> Layout:
        n_tokens, dim = shape
        for t in inputs:  # same token count as a token input: same prefix and grid
            lay = self.known.get(id(t))
            if lay is not None and lay.kind == "tokens" and t.ndim == 3 and t.shape[1] == n_tokens:
                return Layout("tokens", dim, lay.height, lay.width, lay.n_prefix)
        declared = getattr(self.model, "num_prefix_tokens", None)  # timm's ViTs say so
        if isinstance(declared, int) and 0 <= declared < n_tokens:
            n = n_tokens - declared
            grid = next(((h, w) for _, h, w in reversed(self.grids) if h * w == n), None)
            if grid is not None:
                return Layout("tokens", dim, grid[0], grid[1], declared)
            side = math.isqrt(n)
            if side * side == n:
                return Layout("tokens", dim, side, side, declared)
        for c, h, w in reversed(self.grids):  # the patch embedding: a map with `dim` channels
            if c == dim and 0 <= n_tokens - h * w <= MAX_PREFIX:
                return Layout("tokens", dim, h, w, n_tokens - h * w)
        return Layout.from_shape(shape, "tokens")

    def _four_d_default(self, shape: tuple[int, ...]) -> Layout:
        """A 4-D tensor from code the trace cannot see: the reading whose (channels, h, w)
        was seen before wins; channels-first otherwise (PyTorch's convention)."""
        first = (shape[0], shape[1], shape[2])
        last = (shape[2], shape[0], shape[1])
        seen = set(self.grids)
        if last in seen and first not in seen:
            return Layout.from_shape(shape, "nhwc")
        return Layout.from_shape(shape, "nchw")

    def layout(self, call: LayerCall) -> Optional[Layout]:
        out = call.output
        if out is None or out.ndim not in (2, 3, 4):
            return None
        shape = tuple(out.shape[1:])
        lay: Optional[Layout] = None
        override = self._override(call)
        if override is not None:
            kind, n_prefix, grid = override
            lay = Layout.from_shape(shape, kind, n_prefix, grid, source="user", layer=f"layer {call.name!r}")
        if lay is None:
            lay = self.known.get(id(out))  # a container handing on a child's output, Identity ...
        if lay is None:
            axis = _axis_from_module(call.module, out, call.inputs, self.known)
            if axis == "first" and out.ndim == 4:
                lay = Layout.from_shape(shape, "nchw")
            elif axis == "last" and out.ndim == 4:
                lay = Layout.from_shape(shape, "nhwc")
            elif axis == "last" and out.ndim == 3:
                lay = self._tokens(shape, call.inputs)  # type: ignore[arg-type]
            elif axis == "first" and out.ndim == 3:
                return None  # [B, C, L] sequences: none of the four layouts
        if lay is None:  # shape-preserving modules (activations, blocks with a residual)
            lay = next(
                (self.known[id(t)] for t in call.inputs if id(t) in self.known and t.shape == out.shape), None
            )
        if lay is None:
            if out.ndim == 4:
                lay = self._four_d_default(shape)
            elif out.ndim == 3:
                lay = self._tokens(shape, call.inputs)  # type: ignore[arg-type]
            else:
                lay = Layout.from_shape(shape, "dense")
        self.known[id(out)] = lay
        self._note(lay)
        return lay


def _as_tuple(lay: Layout) -> tuple:
    return (lay.kind, lay.channels, lay.height, lay.width, lay.n_prefix, lay.source)


def _detect_all(model: nn.Module, input_shape: Optional[Sequence[int]]) -> tuple[dict[str, Layout], dict[str, int]]:
    """``({per-call name: layout}, {module name: calls})``, cached on the model."""
    x = example_input(model, input_shape)
    key = (structure_key(model), tuple(x.shape[1:]), str(x.dtype))
    cache = model.__dict__.setdefault(_DETECTED_ATTR, {})
    if key not in cache:
        calls = trace(model, x)
        detector = _Detector(model, x, model.__dict__.get(_USER_ATTR, {}))
        found: dict[str, tuple] = {}
        for call in calls:
            lay = detector.layout(call)
            if lay is not None:
                found[call.name] = _as_tuple(lay)
        counts = {c.module_name: c.n_calls for c in calls}
        while len(cache) >= 4:  # a model is probed at a few input sizes; keep the latest
            del cache[next(iter(cache))]
        cache[key] = (found, counts)
    found, counts = cache[key]
    return {name: Layout(*t) for name, t in found.items()}, counts


def _resolve(model: nn.Module, name: str, counts: Mapping[str, int]) -> str:
    """The per-call key for ``name`` (bare for a module that runs once)."""
    get_layer(model, name)  # unknown names: close matches
    n = counts.get(split_call(name)[0], 0)
    if n == 0:
        raise ValueError(f"layer {name!r} does not run in the model's forward pass, so it has no activation layout")
    return per_call_name(name, n)


def get_layouts(
    model: nn.Module,
    names: Optional[Iterable[str]] = None,
    input_shape: Optional[Sequence[int]] = None,
) -> dict[str, Layout]:
    """Layouts of the named layers (default: every layer that outputs a tensor), detected
    from one probe forward pass at ``input_shape`` (one example's shape; default: what the
    model declares, see :func:`circuits.layers.example_input`).

    Keys are the names as given; without ``names``, the per-call names of every layer.
    Detection runs once per model and input shape; the result lives on the model.
    """
    found, counts = _detect_all(model, input_shape)
    if names is None:
        return found
    result = {}
    for name in names:
        key = _resolve(model, name, counts)
        if key not in found:
            raise ValueError(
                f"layer {name!r} has no activation layout: its output is none of {_describe_kinds()}; if it is "
                f"one of them, say which with set_layout(model, {name!r}, kind)"
            )
        result[name] = found[key]
    return result


def get_layout(model: nn.Module, name: str, input_shape: Optional[Sequence[int]] = None) -> Layout:
    """The :class:`Layout` of layer ``name`` (``module`` or ``module#k``) of ``model``.

    Example:
        >>> import torchvision
        >>> vit = torchvision.models.VisionTransformer(32, 8, 2, 2, 32, 64)
        >>> print(get_layout(vit, "encoder.layers.encoder_layer_1"))
        tokens: 1 prefix + 4×4 patches, 32 channels
    """
    return get_layouts(model, [name], input_shape)[name]


def set_layout(
    model: nn.Module,
    name: str,
    layout: Union[str, Layout],
    *,
    n_prefix: Optional[int] = None,
    grid: Optional[Sequence[int]] = None,
) -> None:
    """Say how layer ``name`` is laid out, when detection gets it wrong; every consumer
    (:func:`get_layout`, objectives, dataset examples, expanded weights, pages) then uses it.

    ``layout`` is a kind (``"nchw"``, ``"nhwc"``, ``"tokens"``, ``"dense"``) or a
    :class:`Layout` (its kind, prefix and grid are used). For ``tokens``, ``n_prefix`` and/or
    ``grid=(h, w)`` fix how the token axis splits (default: the fewest prefix tokens that
    leave a square grid). Channels and grid sizes always come from the activation itself.
    ``name`` may be ``module#k`` (that call) or a bare module name (all its calls).
    Layers downstream that inherit this layer's activation follow it. Stored on the model.

    Example:
        >>> set_layout(model, "blocks.3", "nhwc")
        >>> set_layout(vit, "blocks.0", "tokens", n_prefix=5, grid=(14, 14))
    """
    if isinstance(layout, Layout):
        kind = layout.kind
        if kind == "tokens":
            n_prefix = layout.n_prefix if n_prefix is None else n_prefix
            grid = layout.grid if grid is None else grid
    else:
        kind = _check_kind(layout)
    if kind != "tokens" and (n_prefix is not None or grid is not None):
        raise ValueError(f"n_prefix and grid describe token layouts; layout {kind!r} takes neither")
    if n_prefix is not None and (not isinstance(n_prefix, int) or n_prefix < 0):
        raise ValueError(f"n_prefix is the number of prefix tokens (an int >= 0), got {n_prefix!r}")
    if grid is not None:
        grid = tuple(int(v) for v in grid)
        if len(grid) != 2 or min(grid) < 1:
            raise ValueError(f"grid is (height, width) with both >= 1, got {grid}")
    get_layer(model, name)  # unknown names fail here, with close matches
    overrides = dict(model.__dict__.get(_USER_ATTR, {}))
    overrides[name] = (kind, n_prefix, grid)
    model.__dict__[_USER_ATTR] = overrides
    model.__dict__.pop(_DETECTED_ATTR, None)


def clear_layout(model: nn.Module, name: Optional[str] = None) -> None:
    """Forget the :func:`set_layout` override of ``name`` (default: all of them)."""
    overrides = dict(model.__dict__.get(_USER_ATTR, {}))
    if name is None:
        overrides.clear()
    elif name not in overrides:
        raise KeyError(f"no layout was set for {name!r}; set ones: {', '.join(sorted(overrides)) or 'none'}")
    else:
        del overrides[name]
    model.__dict__[_USER_ATTR] = overrides
    model.__dict__.pop(_DETECTED_ATTR, None)


def channels(model: nn.Module, name: str, input_shape: Optional[Sequence[int]] = None) -> int:
    """The number of channels (features) of layer ``name``, whatever its layout."""
    return get_layout(model, name, input_shape).channels


def grid_size(model: nn.Module, name: str, input_shape: Optional[Sequence[int]] = None) -> tuple[int, int]:
    """``(height, width)`` of layer ``name``'s spatial or patch grid (``(1, 1)`` for dense)."""
    lay = get_layout(model, name, input_shape)
    if lay.grid is None:
        lay._need_grid(f"the grid size of {name!r}")
    return lay.grid  # type: ignore[return-value]
