"""The architecture as a graph, traced from one forward pass.

:func:`trace_graph` runs the model once on a dummy (or given) input with a forward hook on
every leaf module (modules without children, plus ``Concat``-like modules that have no
children either) and a :class:`torch.overrides.TorchFunctionMode` that tracks which module
produced each tensor, through any functional op in between (``torch.flatten``, ``x + y``,
in-place adds). An edge ``a → b`` means a tensor computed from module ``a``'s output is an
input of module ``b``. Nodes are in execution order; hooks and the mode live only inside
the call.

:func:`graph_to_dot` writes Graphviz DOT text; :func:`plot_graph` draws boxes and arrows
with matplotlib, layered by depth from the input and coloured by a statistic of each
module's weight (``"std"``, ``"spectral_norm"``, ``"dead_fraction"`` ... from
:func:`circuits.inspect.stats.weight_stats`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..figures.smallmultiples import FigureResult
from .stats import StatsTable, weight_stats

__all__ = ["GraphNode", "ArchGraph", "trace_graph", "graph_to_dot", "plot_graph"]


@dataclass
class GraphNode:
    """One module call: name, class, output shape, parameter count, colour value."""

    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int
    value: float = math.nan


@dataclass
class ArchGraph:
    """Nodes in execution order (``"input"`` first) and edges ``(source, target)``."""

    nodes: list[GraphNode]
    edges: list[tuple[str, str]]
    color_by: Optional[str] = None
    meta: dict[str, Any] = field(default_factory=dict)

    def node(self, name: str) -> GraphNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def depths(self) -> dict[str, int]:
        """Longest-path depth of each node from the input (for a layered layout)."""
        depth = {n.name: 0 for n in self.nodes}
        order = {n.name: i for i, n in enumerate(self.nodes)}
        for src, dst in sorted(self.edges, key=lambda e: order[e[1]]):
            depth[dst] = max(depth[dst], depth[src] + 1)
        return depth


class _Provenance(TorchFunctionMode):
    """Maps ``id(tensor)`` → set of producing node names, through every torch function."""

    def __init__(self, sources: dict[int, frozenset[str]], keep: list):
        super().__init__()
        self.sources = sources
        self.keep = keep

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        srcs: set[str] = set()
        for a in tree_flatten((args, kwargs))[0]:
            if isinstance(a, torch.Tensor):
                srcs |= self.sources.get(id(a), frozenset())
        if srcs:
            for o in tree_flatten(out)[0]:
                if isinstance(o, torch.Tensor):
                    self.sources[id(o)] = frozenset(srcs)
                    self.keep.append(o)
        return out


def _leaf_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n and not any(True for _ in m.children())]


def trace_graph(model: nn.Module, example: Optional[torch.Tensor] = None,
                color_by: Optional[str] = "std", stats: Optional[StatsTable] = None) -> ArchGraph:
    """Trace ``model``'s module graph from one forward pass.

    Args:
        model: any module; leaf modules become nodes.
        example: an input batch; default zeros of ``[1, *circuits.models.input_shape(model)]``.
        color_by: a :class:`~circuits.inspect.stats.LayerStats` field (``"std"``,
            ``"spectral_norm"``, ``"fro_norm"``, ``"dead_fraction"`` ...) of each module's
            ``weight``, or ``None``.
        stats: a precomputed table (else computed with ``weight_stats(model)``).
    """
    from ..models import input_shape

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if example is None:
        example = torch.zeros(1, *input_shape(model), device=device)
    leaves = _leaf_modules(model)
    sources: dict[int, frozenset[str]] = {id(example): frozenset({"input"})}
    keep: list = [example]
    nodes = [GraphNode("input", "Input", tuple(example.shape), 0)]
    edges: list[tuple[str, str]] = []
    seen_edges: set[tuple[str, str]] = set()
    calls: dict[str, int] = {}

    def make_hook(name: str, module: nn.Module):
        def hook(_m: nn.Module, args: tuple, output: Any) -> None:
            k = calls.get(name, 0)
            calls[name] = k + 1
            node_name = name if k == 0 else f"{name}#{k}"
            srcs: set[str] = set()
            for a in tree_flatten(args)[0]:
                if isinstance(a, torch.Tensor):
                    srcs |= sources.get(id(a), frozenset())
            for s in sorted(srcs):
                if (s, node_name) not in seen_edges:
                    seen_edges.add((s, node_name))
                    edges.append((s, node_name))
            outs = [o for o in tree_flatten(output)[0] if isinstance(o, torch.Tensor)]
            for o in outs:
                sources[id(o)] = frozenset({node_name})
                keep.append(o)
            shape = tuple(outs[0].shape) if outs else ()
            nodes.append(GraphNode(node_name, type(module).__name__, shape,
                                   sum(p.numel() for p in module.parameters(recurse=False))))

        return hook

    handles = []
    was_training = model.training
    try:
        for name, module in leaves:
            handles.append(module.register_forward_hook(make_hook(name, module)))
        model.eval()
        with torch.no_grad(), _Provenance(sources, keep):
            out = model(example)
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        if outs:
            srcs = sources.get(id(outs[0]), frozenset())
            nodes.append(GraphNode("output", "Output", tuple(outs[0].shape), 0))
            edges += [(s, "output") for s in sorted(srcs)]
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    graph = ArchGraph(nodes, edges, color_by)
    if color_by:
        table = stats if stats is not None else weight_stats(model, spectral="auto" if "spectral" in color_by else "none")
        by_name = {r.name: r for r in table}
        for n in nodes:
            rec = by_name.get(n.name.split("#")[0] + ".weight")
            if rec is not None:
                v = getattr(rec, color_by)
                n.value = float(v) if isinstance(v, (int, float)) else math.nan
    return graph


def _colors(graph: ArchGraph, cmap: str = "viridis") -> dict[str, Optional[tuple[float, float, float, float]]]:
    import matplotlib

    vals = np.array([n.value for n in graph.nodes], dtype=np.float64)
    finite = vals[np.isfinite(vals)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    cm = matplotlib.colormaps[cmap]
    out = {}
    for n in graph.nodes:
        if math.isfinite(n.value):
            out[n.name] = cm(0.5 if hi == lo else (n.value - lo) / (hi - lo))
        else:
            out[n.name] = None
    return out


def _label(n: GraphNode, color_by: Optional[str]) -> list[str]:
    lines = [n.name, n.kind, "x".join(map(str, n.output_shape))]
    if n.params:
        lines.append(f"{n.params:,} params")
    if color_by and math.isfinite(n.value):
        lines.append(f"{color_by}={n.value:.3g}")
    return lines


def graph_to_dot(graph: ArchGraph, cmap: str = "viridis") -> str:
    """Graphviz DOT text (boxes labelled name / type / output shape / params, filled by value)."""
    colors = _colors(graph, cmap)

    def q(s: str) -> str:
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = ["digraph model {", "  rankdir=TB;", '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];']
    for n in graph.nodes:
        c = colors[n.name]
        fill = "#%02x%02x%02x" % tuple(int(255 * v) for v in c[:3]) if c else "#eeeeee"
        font = "white" if c and (0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]) < 0.5 else "black"
        label = "\\n".join(s.replace('"', "'") for s in _label(n, graph.color_by))
        lines.append(f'  {q(n.name)} [label="{label}", fillcolor="{fill}", fontcolor="{font}"];')
    for a, b in graph.edges:
        lines.append(f"  {q(a)} -> {q(b)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def plot_graph(graph: Union[ArchGraph, nn.Module], cmap: str = "viridis", max_width: int = 8) -> FigureResult:
    """Draw the graph: one row per depth level, boxes coloured by ``graph.color_by``.

    ``data = {"positions": {name: (x, y)}, "edges": [...], "values": {name: value}}``.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    if isinstance(graph, nn.Module):
        graph = trace_graph(graph)
    depth = graph.depths()
    levels: dict[int, list[str]] = {}
    for n in graph.nodes:
        levels.setdefault(depth[n.name], []).append(n.name)
    width = max(len(v) for v in levels.values())
    pos = {}
    for d, names in levels.items():
        for i, name in enumerate(names):
            pos[name] = ((i - (len(names) - 1) / 2) * 2.6, -d * 1.3)
    colors = _colors(graph, cmap)
    fig_w = min(max(6.0, 2.6 * width), 2.6 * max_width * 2)
    fig, ax = plt.subplots(figsize=(fig_w, max(4.0, 1.0 * len(levels) + 1)))
    for a, b in graph.edges:
        (x0, y0), (x1, y1) = pos[a], pos[b]
        ax.annotate("", xy=(x1, y1 + 0.38), xytext=(x0, y0 - 0.38),
                    arrowprops=dict(arrowstyle="->", color="#666666", lw=0.7, shrinkA=0, shrinkB=0))
    for n in graph.nodes:
        x, y = pos[n.name]
        c = colors[n.name] or (0.93, 0.93, 0.93, 1.0)
        ax.add_patch(FancyBboxPatch((x - 1.15, y - 0.38), 2.3, 0.76, boxstyle="round,pad=0.02",
                                    facecolor=c, edgecolor="#333333", lw=0.6))
        dark = (0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]) < 0.5
        ax.text(x, y, "\n".join(_label(n, graph.color_by)), ha="center", va="center", fontsize=4.5,
                color="white" if dark else "black")
    xs = [p[0] for p in pos.values()]
    ys = [p[1] for p in pos.values()]
    ax.set_xlim(min(xs) - 1.4, max(xs) + 1.4)
    ax.set_ylim(min(ys) - 0.6, max(ys) + 0.6)
    ax.axis("off")
    if graph.color_by:
        vals = [n.value for n in graph.nodes if math.isfinite(n.value)]
        if vals:
            import matplotlib as mpl

            sm = mpl.cm.ScalarMappable(cmap=cmap, norm=mpl.colors.Normalize(min(vals), max(vals)))
            fig.colorbar(sm, ax=ax, fraction=0.02, label=f"weight {graph.color_by}")
    fig.tight_layout()
    return FigureResult(fig, {"positions": pos, "edges": list(graph.edges), "values": {n.name: n.value for n in graph.nodes}})
