"""Named layers: look up, list, capture, replace, and stop the forward pass early.

A *layer* is the output of a named submodule of any ``torch.nn.Module``; its name is the
module's own dotted name (``model.named_modules()``). For the bundled InceptionV1 and the
project's trained models these are Lucid's names (``conv2d2``, ``mixed3b``,
``mixed3b_5x5_bottleneck`` ...), each the activation *after* the ReLU.

**Per-call names.** A module may run several times in one forward pass (torchvision's
ResNet blocks call their one ``relu`` three times). Each call is a layer of its own,
``name#k`` with ``k`` counted from 1 in the order the calls finish: ``layer1.0.relu#2`` is
the second ReLU of that block. A bare name means the module's *only* call; for a module
that runs more than once every function here refuses it with an
:class:`AmbiguousLayerError` that lists the ``#k`` names. Calls are counted from the start
of each forward pass of the model given. :func:`list_layers` and
:func:`layer_names` (with an input shape) list the per-call names.

Every hook lives inside a context manager and is removed on every exit path, exceptions
included::

    with capture(model, ["mixed3a", "mixed3b"]) as acts:
        model(x)
    acts["mixed3b"].shape        # [batch, channels, h, w]

    acts = run_until(model, x, ["mixed3a"])   # stops right after mixed3a
    acts = run_until(resnet, x, ["layer1.0.relu#2"])

How a layer's activation is laid out (``[B, C, H, W]``, channels-last, tokens, dense) is
:mod:`circuits.layouts`' business; this module hands over the tensors as the model made them.
"""

from __future__ import annotations

import contextlib
import difflib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from .models import device_and_dtype
from .models import input_shape as declared_input_shape

__all__ = [
    "UnknownLayerError",
    "AmbiguousLayerError",
    "LayerInfo",
    "LayerCall",
    "Target",
    "get_layer",
    "layer_names",
    "list_layers",
    "split_call",
    "per_call_name",
    "structure_key",
    "call_counts",
    "example_input",
    "trace",
    "capture",
    "replace_activation",
    "run_until",
    "parse_target",
    "parse_neuron",
    "check_channel",
    "centre",
]

_CALLS_ATTR = "_circuits_calls"  # per-model cache of call counts, stored on the model itself


class UnknownLayerError(KeyError):
    """A layer name that the model does not have; the message lists the closest names."""

    def __init__(self, name: str, candidates: Sequence[str], hint: str | None = None):
        self.name = name
        close = difflib.get_close_matches(name, list(candidates), n=5, cutoff=0.5)
        if not close:  # fall back to prefix/substring matches, useful for "mixed3" etc.
            close = [c for c in candidates if name and (c.startswith(name) or name in c)][:5]
        if hint is None:
            hint = f"({len(candidates)} layers; list them with circuits.layer_names(model))"
        did_you_mean = f" Did you mean: {', '.join(close)}?" if close else ""
        msg = f"unknown layer {name!r}.{did_you_mean} {hint}"
        super().__init__(msg)
        self.message = msg
        self.close_matches = close

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.message


class AmbiguousLayerError(ValueError):
    """A bare layer name for a module that runs more than once per forward pass.

    ``n_calls`` is the number of calls when it is known, else ``None`` (then the module was
    seen running at least twice).
    """

    def __init__(self, name: str, n_calls: int | None):
        self.name, self.n_calls = name, n_calls
        if n_calls is not None:
            names = ", ".join(f"{name}#{k}" for k in range(1, n_calls + 1))
            msg = f"layer {name!r} runs {n_calls} times in one forward pass; name one call: {names}"
        else:
            msg = (
                f"layer {name!r} runs more than once in one forward pass; name one call: "
                f"{name}#1, {name}#2, ... (circuits.list_layers(model, input_shape) lists them)"
            )
        super().__init__(msg)


def split_call(name: str) -> tuple[str, int | None]:
    """Split a per-call layer name: ``"layer1.0.relu#2"`` → ``("layer1.0.relu", 2)``.

    A name without ``#`` gives ``(name, None)``: the module's only call.

    Example:
        >>> split_call("layer1.0.relu#2"), split_call("mixed3a")
        (('layer1.0.relu', 2), ('mixed3a', None))
    """
    if not isinstance(name, str):
        raise TypeError(f"a layer name is a string, got {type(name).__name__}")
    base, sep, index = name.rpartition("#")
    if not sep:
        return name, None
    if not base or not index.isdigit() or int(index) < 1:
        raise ValueError(f"bad layer name {name!r}: a call is named 'module#k' with k = 1, 2, ... (the k-th call)")
    return base, int(index)


