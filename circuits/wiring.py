"""Model wiring: how the named layers of any model feed each other.

One probe forward pass (zeros of the model's input shape, eval mode, no gradients) records,
for every named module and every call of it, the tensors it received and returned and their
shapes: a :class:`LayerGraph`. Everything that needs to know how a model is wired asks it:

* :func:`channel_counts` — channels of every layer;
* :func:`concat_branches` — the branches a concatenating layer (an Inception block) joins;
* :func:`adjacent_conv` — the one convolution that connects two layers directly, if any
  (then the weights between them are that kernel; otherwise they are expanded weights);
* :func:`block_outputs`, :func:`interesting_layers`, :func:`default_upstream` — which layers
  are worth a page and which upstream layers each page shows;
* :func:`select_neurons` — a neuron selection resolved to ``{layer: [channels]}``.

The graph is cached per model (weakly) and input shape; pass ``refresh=True`` after changing
a model's modules. A module called several times in one forward pass has one entry per call;
``name#k`` (k = 1, 2, ...) names its k-th call.

Example:
    >>> import circuits
    >>> model = circuits.load_model()
    >>> channel_counts(model)["mixed3b"]
    160
    >>> " ".join(name for name, first, n in concat_branches(model, "mixed3a"))
    'mixed3a_1x1 mixed3a_3x3 mixed3a_5x5 mixed3a_pool_reduce'
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .layers import LayerCall, check_channel, example_input, get_layer, layer_names, parse_neuron, split_call, structure_key, trace
from .layouts import get_layouts

__all__ = [
    "Call",
    "LayerGraph",
    "layer_graph",
    "channel_counts",
    "concat_branches",
    "adjacent_conv",
    "block_outputs",
    "interesting_layers",
    "default_upstream",
    "select_neurons",
    "NeuronSpec",
    "ELEMENTWISE_MODULES",
]

NeuronSpec = Union[None, int, Sequence[str], Mapping[str, Sequence[int]]]

#: Modules that act elementwise on one tensor (a conv followed by one of these is still "direct").
ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Identity,
)

_LUCID_MAIN = re.compile(r"^(conv2d\d+|mixed\d+[a-z])$")
_LUCID_BRANCH_INPUTS = ("_3x3_bottleneck", "_5x5_bottleneck")


@dataclass(frozen=True)
class Call:
    """One call of a named module in the probe forward pass.

    ``inputs``/``output`` are tensor numbers (equal numbers: the same tensor object);
    ``input_shape``/``output_shape`` include the batch dimension (1). ``output`` is ``None``
    when the module returned no tensor (then the first tensor of a returned tuple is used,
    as :func:`circuits.layers.capture` does).
    """

    inputs: tuple[int, ...]
    output: Optional[int]
    input_shape: tuple[int, ...]
    output_shape: Optional[tuple[int, ...]]


@dataclass
class LayerGraph:
    """What one probe forward pass says about a model's named layers.

    Attributes:
        input_shape: one example's input ``(C, H, W)`` the probe used.
        calls: ``{name: [Call, ...]}`` for every named module that ran, in call order.
        order: names in the order of their first call.
        producers: ``{tensor number: [names]}`` of the modules whose call returned that
            tensor, outermost first (a container returns its last child's tensor).
        input_free: names of the modules whose output does not depend on the model's input
            (the same for a second probe input): computed from parameters and buffers alone,
            e.g. Swin V2's position-bias MLP ``attn.cpb_mlp``. They are not layers of the
            network's data path: never paged, never upstream or downstream of a layer.
    """

    input_shape: tuple[int, ...]
    calls: dict[str, list[Call]]
    order: list[str]
    producers: dict[int, list[str]] = field(default_factory=dict)
    input_free: frozenset = frozenset()

    def call(self, name: str) -> Optional[Call]:
        """The call ``name`` (``"layer"`` when called once, ``"layer#k"`` for the k-th call);
        ``None`` when it never ran or a bare name was called several times."""
        base, k = split_call(name)
        calls = self.calls.get(base, [])
        if k is None:
            return calls[0] if len(calls) == 1 else None
        return calls[k - 1] if 1 <= k <= len(calls) else None

    def n_calls(self, name: str) -> int:
        """How often the module ``name`` ran in the probe pass."""
        return len(self.calls.get(split_call(name)[0], []))

    def output_shape(self, name: str) -> Optional[tuple[int, ...]]:
        """Output shape without the batch dimension, or ``None``."""
        c = self.call(name)
        return None if c is None or c.output_shape is None else tuple(c.output_shape[1:])

    def producer(self, tensor: int, exclude: Iterable[str] = ()) -> Optional[str]:
        """The outermost named module that returned ``tensor`` (skipping ``exclude``)."""
        skip = set(exclude)
        return next((n for n in self.producers.get(tensor, []) if n not in skip), None)


_GRAPHS: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, LayerGraph]]" = weakref.WeakKeyDictionary()


def layer_graph(model: nn.Module, input_shape: Optional[Sequence[int]] = None, refresh: bool = False) -> LayerGraph:
    """The :class:`LayerGraph` of ``model`` at ``input_shape`` (default: the model's), cached.

    Built from one :func:`circuits.layers.trace` (a forward pass in eval mode, flags restored,
    hooks removed), and a second with another input to find :attr:`LayerGraph.input_free`
    modules. The cache follows the model's structure: swapping a submodule for another
    re-probes; ``refresh=True`` forces it.
    """
    x = example_input(model, input_shape)
    key = (structure_key(model), tuple(x.shape[1:]), str(x.dtype))
    per_model = _GRAPHS.setdefault(model, {})
    if not refresh and key in per_model:
        return per_model[key]
    numbers: dict[int, int] = {id(x): 0}

    def number(t: torch.Tensor) -> int:
        return numbers.setdefault(id(t), len(numbers))

    records = trace(model, x)  # keeps every tensor alive, so ids stay unique while numbering
    calls: dict[str, list[Call]] = {}
    order: list[str] = []
    for rec in records:
        call = Call(
            inputs=tuple(number(t) for t in rec.inputs),
            output=None if rec.output is None else number(rec.output),
            input_shape=tuple(rec.inputs[0].shape) if rec.inputs else (),
            output_shape=None if rec.output is None else tuple(rec.output.shape),
        )
        if rec.module_name not in calls:
            order.append(rec.module_name)
        calls.setdefault(rec.module_name, []).append(call)
    rank = {n: i for i, (n, _) in enumerate(model.named_modules())}
    producers: dict[int, list[str]] = {}
    for name, cs in calls.items():
        for c in cs:
            if c.output is not None and name not in producers.setdefault(c.output, []):
                producers[c.output].append(name)
    for names in producers.values():
        names.sort(key=lambda n: rank[n])
    graph = LayerGraph(tuple(x.shape[1:]), calls, order, producers, _input_free(records, trace(model, 1.0 - x)))
    per_model[key] = graph
    return graph


def _input_free(first: Sequence[LayerCall], second: Sequence[LayerCall]) -> frozenset:
    """Names whose every call returned the same tensor values for two different inputs."""

    def outputs(records: Sequence[LayerCall]) -> dict[str, list[Optional[torch.Tensor]]]:
        by_name: dict[str, list[Optional[torch.Tensor]]] = {}
        for rec in records:
            by_name.setdefault(rec.module_name, []).append(rec.output)
        return by_name

    again = outputs(second)
    return frozenset(
        name for name, a in outputs(first).items()
        if len(a) == len(again.get(name, [])) and all(
            u is not None and v is not None and u.shape == v.shape and torch.equal(u, v) for u, v in zip(a, again[name]))
    )


def channel_counts(model: nn.Module, input_shape: Optional[Sequence[int]] = None) -> dict[str, int]:
    """``{layer: channels}`` for every layer with an activation layout (the feature axis of
    :mod:`circuits.layouts`: dim 1 of a conv map, the last axis of a token or channels-last
    activation); a module that runs several times has one entry per call (``name#k``)."""
    return {name: lay.channels for name, lay in get_layouts(model, None, input_shape).items()}


def concat_branches(model: nn.Module, layer: str, graph: Optional[LayerGraph] = None) -> Optional[list[tuple[str, int, int]]]:
    """When ``layer`` concatenates named layers along channels (an Inception block), its
    branches as ``[(branch layer, first channel, n channels)]`` in channel order; else ``None``.

    The concatenating module's inputs are matched (by identity) to the outputs of the
    model's named layers in the probe pass.
    """
    get_layer(model, layer)
    graph = graph or layer_graph(model)
    call = graph.call(layer)
    if call is None or len(call.inputs) < 2 or call.output_shape is None or len(call.output_shape) < 2:
        return None
    out, offset = [], 0
    for t in call.inputs:
        name = graph.producer(t, exclude=[layer])
        shape = graph.output_shape(name) if name is not None else None
        if not shape:
            return None
        out.append((name, offset, int(shape[0])))
        offset += int(shape[0])
    return out if offset == call.output_shape[1] else None


def _simple_conv(module: Optional[nn.Module]) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups == 1 and tuple(module.dilation) == (1, 1)


def adjacent_conv(
    model: nn.Module, upstream: str, layer: str, graph: Optional[LayerGraph] = None
) -> Optional[nn.Conv2d]:
    """The ``Conv2d`` (no groups, no dilation) that maps ``upstream``'s output straight to
    ``layer``, else ``None``.

    Adjacent means: ``layer`` is that conv and its input *is* ``upstream``'s output tensor;
    or ``layer`` is an elementwise activation module (:data:`ELEMENTWISE_MODULES`) whose
    input is the output of such a conv, e.g. ``mixed3b_3x3_bottleneck → mixed3b_3x3``. The
    weights between adjacent layers are the conv's kernel; anything else (several layers,
    concatenations, pools, normalisations between) needs expanded weights.
    """
    modules = dict(model.named_modules())
    get_layer(model, upstream), get_layer(model, layer)
    graph = graph or layer_graph(model)
    up, here = graph.call(upstream), graph.call(layer)
    if up is None or up.output is None or here is None:
        return None

    def conv_from_upstream(name: str) -> Optional[nn.Conv2d]:
        c = graph.call(name)
        m = modules.get(name)
        if _simple_conv(m) and c is not None and c.inputs == (up.output,):
            return m  # type: ignore[return-value]
        return None

    conv = conv_from_upstream(layer)
    if conv is not None:
        return conv
    if isinstance(get_layer(model, layer), ELEMENTWISE_MODULES) and len(here.inputs) == 1:  # 'module#k' too
        for name in graph.producers.get(here.inputs[0], []):
            conv = conv_from_upstream(name)
            if conv is not None:
                return conv
    return None


# ----------------------------------------------------------------------------- layers worth a page


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _composite(module: nn.Module) -> bool:
    return any(True for _ in module.children()) and any(True for _ in module.parameters())


def _depth(module: nn.Module) -> int:
    kids = list(module.children())
    return 1 + max(_depth(k) for k in kids) if kids else 0


def _called_children(module: nn.Module, prefix: str, graph: LayerGraph) -> list[str]:
    names = [f"{prefix}.{n}" if prefix else n for n, _ in module.named_children()]
    return sorted((n for n in names if n in graph.calls), key=graph.order.index)


def _is_chain(names: Sequence[str], graph: LayerGraph) -> bool:
    """Whether each of ``names`` (once-called modules) takes the previous one's output."""
    calls = [graph.call(n) for n in names]
    if len(calls) < 2 or any(c is None or c.output is None for c in calls):
        return False
    return all(b.inputs[:1] == (a.output,) for a, b in zip(calls, calls[1:]))  # type: ignore[union-attr]


def _holds_stage(module: nn.Module) -> bool:
    """Whether a container below ``module`` repeats a deep block (a stage of blocks)."""
    for m in module.modules():
        if m is module or not isinstance(m, _CONTAINERS):
            continue
        kinds = [type(k) for k in m.children() if _composite(k) and _depth(k) >= 2]
        if len(kinds) != len(set(kinds)):
            return True
    return False


def block_outputs(model: nn.Module, graph: Optional[LayerGraph] = None) -> list[str]:
    """The model's blocks in forward order, found from its module tree and the probe pass.

    Containers (``nn.Sequential``, ``ModuleList``, ``ModuleDict`` and their subclasses) whose
    children run as a chain (each taking the previous one's output) are stages: their
    composite children (modules with parameters and children: a ResNet ``BasicBlock``, a
    ConvNeXt ``CNBlock``, a ViT encoder layer, an ``MBConv``...) are the blocks. A composite
    module that is no container is a block itself, unless it holds a stage of deep blocks
    (a ViT ``Encoder``), which is then searched. A model without composite modules (VGG,
    AlexNet) gives the activation modules that follow its convolutions. Only modules called
    once whose output has a channel/token axis (``[batch, C, ...]``, 3-D or more) count.
    """
    graph = graph or layer_graph(model)
    modules = dict(model.named_modules())

    def units(name: str) -> list[str]:
        out: list[str] = []
        kids = _called_children(modules[name], name, graph)
        for k in kids:
            m = modules[k]
            if not _composite(m) or graph.n_calls(k) != 1:
                continue
            if isinstance(m, _CONTAINERS):
                inner = [c for c in _called_children(m, k, graph) if graph.n_calls(c) == 1]
                deeper = units(k) if _is_chain(inner, graph) else []
                out += deeper or [k]
            elif _holds_stage(m):
                out += units(k) or [k]
            else:
                out.append(k)
        return out

    def spatial(name: str) -> bool:
        shape = graph.output_shape(name)
        return shape is not None and len(shape) >= 2 and graph.n_calls(name) == 1

    blocks = [b for b in units("") if spatial(b)]
    if len(blocks) >= 2:
        return blocks
    # no blocks: the activation after each convolution (or the convolution itself)
    order = [n for n in graph.order if n and not any(True for _ in modules[n].children())]
    acts = []
    for i, n in enumerate(order):
        if isinstance(modules[n], nn.Conv2d):
            nxt = order[i + 1] if i + 1 < len(order) else None
            follows = nxt is not None and isinstance(modules[nxt], ELEMENTWISE_MODULES) and graph.call(nxt) is not None \
                and graph.call(nxt).inputs[:1] == (graph.call(n).output,)  # type: ignore[union-attr]
            acts.append(nxt if follows else n)
    return [a for a in acts if a is not None and spatial(a)] or blocks


def _evenly(items: Sequence[str], n: int) -> list[str]:
    if len(items) <= n:
        return list(items)
    return [items[min(len(items) - 1, int(round(i * (len(items) - 1) / (n - 1))))] for i in range(n)] if n > 1 else [items[-1]]


def interesting_layers(model: nn.Module, n: int = 3) -> list[str]:
    """The layers ``circuits explore`` pages by default.

    InceptionV1-style models (Lucid names): the ``mixed*`` blocks up to the first 4-block
    (``mixed3a, mixed3b, mixed4a``). Any other model: ``n`` block outputs
    (:func:`block_outputs`) spread evenly from the second block to the last, so that each
    has an upstream block to show.
    """
    names = layer_names(model)
    lucid = [name for name in names if _LUCID_MAIN.match(name)]
    mixed = [name for name in lucid if name.startswith("mixed")]
    if mixed:
        early = [name for name in mixed if name[5:6] == "3"] + [name for name in mixed if name[5:6] == "4"][:1]
        return early or mixed[:3]
    blocks = block_outputs(model)
    if len(blocks) >= 2:
        return _evenly(blocks[1:], n)
    if lucid:
        return lucid[-n:]
    raise ValueError(
        f"{type(model).__name__} has no chain of blocks to page by default; name the layers "
        "(CLI: --layers LAYER ...; Python: layers=[...])"
    )


def default_upstream(model: nn.Module, layer: str) -> list[str]:
    """Upstream layers shown on ``layer``'s pages.

    InceptionV1-style names: the previous main layer (``conv2d*``/``mixed*``; expanded
    weights across the block) and the block's own bottlenecks (``<layer>_3x3_bottleneck``,
    ``<layer>_5x5_bottleneck``; direct weights). Any other model: the previous block
    (:func:`block_outputs`), or the previous layer with channels when ``layer`` is no block.
    """
    names = layer_names(model)
    get_layer(model, layer)  # UnknownLayerError with close matches
    main = [n for n in names if _LUCID_MAIN.match(n)]
    ups: list[str] = []
    if layer in main and main.index(layer) > 0:
        ups.append(main[main.index(layer) - 1])
    ups += [layer + s for s in _LUCID_BRANCH_INPUTS if layer + s in names]
    if ups:
        return ups
    graph = layer_graph(model)
    blocks = block_outputs(model, graph)
    if layer in blocks and blocks.index(layer) > 0:
        return [blocks[blocks.index(layer) - 1]]
    before = [n for n in graph.order
              if n != layer and graph.output_shape(n) and graph.n_calls(n) == 1 and n not in graph.input_free]
    if layer in graph.order:
        before = before[: graph.order.index(layer)]
        earlier_blocks = [b for b in blocks if b in before]
        if earlier_blocks:
            return [earlier_blocks[-1]]
    raise ValueError(
        f"no default upstream layer for {layer!r} (it is the first block); name one "
        "(CLI: --upstream LAYER; Python: upstream={layer: [LAYER]})"
    )


def select_neurons(model_or_counts: Union[nn.Module, Mapping[str, int]], layers: Sequence[str], neurons: NeuronSpec = None) -> dict[str, list[int]]:
    """Resolve a neuron selection to ``{layer: [channels]}``.

    ``neurons`` is ``None`` (every channel of every layer), an ``int`` ``n`` (``n`` channels
    per layer, evenly spaced so that every branch of a mixed block is visited), a list of
    targets (``"mixed3b:12"``; their layers are added to ``layers``; a target with a position
    is refused: pages show whole channels) or a mapping ``{layer: [channels]}``.
    """
    counts = channel_counts(model_or_counts) if isinstance(model_or_counts, nn.Module) else dict(model_or_counts)
    chosen: dict[str, list[int]] = {}

    def n_of(layer: str) -> int:
        if layer not in counts:
            if isinstance(model_or_counts, nn.Module):
                get_layer(model_or_counts, layer)  # raises UnknownLayerError with close matches
            raise ValueError(f"layer {layer!r} has no channel axis (its output shape is unknown)")
        return counts[layer]

    for layer in layers:
        n_of(layer)
    if neurons is None:
        return {layer: list(range(n_of(layer))) for layer in layers}
    if isinstance(neurons, bool) or (isinstance(neurons, int) and neurons < 1):
        raise ValueError(f"neurons must be a positive number per layer, a list of 'layer:channel' or a mapping; got {neurons!r}")
    if isinstance(neurons, int):
        for layer in layers:
            n = n_of(layer)
            k = min(neurons, n)
            chosen[layer] = sorted({min(n - 1, int((i + 0.5) * n / k)) for i in range(k)})
        return chosen
    items: list[tuple[str, int]]
    if isinstance(neurons, Mapping):
        items = [(layer, int(c)) for layer, chs in neurons.items() for c in chs]
    else:
        if isinstance(neurons, str):
            neurons = [neurons]
        items = []
        for spec in neurons:
            items.append(parse_neuron(spec, "a page shows a whole channel"))
    for layer in layers:
        chosen.setdefault(layer, [])
    for layer, c in items:
        check_channel(layer, c, n_of(layer))
        if c not in chosen.setdefault(layer, []):
            chosen[layer].append(c)
    return {layer: sorted(chs) for layer, chs in chosen.items() if chs}
