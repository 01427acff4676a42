"""Named layers: look up, list, capture, replace, and stop the forward pass early.

A *layer* is the output of a named submodule of any ``torch.nn.Module``; its name is the
module's own dotted name (``model.named_modules()``). For the bundled InceptionV1 and the
project's trained models these are Lucid's names (``conv2d2``, ``mixed3b``,
``mixed3b_5x5_bottleneck`` ...), each the activation *after* the ReLU.

Every hook lives inside a context manager and is removed on every exit path, exceptions
included::

    with capture(model, ["mixed3a", "mixed3b"]) as acts:
        model(x)
    acts["mixed3b"].shape        # [batch, channels, h, w]

    acts = run_until(model, x, ["mixed3a"])   # stops right after mixed3a
"""

from __future__ import annotations

import contextlib
import difflib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, Union

import torch
from torch import nn

__all__ = [
    "UnknownLayerError",
    "LayerInfo",
    "Target",
    "get_layer",
    "layer_names",
    "list_layers",
    "capture",
    "replace_activation",
    "run_until",
    "parse_target",
    "check_channel",
    "centre",
]


class UnknownLayerError(KeyError):
    """A layer name that the model does not have; the message lists the closest names."""

    def __init__(self, name: str, candidates: Sequence[str]):
        self.name = name
        close = difflib.get_close_matches(name, list(candidates), n=5, cutoff=0.5)
        if not close:  # fall back to prefix/substring matches, useful for "mixed3" etc.
            close = [c for c in candidates if name and (c.startswith(name) or name in c)][:5]
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        msg = f"unknown layer {name!r}.{hint} ({len(candidates)} layers; list them with circuits.layer_names(model))"
        super().__init__(msg)
        self.message = msg
        self.close_matches = close

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.message


def layer_names(model: nn.Module) -> list[str]:
    """All named submodules of ``model`` in registration order (the root module excluded)."""
    return [name for name, _ in model.named_modules() if name]


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """Return the submodule called ``name``; raise :class:`UnknownLayerError` with close matches."""
    modules = dict(model.named_modules())
    if name and name in modules:
        return modules[name]
    raise UnknownLayerError(name, [n for n in modules if n])


@dataclass(frozen=True)
class Target:
    """What a request points at: a whole layer, ``layer:channel``, optionally a position.

    ``parse_target("mixed4a:476")`` → ``Target("mixed4a", 476)``;
    ``parse_target("mixed4a:476@3,4")`` → the neuron at ``(y=3, x=4)``.
    """

    layer: str
    channel: int | None = None
    position: tuple[int, int] | None = None

    def __str__(self) -> str:
        s = self.layer
        if self.channel is not None:
            s += f":{self.channel}"
        if self.position is not None:
            s += f"@{self.position[0]},{self.position[1]}"
        return s


def parse_target(spec: Union[str, Target]) -> Target:
    """Parse ``"layer"``, ``"layer:channel"`` or ``"layer:channel@y,x"`` into a :class:`Target`."""
    if isinstance(spec, Target):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a target is 'layer', 'layer:channel' or 'layer:channel@y,x'; got {spec!r}")
    text = spec.strip()
    position = None
    if "@" in text:
        text, pos = text.split("@", 1)
        try:
            y, x = (int(v) for v in pos.split(","))
        except ValueError:
            raise ValueError(f"bad position in target {spec!r}: expected '@y,x' with integers") from None
        position = (y, x)
    channel = None
    if ":" in text:
        text, ch = text.rsplit(":", 1)
        try:
            channel = int(ch)
        except ValueError:
            raise ValueError(f"bad channel in target {spec!r}: {ch!r} is not an integer") from None
        if channel < 0:
            raise ValueError(f"bad channel in target {spec!r}: channels are >= 0")
    if not text:
        raise ValueError(f"target {spec!r} has no layer name")
    return Target(text, channel, position)


def centre(h: int, w: int) -> tuple[int, int]:
    """The centre position ``(y, x)`` of an ``h × w`` map: ``(h // 2, w // 2)``.

    The one definition used everywhere "the neuron" means a channel at the centre (feature
    visualization objectives, expanded weights, per-example connections, dataset examples).
    It is Lucid's convention; on an even side it is the lower/right of the two middle cells
    (7 on a 14-wide map), on an odd side the middle cell.

    Example:
        >>> centre(14, 14), centre(7, 5)
        ((7, 7), (3, 2))
    """
    if h < 1 or w < 1:
        raise ValueError(f"a map has a centre only when it is at least 1×1, got {h}×{w}")
    return h // 2, w // 2


def check_channel(layer: str, channel: int, n_channels: int) -> None:
    """Raise a ``ValueError`` that states the valid range when ``channel`` is out of range."""
    if not 0 <= channel < n_channels:
        raise ValueError(
            f"channel {channel} is out of range for layer {layer!r}, which has {n_channels} "
            f"channels (valid: 0..{n_channels - 1})"
        )