def _call_name(module_name: str, call: int, n_calls: int) -> str:
    return module_name if n_calls <= 1 else f"{module_name}#{call}"


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """Return the submodule called ``name`` (a ``#k`` call suffix is allowed and ignored);
    raise :class:`UnknownLayerError` with close matches."""
    base, _ = split_call(name)
    modules = dict(model.named_modules())
    if base and base in modules:
        return modules[base]
    raise UnknownLayerError(name, [n for n in modules if n])


def _parse_names(model: nn.Module, names: Sequence[str]) -> list[tuple[str, str, int | None]]:
    """``[(given name, module name, call or None)]``; unknown modules raise."""
    modules = dict(model.named_modules())
    sites = []
    for given in names:
        base, call = split_call(given)
        if not base or base not in modules:
            raise UnknownLayerError(given, [n for n in modules if n])
        sites.append((given, base, call))
    return sites


# --------------------------------------------------------------------------- call counts


def structure_key(model: nn.Module) -> int:
    """A key that changes when a submodule is added, removed or swapped for another type;
    what is remembered about a model's forward pass (call counts, layouts) is keyed by it."""
    return hash(tuple((n, type(m)) for n, m in model.named_modules()))


def _known_counts(model: nn.Module) -> dict[str, int]:
    entry = model.__dict__.get(_CALLS_ATTR)
    if entry is not None and entry[0] == structure_key(model):
        return entry[1]
    return {}


def _remember_counts(model: nn.Module, counts: dict[str, int]) -> None:
    fingerprint = structure_key(model)
    entry = model.__dict__.get(_CALLS_ATTR)
    merged = dict(entry[1]) if entry is not None and entry[0] == fingerprint else {}
    merged.update(counts)
    # a plain attribute of builtins: it dies with the model, survives deepcopy, pickles anywhere
    model.__dict__[_CALLS_ATTR] = (fingerprint, merged)


def per_call_name(name: str, n_calls: int) -> str:
    """The name that addresses ``name``'s call in a module that runs ``n_calls`` times per
    forward pass: the bare module name when it runs once, else ``module#k``.

    A bare name of a module that runs more than once raises :class:`AmbiguousLayerError`;
    a call past the last raises :class:`UnknownLayerError` naming the valid ones.

    Example:
        >>> per_call_name("layer1.0.relu#2", 3), per_call_name("fc#1", 1)
        ('layer1.0.relu#2', 'fc')
    """
    base, call = split_call(name)
    if call is None:
        if n_calls > 1:
            raise AmbiguousLayerError(base, n_calls)
        return base
    if call > max(n_calls, 1):
        valid = [f"{base}#{k}" for k in range(1, n_calls + 1)] if n_calls > 1 else [base]
        raise UnknownLayerError(
            name, valid, hint=f"(module {base!r} runs {n_calls} time(s) in one forward pass; valid: {', '.join(valid)})"
        )
    return base if n_calls <= 1 else f"{base}#{call}"


def _check_against_counts(sites: Sequence[tuple[str, str, int | None]], counts: dict[str, int]) -> None:
    for given, base, _ in sites:
        if base in counts:
            per_call_name(given, counts[base])


def call_counts(model: nn.Module, inputs: torch.Tensor | None = None, input_shape: Sequence[int] | None = None) -> dict[str, int]:
    """How many times each named module runs in one forward pass (``0``: it does not run).

    Counted once by :func:`trace` (``inputs``, else an :func:`example_input`) and remembered on
    the model until its module tree changes.
    """
    counts = _known_counts(model)
    modules = [n for n, _ in model.named_modules() if n]
    if not all(n in counts for n in modules):
        trace(model, inputs, input_shape=input_shape)
        counts = _known_counts(model)
    return {n: counts.get(n, 0) for n in modules}


@dataclass(frozen=True)
class Target:
    """What a request points at: a whole layer, ``layer:channel``, optionally a position.

    ``parse_target("mixed4a:476")`` → ``Target("mixed4a", 476)``;
    ``parse_target("mixed4a:476@3,4")`` → the neuron at ``(y=3, x=4)``;
    ``parse_target("layer1.0.relu#2:5@1,1")`` → channel 5 of the block's second ReLU call.
    The channel is always the feature axis and ``(y, x)`` a position on the spatial or
    patch grid, whatever the layer's layout (:mod:`circuits.layouts`).
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


_TARGET_FORMS = "'layer', 'layer:channel', 'layer:channel@y,x' (layer may be 'module#k', the k-th call)"


def parse_target(spec: Union[str, Target]) -> Target:
    """Parse ``"layer"``, ``"layer:channel"`` or ``"layer:channel@y,x"`` into a :class:`Target`.

    ``layer`` may name one call of a module that runs several times: ``"layer1.0.relu#2:5"``.
    """
    if isinstance(spec, Target):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a target is {_TARGET_FORMS}; got {spec!r}")
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
        raise ValueError(f"target {spec!r} has no layer name; a target is {_TARGET_FORMS}")
    split_call(text)  # a malformed '#k' fails here, with its own message
    return Target(text, channel, position)


def parse_neuron(spec: Union[str, Target], why: str = "a weight does not depend on it") -> tuple[str, int]:
    """Parse a whole-channel neuron ``"layer:channel"`` into ``(layer, channel)``.

    A layer without a channel, or a position (``"@y,x"``), is a ``ValueError``; ``why`` says
    in the message why the caller has no use for a position (weights, pages and weight
    figures treat a channel as one neuron at every position).

    Example:
        >>> parse_neuron("mixed3b:12")
        ('mixed3b', 12)
    """
    t = parse_target(spec)
    if t.channel is None:
        raise ValueError(f"{str(spec)!r} names a layer, not a neuron: use 'layer:channel', e.g. mixed3b:12")
    if t.position is not None:
        raise ValueError(
            f"{str(spec)!r} has a position, but {why}; drop '@y,x' (positions are for feature "
            "visualization and per-example connections)"
        )
    return t.layer, t.channel


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


# --------------------------------------------------------------------------- probe forward


def example_input(model: nn.Module, input_shape: Sequence[int] | None = None, batch: int = 1) -> torch.Tensor:
    """A fixed-seed uniform ``[batch, *input_shape]`` tensor on the model's device and dtype.

    ``input_shape`` is one example's shape, e.g. ``(3, 224, 224)``; by default
    :func:`circuits.models.input_shape` (the model's ``input_shape`` attribute, else what the
    model states about itself).
    """
    shape = tuple(int(v) for v in input_shape) if input_shape is not None else declared_input_shape(model)
    device, dtype = device_and_dtype(model)
    x = torch.rand((batch, *shape), generator=torch.Generator().manual_seed(0))
    return x.to(device=device, dtype=dtype)


@dataclass(frozen=True, eq=False)
class LayerCall:
    """One call of one module during a :func:`trace`d forward pass.

    ``name`` is the layer name that addresses this call: the module name when the module
    runs once, ``module_name#call`` when it runs ``n_calls > 1`` times. ``inputs`` are the
    tensors it was called with (positional, then keyword), ``output`` its (first) output
    tensor, or ``None`` when it returns no tensor.
    """

    name: str
    module_name: str
    call: int
    n_calls: int
    module: nn.Module
    inputs: tuple[torch.Tensor, ...]
    output: Optional[torch.Tensor]


def trace(model: nn.Module, inputs: torch.Tensor | None = None, *, input_shape: Sequence[int] | None = None) -> list[LayerCall]:
    """Run one forward pass (eval mode, no grad) and record every module call, in the order
    the calls finish.

    ``inputs`` default to :func:`example_input` ``(model, input_shape)``. The model's
    train/eval flags are restored afterwards; the call counts are remembered on the model
    (:func:`call_counts`). The records keep the tensors, so keep the batch small.
    """
    if inputs is None:
        inputs = example_input(model, input_shape)
    named = [(n, m) for n, m in model.named_modules() if n]
    raw: list[tuple[str, int, nn.Module, tuple, Optional[torch.Tensor]]] = []
    counts: dict[str, int] = {}

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            counts[name] = counts.get(name, 0) + 1
            tensors = tuple(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
            try:
                out = _first_tensor(output)
            except TypeError:
                out = None
            raw.append((name, counts[name], module, tensors, out))

        return hook

    modes = {m: m.training for m in model.modules()}
    handles = []
    try:
        for name, module in named:
            handles.append(module.register_forward_hook(make_hook(name), with_kwargs=True))
        model.eval()
        with torch.no_grad():
            model(inputs)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    _remember_counts(model, {n: counts.get(n, 0) for n, _ in named})
    return [
        LayerCall(_call_name(name, k, counts[name]), name, k, counts[name], module, tensors, out)
        for name, k, module, tensors, out in raw
    ]


# --------------------------------------------------------------------------- hooks per call


class _Calls:
    """Counts the calls of the requested modules within each forward pass of the model and
    hands the requested ones to ``on_call(given_name, output)``."""

    def __init__(self, model: nn.Module, sites: list[tuple[str, str, int | None]], on_call: Callable):
        self.model, self.sites, self.on_call = model, sites, on_call
        known = _known_counts(model)
        _check_against_counts(sites, known)
        self.by_module: dict[str, list[tuple[str, str, int | None]]] = {}
        for site in sites:
            self.by_module.setdefault(site[1], []).append(site)
        self.unknown = {base for base in self.by_module if base not in known}
        # a bare name can be acted on at once only when the module is known to run once
        self.bare_unknown = {base for _, base, call in sites if call is None and base in self.unknown}
        self.counters = dict.fromkeys(self.by_module, 0)
        self.repeated: set[str] = set()

    def start(self, _module: nn.Module, _args: object) -> None:
        self.counters = dict.fromkeys(self.by_module, 0)

    def finish(self, _module: nn.Module, _args: object, _output: object) -> None:
        if self.unknown:
            _remember_counts(self.model, {b: self.counters[b] for b in self.unknown})
            self.unknown = set()
            self.bare_unknown = set()
        for _, base, call in self.sites:
            if call is None and self.counters[base] > 1:
                raise AmbiguousLayerError(base, self.counters[base])

    def hook(self, base: str) -> Callable:
        def hook(_module: nn.Module, _inputs: object, output: object) -> object:
            count = self.counters[base] = self.counters.get(base, 0) + 1
            result = None
            for given, _, call in self.by_module[base]:
                if call is None and count > 1:
                    self.repeated.add(base)
                    continue
                if count != (call or 1):
                    continue
                replaced = self.on_call(given, output if result is None else result)
                if replaced is not None:
                    result = replaced
            return result

        return hook

    def raise_if_ambiguous(self) -> None:
        """For forward passes cut short (so :meth:`finish` never ran) that saw a bare name twice."""
        for base in sorted(self.repeated):
            n = _known_counts(self.model).get(base)
            raise AmbiguousLayerError(base, n if n is not None and n > 1 else None)


@contextlib.contextmanager
def _on_calls(model: nn.Module, names: Sequence[str], on_call: Callable) -> Iterator[_Calls]:
    calls = _Calls(model, _parse_names(model, names), on_call)
    modules = dict(model.named_modules())
    handles = []
    try:
        handles.append(model.register_forward_pre_hook(calls.start))
        handles.append(model.register_forward_hook(calls.finish))
        for base in calls.by_module:
            handles.append(modules[base].register_forward_hook(calls.hook(base)))
        yield calls
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def capture(
    model: nn.Module, names: Sequence[str] | str, detach: bool = False
) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of several layers during the forward passes run inside the block.

    Yields a dict filled as the model runs: ``acts[name]`` is the layer's output of the
    latest forward pass, as the model made it (``[batch, channels, h, w]`` for conv layers;
    :mod:`circuits.layouts` describes the others). ``name`` may be a per-call name
    ``module#k``; a bare name of a module that runs more than once raises
    :class:`AmbiguousLayerError`. With ``detach=False`` the tensors stay in the autograd
    graph, so objectives can use them.
    """
    if isinstance(names, str):
        names = [names]
    acts: dict[str, torch.Tensor] = {}

    def record(given: str, output: object) -> None:
        t = _first_tensor(output)
        acts[given] = t.detach() if detach else t

    with _on_calls(model, names, record) as calls:
        yield acts
        calls.raise_if_ambiguous()