def _first_tensor(output: object) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"layer output is a {type(output).__name__}, not a tensor")


@contextlib.contextmanager
def capture(
    model: nn.Module, names: Sequence[str] | str, detach: bool = False
) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of several layers during the forward passes run inside the block.

    Yields a dict filled as the model runs: ``acts[name]`` is the layer's output of the
    latest forward pass (``[batch, channels, h, w]`` for conv layers). With
    ``detach=False`` the tensors stay in the autograd graph, so objectives can use them.
    """
    if isinstance(names, str):
        names = [names]
    modules = [(n, get_layer(model, n)) for n in names]
    acts: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str) -> Callable:
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            t = _first_tensor(output)
            acts[name] = t.detach() if detach else t

        return hook

    try:
        for name, module in modules:
            handles.append(module.register_forward_hook(make_hook(name)))
        yield acts
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def replace_activation(
    model: nn.Module,
    name: str,
    value: Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]],
) -> Iterator[None]:
    """Inside the block, the output of layer ``name`` is replaced.

    ``value`` is either a tensor (broadcast-compatible with the layer's output; it must have
    the output's shape) or a function ``f(output) -> new_output``. The layer still runs;
    what it returns is discarded in favour of ``value``. Used by expanded weights to make a
    layer's activation a free tensor.
    """
    module = get_layer(model, name)

    def hook(_module: nn.Module, _inputs: object, output: object) -> torch.Tensor:
        out = _first_tensor(output)
        if callable(value) and not isinstance(value, torch.Tensor):
            return value(out)
        if tuple(value.shape) != tuple(out.shape):
            raise ValueError(
                f"replacement for layer {name!r} has shape {tuple(value.shape)}, "
                f"but the layer outputs {tuple(out.shape)}"
            )
        return value

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class _StopForward(Exception):
    """Raised from a hook to end the forward pass once every wanted layer has run."""


def run_until(
    model: nn.Module,
    inputs: torch.Tensor,
    names: Sequence[str] | str,
    detach: bool = False,
) -> dict[str, torch.Tensor]:
    """Run ``model(inputs)`` only as far as needed to compute the layers in ``names``.

    The forward pass is cut right after the last of ``names`` to be computed, so the rest
    of the network costs nothing. Returns ``{name: activation}``. Works for any model whose
    forward runs submodules in order (no hook is left behind, whatever happens).
    """
    if isinstance(names, str):
        names = [names]
    wanted = set(names)
    modules = [(n, get_layer(model, n)) for n in wanted]
    acts: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str) -> Callable:
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            t = _first_tensor(output)
            acts[name] = t.detach() if detach else t
            if wanted.issubset(acts):
                raise _StopForward

        return hook

    try:
        for name, module in modules:
            handles.append(module.register_forward_hook(make_hook(name)))
        try:
            model(inputs)
        except _StopForward:
            pass
    finally:
        for h in handles:
            h.remove()
    missing = wanted - set(acts)
    if missing:
        raise RuntimeError(
            f"layer(s) {sorted(missing)} never ran during the forward pass; they exist in the "
            "model but its forward() does not call them"
        )
    return acts


@dataclass(frozen=True)
class LayerInfo:
    """One row of :func:`list_layers`."""

    name: str
    type: str
    output_shape: tuple[int, ...] | None
    n_params: int


def list_layers(
    model: nn.Module,
    input_shape: Sequence[int] | None = None,
    leaves_only: bool = False,
) -> list[LayerInfo]:
    """List the model's named layers with their output shapes and own parameter counts.

    ``input_shape`` is one example's shape, e.g. ``(3, 224, 224)``; it defaults to the
    model's ``input_shape`` attribute when it has one. Without any, shapes are ``None``.
    Output shapes exclude the batch dimension. ``n_params`` counts only parameters that
    belong directly to the module (not its children), so the column sums to the total.
    """
    if input_shape is None:
        input_shape = getattr(model, "input_shape", None)
    shapes: dict[str, tuple[int, ...]] = {}
    named = [(n, m) for n, m in model.named_modules() if n]
    if leaves_only:
        named = [(n, m) for n, m in named if not any(True for _ in m.children())]
    if input_shape is not None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        x = torch.zeros((1, *input_shape), device=device, dtype=dtype)
        handles = []

        def make_hook(name: str) -> Callable:
            def hook(_m: nn.Module, _i: object, output: object) -> None:
                try:
                    shapes[name] = tuple(_first_tensor(output).shape[1:])
                except TypeError:
                    pass

            return hook

        was_training = model.training
        try:
            for n, m in named:
                handles.append(m.register_forward_hook(make_hook(n)))
            model.eval()
            with torch.no_grad():
                model(x)
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
    return [
        LayerInfo(
            name=n,
            type=type(m).__name__,
            output_shape=shapes.get(n),
            n_params=sum(p.numel() for p in m.parameters(recurse=False)),
        )
        for n, m in named
    ]