@contextlib.contextmanager
def replace_activation(
    model: nn.Module,
    name: str,
    value: Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]],
) -> Iterator[None]:
    """Inside the block, the output of layer ``name`` is replaced.

    ``value`` is either a tensor (it must have the output's shape, in the layer's own layout;
    :meth:`circuits.layouts.Layout.from_canonical` builds one from ``[B, C, H, W]``) or a
    function ``f(output) -> new_output``. The layer still runs; what it returns is discarded
    in favour of ``value`` (for a module returning a tuple, its first element). ``name`` may
    be a per-call name ``module#k``: only that call is replaced. Used by expanded weights to
    make a layer's activation a free tensor.
    """

    def replace(_given: str, output: object) -> object:
        out = _first_tensor(output)
        if callable(value) and not isinstance(value, torch.Tensor):
            new = value(out)
        else:
            if tuple(value.shape) != tuple(out.shape):
                raise ValueError(
                    f"replacement for layer {name!r} has shape {tuple(value.shape)}, "
                    f"but the layer outputs {tuple(out.shape)}"
                )
            new = value
        if isinstance(output, tuple):
            return (new, *output[1:])
        return new

    with _on_calls(model, [name], replace) as calls:
        yield
        calls.raise_if_ambiguous()


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
    of the network costs nothing. Returns ``{name: activation}``. ``names`` may be per-call
    names (``layer1.0.relu#2``). The first time a bare name is asked of a model, the pass
    runs to the end to make sure the module runs only once (a module running more than
    once raises :class:`AmbiguousLayerError`); later calls stop early. Works for any model
    whose forward runs submodules in order (no hook is left behind, whatever happens).
    """
    if isinstance(names, str):
        names = [names]
    wanted = list(dict.fromkeys(names))
    acts: dict[str, torch.Tensor] = {}
    state: list[_Calls] = []

    def record(given: str, output: object) -> None:
        t = _first_tensor(output)
        acts[given] = t.detach() if detach else t
        if len(acts) == len(wanted) and not state[0].bare_unknown:
            raise _StopForward

    with _on_calls(model, wanted, record) as calls:
        state.append(calls)
        try:
            model(inputs)
        except _StopForward:
            pass
        calls.raise_if_ambiguous()
    missing = [n for n in wanted if n not in acts]
    if missing:
        counts = _known_counts(model)
        detail = "; ".join(
            f"{n} (module {split_call(n)[0]!r} runs {counts[split_call(n)[0]]} time(s) per forward pass)"
            for n in missing
            if counts.get(split_call(n)[0])
        )
        raise RuntimeError(
            f"layer(s) {missing} never ran during the forward pass; they exist in the "
            "model but its forward() does not call them" + (f": {detail}" if detail else "")
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
    With a shape, one :func:`trace`\\ d forward pass gives the shapes, and a module that runs
    ``n > 1`` times gets one row per call (``layer1.0.relu#1`` … ``#n``, its parameters
    counted on the first). Output shapes exclude the batch dimension. ``n_params`` counts
    only parameters that belong directly to the module (not its children), so the column
    sums to the total.
    """
    if input_shape is None:
        input_shape = getattr(model, "input_shape", None)
    named = [(n, m) for n, m in model.named_modules() if n]
    if leaves_only:
        named = [(n, m) for n, m in named if not any(True for _ in m.children())]
    calls: dict[str, list[LayerCall]] = {}
    if input_shape is not None:
        for c in trace(model, input_shape=input_shape):
            calls.setdefault(c.module_name, []).append(c)
    rows = []
    for n, m in named:
        own = sum(p.numel() for p in m.parameters(recurse=False))
        for i, c in enumerate(calls.get(n) or [None]):
            rows.append(
                LayerInfo(
                    name=c.name if c is not None else n,
                    type=type(m).__name__,
                    output_shape=tuple(c.output.shape[1:]) if c is not None and c.output is not None else None,
                    n_params=own if i == 0 else 0,
                )
            )
    return rows


def layer_names(model: nn.Module, input_shape: Sequence[int] | None = None) -> list[str]:
    """All named submodules of ``model`` in registration order (the root module excluded).

    With ``input_shape`` (one example's shape), a module that runs ``n > 1`` times in a
    forward pass is listed once per call, ``name#1`` … ``name#n`` — names that
    :func:`capture` and :func:`run_until` accept without ambiguity.
    """
    if input_shape is None:
        return [name for name, _ in model.named_modules() if name]
    return [row.name for row in list_layers(model, input_shape)]
