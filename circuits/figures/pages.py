"""Static neuron pages: a self-contained HTML site that puts each neuron's weights in context.

For every chosen neuron, a page shows

- its *variable names*: the feature visualization (256 steps by default, cached) and, when a
  data set is available, the data set examples that activate it most — each cropped to the
  neuron's receptive field around the position of its maximum — and the examples that drive
  its pre-activation most negative (:func:`circuits.featurevis.neuron_examples`);
- its **outgoing** connections: the downstream neurons it drives most, by the L2 of the weights
  from it (direct or expanded), computed from the weights of *all* downstream neurons (the next
  paged layer, the next block, or the logits), not only from the neurons that have pages;
- its **incoming** connections, one section per upstream layer that reaches it (direct weights
  from the layer just before, expanded weights across bottlenecks and pools; a layer whose
  weights to this neuron are all zero, e.g. another branch's bottleneck, is left out): the
  top-``k`` inputs by L2, each the input neuron's feature visualization (a link to its page)
  above its weight map on the diverging palette, one colour scale per section
  (:mod:`circuits.figures.sections`). Weights with one distinct position (``1×1`` kernels, a
  ``1×1`` conv behind a pool) are drawn as signed bars;
- the NMF picture of each section with spatial structure (3 spatial factors as R, G, B) and how
  much of the weights the factors explain; when that is at least ``factor_threshold`` the cells
  are grouped by dominant factor (by L2 within a group), otherwise ordered by L2.

Every page has previous/next links and a search box (a few lines of inline JavaScript over an
inline list of the site's neurons; no network). Each layer has a page with the variable names
of all its neurons, grouped by branch.

Which neurons get pages: :func:`default_neurons` — every neuron of the paged layers when they
have at most :data:`ALL_NEURONS_UP_TO` channels in total (the bundled FashionInception:
mixed3a + mixed3b + mixed4a = 496), else :data:`SAMPLE_PER_LAYER` per layer spread over the
branches. Upstream neurons shown in a section that have no full page get a short page
(variable names, outgoing connections) so every link resolves.

Building is two steps: :func:`compute_pages` computes everything into a :class:`PageData`
(sections, outgoing connections, variable names, dataset examples), :func:`write_pages` writes
the site. The atlas computes the parts in its own tasks and joins them with
:meth:`PageData.build`. :func:`build_pages` does both steps.

No silent wrong numbers: non-finite weights, connections or activations are errors where they
are computed; a failed NMF or a non-finite render objective is a visible warning on the page;
and every number is formatted through one function that shows a flag, never ``nan``.

Every file is written atomically and ``index.html`` last. Layout of ``out_dir``::

    index.html
    layers/<layer>/index.html         layers/<layer>/<channel>.html
    img/vis/<layer>/<channel>.png     img/colorbar.png
    img/examples/<layer>/<channel>.png   (only for whole-image examples given as (indices, values))

Weight maps, NMF pictures and example crops are small PNGs inlined as ``data:`` URIs.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .._io import PathLike, atomic_write_text, check_writable
from ..datasets import DATASET_TITLES, DATASETS, load_dataset, resolve_dataset
from ..featurevis.settings import RenderSettings
from ..layers import get_layer, parse_target
from ..models import input_shape as model_input_shape
from ..wiring import (
    NeuronSpec,
    block_outputs,
    channel_counts,
    concat_branches,
    default_upstream,
    interesting_layers,
    layer_graph,
    select_neurons,
)
from .palette import diverging_rgb, to_uint8
from .raster import colorbar_rgb, png_data_uri, save_image_png, save_png, tile_images
from .sections import (
    LayerConnections,
    NeuronConnections,
    all_connections_to,
    connection_strengths,
    distinct_positions,
    layer_connections,
    output_connections,
)

__all__ = [
    "PageSettings",
    "split_overrides",
    "RENDER_KEYS",
    "PAGE_STEPS",
    "ALL_NEURONS_UP_TO",
    "SAMPLE_PER_LAYER",
    "default_neurons",
    "render_pages_images",
    "Link",
    "outgoing_connections",
    "PageData",
    "compute_pages",
    "write_pages",
    "build_pages",
    "neuron_index",
]

Downstream = dict[tuple[str, int], list[tuple[str, int, str, float]]]

#: Feature-visualization steps of the pages (48 steps are noise on the bundled model; 256 show structure).
PAGE_STEPS = 256
#: Every neuron of the paged layers gets a page when they have at most this many channels in total.
ALL_NEURONS_UP_TO = 1000
#: Neurons per layer (spread over the branches) when the paged layers have more channels than that.
SAMPLE_PER_LAYER = 16


# ----------------------------------------------------------------------------- settings


#: Render settings that may be given as plain keyword arguments where page settings are taken
#: (``build_pages(model, steps=256)``): the fields of
#: :class:`~circuits.featurevis.RenderSettings`; they go into ``PageSettings.render``.
RENDER_KEYS = RenderSettings.field_names()


def _default_render() -> dict[str, Any]:
    return {"steps": PAGE_STEPS}


@dataclass(frozen=True)
class PageSettings:
    """What the neuron pages (and the atlas, which builds the same pages) show.

    Attributes:
        top_k: connections shown per upstream layer (largest L2 of the weight slice).
        factor_threshold: group cells by NMF factor when the factors explain at least this
            fraction of the weights (else order by L2).
        n_factors: NMF factors per section.
        dataset: where dataset examples come from: ``"auto"`` (Fashion-MNIST test for
            ``1×28×28`` models when installed), ``None`` or ``False`` (none) or a name from
            :data:`circuits.datasets.DATASETS`.
        dataset_size: images of the data set scanned.
        n_examples: dataset examples per neuron (top and most negative each).
        n_outgoing: outgoing connections shown per downstream layer.
        render: feature-visualization settings: a :class:`~circuits.featurevis.RenderSettings`
            or a mapping of some of its fields (default ``{"steps": 256}``; the rest keep the
            page builder's defaults), validated when the settings are made.
        title: the site's title (default: the model class).

    Example:
        >>> s = PageSettings(top_k=12, render={"steps": 256})
        >>> PageSettings.from_dict(s.to_dict()) == s
        True
    """

    top_k: int = 50
    factor_threshold: float = 0.8
    n_factors: int = 3
    dataset: Optional[str] = "auto"
    dataset_size: int = 2000
    n_examples: int = 8
    n_outgoing: int = 16
    render: Mapping[str, Any] = field(default_factory=_default_render)
    title: Optional[str] = None

    def __post_init__(self) -> None:
        for name in ("top_k", "n_factors", "dataset_size", "n_examples", "n_outgoing"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(self.factor_threshold, (int, float)) or not 0.0 <= float(self.factor_threshold) <= 1.0:
            raise ValueError(f"factor_threshold is a fraction in [0, 1], got {self.factor_threshold!r}")
        if self.dataset is False:  # the atlas and build_pages have long spelt "no data set" False
            object.__setattr__(self, "dataset", None)
        if self.dataset not in (None, "auto") and self.dataset not in DATASETS:
            raise ValueError(f"dataset must be 'auto', None (or False) or one of {', '.join(DATASETS)}; got {self.dataset!r}")
        if isinstance(self.render, RenderSettings):
            object.__setattr__(self, "render", self.render.to_dict())
        if not isinstance(self.render, Mapping):
            raise TypeError(f"render must be a RenderSettings or a mapping of its fields, got {type(self.render).__name__}")
        bad = sorted(set(self.render) - set(RENDER_KEYS))
        if bad:
            raise ValueError(f"unknown render option(s) {bad}; known: {', '.join(RENDER_KEYS)}")
        RenderSettings.from_dict(self.render)  # a bad value fails here, not in the middle of a run
        object.__setattr__(self, "factor_threshold", float(self.factor_threshold))
        object.__setattr__(self, "render", dict(self.render))

    @property
    def render_settings(self) -> RenderSettings:
        """``render`` as a :class:`~circuits.featurevis.RenderSettings` (unset fields at their defaults)."""
        return RenderSettings.from_dict(self.render)

    def __hash__(self) -> int:  # render is a dict
        return hash(repr(self.to_dict()))

    def replace(self, **changes: Any) -> "PageSettings":
        """A copy with ``changes`` (unknown names: ``TypeError`` naming the valid ones)."""
        return PageSettings.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain JSON-serialisable values."""
        d = dataclasses.asdict(self)
        d["render"] = dict(self.render)
        return d

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "PageSettings":
        """Settings from a mapping; an unknown key is a ``TypeError`` that lists the valid keys."""
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise TypeError(f"unknown page setting(s) {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}")
        return cls(**dict(values))


def split_overrides(settings: Optional[PageSettings], overrides: Mapping[str, Any]) -> PageSettings:
    """``settings`` (default :class:`PageSettings`) with keyword ``overrides`` applied: page
    setting names replace fields, :data:`RENDER_KEYS` go into ``render``; anything else
    is a ``TypeError`` naming the valid keys."""
    base = settings if settings is not None else PageSettings()
    if not isinstance(base, PageSettings):
        raise TypeError(f"settings must be a PageSettings, got {type(base).__name__}")
    fields = {f.name for f in dataclasses.fields(PageSettings)}
    unknown = sorted(set(overrides) - fields - set(RENDER_KEYS))
    if unknown:
        raise TypeError(f"unknown setting(s) {', '.join(map(repr, unknown))}; valid: "
                        f"{', '.join(sorted(fields))} and the render settings {', '.join(RENDER_KEYS)}")
    page = {k: v for k, v in overrides.items() if k in fields}
    render = {k: v for k, v in overrides.items() if k in RENDER_KEYS}
    if render:
        page["render"] = {**dict(page.get("render", base.render)), **render}
    return base.replace(**page) if page else base


def default_neurons(model_or_counts: Union[nn.Module, Mapping[str, int]], layers: Sequence[str],
                    up_to: int = ALL_NEURONS_UP_TO, per_layer: int = SAMPLE_PER_LAYER) -> Optional[int]:
    """The neurons ``circuits explore`` pages when none are named: ``None`` (every neuron) when
    ``layers`` have at most ``up_to`` channels in total, else ``per_layer`` (that many per
    layer, evenly spread so that every branch is visited; see
    :func:`circuits.wiring.select_neurons`).

    Example:
        >>> default_neurons({"mixed3a": 112, "mixed3b": 160, "mixed4a": 224}, ["mixed3a", "mixed3b", "mixed4a"]) is None
        True
        >>> default_neurons({"mixed3a": 256, "mixed3b": 480, "mixed4a": 508}, ["mixed3a", "mixed3b", "mixed4a"])
        16
    """
    counts = channel_counts(model_or_counts) if isinstance(model_or_counts, nn.Module) else dict(model_or_counts)
    missing = [layer for layer in layers if layer not in counts]
    if missing:
        raise ValueError(f"layer(s) {missing} have no channel axis")
    return None if sum(counts[layer] for layer in layers) <= up_to else per_layer


# ----------------------------------------------------------------------------- data


def neuron_index(full: Mapping[str, Sequence[int]], sections: Mapping[tuple[str, int], Sequence[NeuronConnections]]
                 ) -> tuple[dict[str, set[int]], Downstream]:
    """Every neuron that gets a page and who lists it.

    Returns ``(known, downstream)``: ``known[layer]`` are the chosen neurons and every upstream
    neuron shown in their sections; ``downstream[(layer, c)]`` lists ``(layer', c', upstream,
    L2)`` for each chosen neuron ``layer':c'`` whose section shows ``layer:c``.
    """
    known: dict[str, set[int]] = {layer: set(chs) for layer, chs in full.items()}
    downstream: Downstream = {}
    for (layer, c), secs in sections.items():
        for sec in secs:
            known.setdefault(sec.upstream, set()).update(sec.channels)
            for i, norm in zip(sec.channels, sec.norms):
                downstream.setdefault((sec.upstream, i), []).append((layer, c, sec.upstream, float(norm)))
    return known, downstream


class Link(NamedTuple):
    """One outgoing connection: the downstream neuron ``layer:channel``, the L2 of the weights
    from the neuron to it and their signed sum (positive: it excites overall)."""

    layer: str
    channel: int
    norm: float
    total: float


#: ``{layer: (norms [n_layer, n_upstream], sums [n_layer, n_upstream])}`` per upstream layer.
ConnectionNorms = dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]


def _next_layer(model: nn.Module, layer: str) -> Optional[str]:
    """The layer ``layer``'s neurons feed when no paged layer lists it: the first later block
    (:func:`~circuits.wiring.block_outputs`) whose default upstream layers include it, else the
    first such later layer, else the model's last dense layer (the logits)."""
    graph = layer_graph(model)
    if layer not in graph.order:
        return None
    own = graph.call(layer)
    same = own.output if own is not None else None

    def alias(name: str) -> bool:  # a container returning ``layer``'s own tensor (a stage ending in this block)
        call = graph.call(name)
        return same is not None and call is not None and call.output == same

    later = [n for n in graph.order[graph.order.index(layer) + 1:] if n not in graph.input_free and not alias(n)]
    counts = channel_counts(model)
    blocks = set(block_outputs(model, graph))
    for name in [n for n in later if n in blocks] + [n for n in later if n not in blocks]:
        if name not in counts or graph.n_calls(name) != 1:
            continue
        try:
            if layer in default_upstream(model, name):
                return name
        except ValueError:
            continue
    dense = [n for n in later if n in counts and graph.n_calls(n) == 1 and (graph.output_shape(n) or (0, 0))[1:] == ()]
    return dense[-1] if dense else None


def outgoing_connections(
    model: nn.Module,
    full: Mapping[str, Sequence[int]],
    upstream: Mapping[str, Sequence[str]],
    known: Mapping[str, Sequence[int]],
    n: int = 16,
    norms: Optional[ConnectionNorms] = None,
) -> dict[tuple[str, int], list[Link]]:
    """The strongest downstream connections of every neuron in ``known``, from the weights.

    A neuron of layer ``L`` connects to every neuron of each paged layer ``D`` that shows
    ``L`` (``L in upstream[D]``); a paged layer that no paged layer shows connects to the next
    block (:func:`circuits.wiring.default_upstream` of a later layer names it) or, after the
    last block, to the model's last dense layer (the logits, :func:`output_connections`). The
    connection strength is the L2 of the weight slice from the neuron to the downstream
    neuron, over *all* downstream neurons (not only those with pages); the ``n`` strongest
    per downstream layer are kept, strongest first (zero connections never).

    Args:
        model: the model.
        full: ``{layer: [channels]}`` with full pages; ``upstream`` their upstream layers.
        known: ``{layer: [channels]}`` of every page.
        n: connections kept per neuron and downstream layer.
        norms: already computed ``{layer: {upstream: (norms, sums)}}`` over all channels of
            ``layer`` (:attr:`LayerConnections.norms`/``sums``); missing pairs are computed.
    """
    graph = layer_graph(model)
    counts = channel_counts(model)
    pairs: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
    for down, ups in upstream.items():
        if down not in full:
            continue
        for up in ups:
            if up not in known:
                continue
            given = (norms or {}).get(down, {}).get(up)
            if given is None:
                found = all_connections_to(model, up, down, graph)
                given = connection_strengths(found, counts[down], counts[up])
            pairs[(down, up)] = given
    for layer in full:
        if any(layer in upstream.get(d, ()) for d in full):
            continue
        nxt = _next_layer(model, layer)
        if nxt is None or (nxt, layer) in pairs:
            continue
        shape = graph.output_shape(nxt) or ()
        if len(shape) == 1:
            pairs[(nxt, layer)] = output_connections(model, layer, nxt)
        else:
            found = all_connections_to(model, layer, nxt, graph)
            pairs[(nxt, layer)] = connection_strengths(found, counts[nxt], counts[layer])
    out: dict[tuple[str, int], list[Link]] = {}
    for (down, up), (nm, sm) in pairs.items():
        if not (np.isfinite(nm).all() and np.isfinite(sm).all()):
            raise ValueError(f"non-finite connection strengths from {up!r} to {down!r}")
        for c in known.get(up, ()):
            col = nm[:, c]
            order = [int(d) for d in np.argsort(-col, kind="stable")[:n] if col[d] > 0]
            out.setdefault((up, int(c)), []).extend(Link(down, d, float(col[d]), float(sm[d, c])) for d in order)
    return out


def _check_finite_data(sections: Mapping[tuple[str, int], Sequence[NeuronConnections]],
                       examples: Mapping[str, Any]) -> None:
    """Raise on a non-finite number that a page would show (weights, norms, example values)."""
    for (layer, c), secs in sections.items():
        for sec in secs:
            if not (np.isfinite(np.asarray(sec.slices, dtype=np.float64)).all() and np.isfinite(sec.norms).all()
                    and math.isfinite(sec.limit)):
                raise ValueError(f"non-finite weights in the section {sec.upstream} → {layer}:{c}")
    for key, ex in examples.items():
        values = [ex.values, ex.neg_values] if hasattr(ex, "neg_values") else [ex[1]]
        if not all(np.isfinite(np.asarray(v, dtype=np.float64)).all() for v in values):
            raise ValueError(f"non-finite dataset-example activations for {key}")


@dataclass
class PageData:
    """Everything :func:`write_pages` draws; no model needed to write it.

    Attributes:
        settings: the :class:`PageSettings` it was computed with.
        title: the site's title.
        full: ``{layer: [channels]}`` of the neurons with full pages (paged layers first).
        upstream: ``{layer: [upstream layers]}`` shown on each paged layer's pages.
        counts: channels per layer.
        sections: ``{(layer, channel): [NeuronConnections, ...]}`` of the full pages.
        known: ``{layer: {channels}}`` of every page (full pages and their inputs).
        downstream: see :func:`neuron_index` (the chosen neurons that show a neuron).
        branches: ``{layer: [(branch, first channel, n)]}`` for concatenating layers.
        outgoing: ``{(layer, channel): [Link, ...]}`` (:func:`outgoing_connections`).
        images: ``{"layer:channel": image}`` feature visualizations in ``[0, 1]``.
        vis_values: ``{"layer:channel": objective value the visualization reached}``.
        vis_data_best: ``{"layer:channel": the best objective value over the data set images}``
            (where known); a visualization that does not beat it is flagged on its page.
        examples: ``{"layer:channel": NeuronExamples}`` (receptive-field crops and negative
            examples, :func:`circuits.featurevis.neuron_examples`), or the older
            ``(indices [k], values [k])`` of whole images.
        example_images: the data set images ``[N, C, H, W]`` the indices point into.
        example_labels: their class indices ``[N]`` (optional).
        class_names: names of the classes (labels, logits), optional.
        dataset_name: how the data set is named on the pages.
    """

    settings: PageSettings
    title: str
    full: dict[str, list[int]]
    upstream: dict[str, list[str]]
    counts: dict[str, int]
    sections: dict[tuple[str, int], list[NeuronConnections]]
    known: dict[str, set[int]]
    downstream: Downstream
    branches: dict[str, Optional[list[tuple[str, int, int]]]]
    outgoing: dict[tuple[str, int], list[Link]] = field(default_factory=dict)
    images: dict[str, np.ndarray] = field(default_factory=dict)
    vis_values: dict[str, float] = field(default_factory=dict)
    vis_data_best: dict[str, float] = field(default_factory=dict)
    examples: dict[str, Any] = field(default_factory=dict)
    example_images: Optional[torch.Tensor] = None
    example_labels: Optional[np.ndarray] = None
    class_names: Optional[list[str]] = None
    dataset_name: str = ""

    @classmethod
    def build(
        cls,
        model: nn.Module,
        full: Mapping[str, Sequence[int]],
        upstream: Mapping[str, Sequence[str]],
        sections: Mapping[tuple[str, int], Sequence[NeuronConnections]],
        settings: PageSettings,
        *,
        images: Optional[Mapping[str, np.ndarray]] = None,
        examples: Optional[Mapping[str, Any]] = None,
        example_images: Optional[torch.Tensor] = None,
        dataset_name: str = "",
        outgoing: Optional[Mapping[tuple[str, int], Sequence[Link]]] = None,
        norms: Optional[ConnectionNorms] = None,
        vis_values: Optional[Mapping[str, float]] = None,
        example_labels: Optional[np.ndarray] = None,
        class_names: Optional[Sequence[str]] = None,
        vis_data_best: Optional[Mapping[str, float]] = None,
    ) -> "PageData":
        """Join computed parts (sections, renders, examples) with the model's wiring.

        ``outgoing`` connections are computed from the model's weights when not given
        (:func:`outgoing_connections`, reusing ``norms`` where given). ``class_names``
        defaults to the model's ``class_names`` attribute when it has one.

        Raises:
            ValueError: a non-finite weight, norm or example activation.
        """
        known, downstream = neuron_index(full, sections)
        graph = layer_graph(model)
        _check_finite_data(sections, examples or {})
        if outgoing is None:
            outgoing = outgoing_connections(model, full, upstream, {l: sorted(c) for l, c in known.items()},
                                            n=settings.n_outgoing, norms=norms)
        names = class_names if class_names is not None else getattr(model, "class_names", None)
        return cls(
            settings=settings,
            title=settings.title or f"{type(model).__name__} neuron pages",
            full={layer: list(chs) for layer, chs in full.items()},
            upstream={layer: list(us) for layer, us in upstream.items()},
            counts=channel_counts(model),
            sections={k: list(v) for k, v in sections.items()},
            known=known,
            downstream=downstream,
            branches={layer: concat_branches(model, layer, graph) for layer in known},
            outgoing={k: list(v) for k, v in outgoing.items()},
            images=dict(images or {}),
            vis_values={k: float(v) for k, v in (vis_values or {}).items()},
            vis_data_best={k: float(v) for k, v in (vis_data_best or {}).items()},
            examples=dict(examples or {}),
            example_images=example_images,
            example_labels=None if example_labels is None else np.asarray(example_labels),
            class_names=None if names is None else [str(n) for n in names],
            dataset_name=dataset_name,
        )

    def targets(self) -> dict[str, list[int]]:
        """``{layer: [channels]}`` of every page, i.e. every variable name the site shows."""
        return {layer: sorted(chs) for layer, chs in self.known.items()}


def render_pages_images(
    model: nn.Module, targets: Mapping[str, Sequence[int]], cache: Any, render: Mapping[str, Any], progress: bool,
    reference: Optional[torch.Tensor] = None,
) -> tuple[dict[str, np.ndarray], dict[str, float], dict[str, float]]:
    """Feature visualizations of ``targets`` in one batched render, cached.

    The targets are ordered by where their layer runs in the forward pass, so each batch
    (``render`` chunks them) stops at about the same depth. Returns ``({target: image},
    {target: objective value}, {target: best objective value over the reference images})``;
    images are ``[H, W]`` or ``[H, W, 3]`` in ``[0, 1]``; the last mapping is empty without
    ``reference`` (data set images ``[N, C, H, W]`` in ``[0, 1]``). A visualization that does
    not beat its best data value is flagged on its page (and the render warns,
    :class:`~circuits.featurevis.RenderWarning`).
    """
    from ..featurevis import render as fv_render

    order = {name: i for i, name in enumerate(layer_graph(model).order)}
    names = [f"{layer}:{c}" for layer in sorted(targets, key=lambda l: order.get(l, len(order)))
             for c in sorted(targets[layer])]
    if not names:
        return {}, {}, {}
    kw = dict(render)
    result = fv_render(model, names, cache=cache, progress=progress, reference=reference, **kw)
    images, values, best = {}, {}, {}
    for i, name in enumerate(names):
        img = result.images[i].numpy()
        images[name] = img[0] if img.shape[0] == 1 else np.transpose(img, (1, 2, 0))
        values[name] = float(result.objective_values[i])
        if result.data_best is not None and math.isfinite(float(result.data_best[i])):
            best[name] = float(result.data_best[i])
    return images, values, best


def _dataset_labels(name: str, size: int) -> Optional[np.ndarray]:
    if name.startswith("fashion-mnist-"):
        from ..datasets import load_fashion_mnist

        return load_fashion_mnist(name.rsplit("-", 1)[-1])[1][:size].numpy()
    return None


def compute_pages(
    model: nn.Module,
    layers: Optional[Sequence[str]] = None,
    settings: Optional[PageSettings] = None,
    *,
    neurons: NeuronSpec = None,
    upstream: Optional[Mapping[str, Sequence[str]]] = None,
    cache: Any = True,
    images: Optional[torch.Tensor] = None,
    images_name: str = "dataset",
    sections: Optional[Mapping[str, Mapping[int, Sequence[NeuronConnections]]]] = None,
    progress: bool = True,
    **overrides: Any,
) -> PageData:
    """Compute the neuron pages of ``layers``: connections in and out, variable names, examples.

    Args:
        model: the model (eval mode; any device).
        layers: layers to page (default :func:`circuits.wiring.interesting_layers`).
        settings: :class:`PageSettings` (default settings when ``None``); keyword
            ``overrides`` replace single fields (``top_k=12``).
        neurons: which neurons get full pages, see :func:`circuits.wiring.select_neurons`
            (``None``: all; :func:`default_neurons` is the command line's rule).
        upstream: ``{layer: [upstream layers]}`` (default :func:`circuits.wiring.default_upstream`).
        cache: the feature-visualization cache (``True``: default folder; a folder; ``None``: off).
        images: dataset images ``[N, C, H, W]`` in ``[0, 1]`` for dataset examples, instead of
            ``settings.dataset``; ``images_name`` names them on the pages.
        sections: connection sections already computed with these settings,
            ``{layer: {channel: [NeuronConnections, ...]}}`` (e.g. read back from a store); a
            layer is taken from here when it covers every chosen channel, else computed.
        progress: progress bars.

    Each upstream connection is computed once (:func:`circuits.figures.sections.layer_connections`
    gives a layer's sections and the L2 of all its connections, which are also the outgoing
    connections of the upstream neurons); all feature visualizations are one batched render
    ordered by depth (:func:`render_pages_images`; on the CPU the render runs channels-last,
    :class:`circuits.featurevis.RenderSettings`); the data set is scanned once.
    """
    settings = split_overrides(settings, overrides)
    layers = list(layers) if layers else interesting_layers(model)
    for layer in layers:
        get_layer(model, layer)
    full = select_neurons(model, layers, neurons)
    ups = {layer: list(upstream[layer]) if upstream and layer in upstream else default_upstream(model, layer) for layer in full}
    for us in ups.values():
        for u in us:
            get_layer(model, u)

    given = sections or {}
    computed: dict[tuple[str, int], list[NeuronConnections]] = {}
    norms: ConnectionNorms = {}
    for layer in tqdm(list(full), desc="weights and NMF", disable=not progress, unit="layer"):
        have = given.get(layer)
        if have is not None and all(c in have for c in full[layer]):
            per = {c: list(have[c]) for c in full[layer]}
        else:
            lc: LayerConnections = layer_connections(
                model, layer, full[layer], ups[layer], top_k=settings.top_k,
                factor_threshold=settings.factor_threshold, n_factors=settings.n_factors)
            per = lc.sections
            norms[layer] = {up: (lc.norms[up], lc.sums[up]) for up in lc.norms}
        for c, secs in per.items():
            computed[(layer, c)] = secs

    known, _ = neuron_index(full, computed)
    targets = {layer: sorted(chs) for layer, chs in known.items()}
    outgoing = outgoing_connections(model, full, ups, targets, n=settings.n_outgoing, norms=norms)
    data, name, labels = None, "", None
    if images is not None:
        data, name = torch.as_tensor(images), images_name
    else:
        dataset = resolve_dataset(model_input_shape(model), settings.dataset)
        if dataset is not None:
            data, name = load_dataset(dataset, settings.dataset_size), DATASET_TITLES.get(dataset, dataset)
            labels = _dataset_labels(dataset, settings.dataset_size)
    vis, vis_values, vis_data_best = render_pages_images(model, targets, cache, settings.render, progress,
                                                           reference=data)
    examples: dict[str, Any] = {}
    if data is not None:
        from ..featurevis import neuron_examples

        examples = dict(neuron_examples(model, targets, data, k=settings.n_examples, progress=progress))
    return PageData.build(model, full, ups, computed, settings, images=vis, examples=examples,
                          example_images=data, dataset_name=name, outgoing=outgoing, vis_values=vis_values,
                          example_labels=labels, vis_data_best=vis_data_best)


# ----------------------------------------------------------------------------- html


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "_"


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _num(x: object, spec: str = ".3g", signed: bool = False) -> str:
    """A number for a page: formatted when finite, else a visible flag (never a bare ``nan``)."""
    try:
        v = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "<span class=\"flag\" title=\"not a number\">n/a</span>"
    if not math.isfinite(v):
        sign = "+" if v > 0 else "−" if v < 0 else ""
        return f"<span class=\"flag\" title=\"not a finite number\">{sign}non-finite</span>"
    return format(v, ("+" if signed else "") + spec)


def _pct(x: float) -> str:
    return _num(100 * x, ".0f") + "%" if math.isfinite(x) else _num(x)


def _css() -> str:
    return resources.files("circuits.figures").joinpath("templates/page.css").read_text(encoding="utf-8")


def _search_js() -> str:
    return resources.files("circuits.figures").joinpath("templates/search.js").read_text(encoding="utf-8")


def _doc(title: str, body: str, css: str, script: str = "") -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        "<link rel=\"icon\" href=\"data:,\">\n"
        f"<title>{_e(title)}</title>\n<style>\n{css}</style>\n</head>\n<body>\n{body}\n"
        + (f"<script>\n{script}</script>\n" if script else "")
        + "</body>\n</html>\n"
    )


def _heat_uri(slice2d: np.ndarray, limit: float) -> str:
    return png_data_uri(diverging_rgb(np.asarray(slice2d, dtype=np.float64), limit))


def _image_uri(image: object) -> str:
    return png_data_uri(to_uint8(image))


@dataclass
class _Site:
    out: Path
    css: str
    data: PageData
    search: str = ""  # the inline script (search index + code)
    layers: list[str] = field(default_factory=list)
    bad_images: set[str] = field(default_factory=set)  # visualizations with non-finite pixels (flagged, not drawn)
    dense_output: Optional[str] = None  # a downstream layer without pages (the logits): named by class

    def page(self, layer: str, c: int) -> str:
        return f"layers/{_slug(layer)}/{c}.html"

    def layer_index(self, layer: str) -> str:
        return f"layers/{_slug(layer)}/index.html"

    def vis(self, layer: str, c: int) -> str:
        return f"img/vis/{_slug(layer)}/{c}.png"

    def examples(self, layer: str, c: int) -> str:
        return f"img/examples/{_slug(layer)}/{c}.png"

    def has_page(self, layer: str, c: int) -> bool:
        return c in self.data.known.get(layer, ())

    def has_vis(self, layer: str, c: int) -> bool:
        key = f"{layer}:{c}"
        return key in self.data.images and key not in self.bad_images

    def write(self, rel: str, text: str) -> None:
        atomic_write_text(self.out / rel, text)


def _search_box(prefix: str) -> str:
    return (
        f"<div class=\"search\" data-prefix=\"{_e(prefix)}\"><input id=\"search\" type=\"search\" "
        "placeholder=\"Find a neuron: mixed3b:60, 3b:60, a class …\" autocomplete=\"off\" "
        "aria-label=\"find a neuron\"><ol id=\"results\" class=\"results\"></ol></div>"
    )


def _top_bar(site: _Site, prefix: str, crumbs: str) -> str:
    return f"<header class=\"top\"><p class=\"crumbs\">{crumbs}</p>{_search_box(prefix)}</header>"


def _vis_img(site: _Site, layer: str, c: int, prefix: str, cls: str) -> str:
    if not site.has_vis(layer, c):
        return f"<span class=\"{cls} novis\" title=\"no feature visualization\"></span>"
    return (f"<img class=\"{cls} pixel\" src=\"{prefix}{site.vis(layer, c)}\" "
            f"alt=\"feature visualization of {_e(layer)}:{c}\">")


def _name_link(site: _Site, layer: str, c: int, prefix: str, text: str, cls: str = "label") -> str:
    if site.has_page(layer, c):
        return f"<a class=\"{cls}\" href=\"{prefix}{site.page(layer, c)}\" title=\"{_e(layer)}:{c}\">{_e(text)}</a>"
    return f"<span class=\"{cls}\" title=\"{_e(layer)}:{c} (no page)\">{_e(text)}</span>"


def _thumb(site: _Site, layer: str, c: int, prefix: str, extra: str = "") -> str:
    full = c in site.data.full.get(layer, [])
    img = _vis_img(site, layer, c, prefix, "tv")
    link = f"<a href=\"{prefix}{site.page(layer, c)}\" title=\"{_e(layer)}:{c}\">{img}</a>" if site.has_page(layer, c) else img
    return (f"<div class=\"thumb{' full' if full else ''}\">{link}"
            f"{_name_link(site, layer, c, prefix, str(c))}{extra}</div>")


def _bar(value: float, limit: float) -> str:
    """A signed bar on a track centred at zero: red to the right (excites), blue to the left."""
    if not (math.isfinite(value) and math.isfinite(limit) and limit > 0):
        return "<span class=\"bar\"></span>"
    frac = min(1.0, abs(value) / limit) * 50.0
    side = "left:50%" if value >= 0 else "right:50%"
    return f"<span class=\"bar\"><span class=\"fill {'pos' if value >= 0 else 'neg'}\" style=\"{side};width:{frac:.1f}%\"></span></span>"


def _crop_strip(images: torch.Tensor, indices: np.ndarray, boxes: Optional[np.ndarray], values: np.ndarray,
                labels: Optional[np.ndarray], class_names: Optional[list[str]]) -> str:
    cells = []
    for j, i in enumerate(indices):
        img = images[int(i)]
        if boxes is not None:
            y0, y1, x0, x1 = (int(v) for v in boxes[j])
            img = img[:, y0:y1, x0:x1]
        label = ""
        if labels is not None and class_names is not None and 0 <= int(labels[int(i)]) < len(class_names):
            label = class_names[int(labels[int(i)])]
        title = f"image {int(i)}" + (f", {label}" if label else "") + (f", crop y {boxes[j][0]}–{boxes[j][1] - 1}, x {boxes[j][2]}–{boxes[j][3] - 1}" if boxes is not None else "")
        cells.append(
            f"<figure class=\"ex\" title=\"{_e(title)}\"><img class=\"pixel\" src=\"{_image_uri(img)}\" alt=\"{_e(title)}\">"
            f"<figcaption><span class=\"label\">{_num(values[j])}</span>"
            + (f"<span class=\"label cls\">{_e(label)}</span>" if label else "") + "</figcaption></figure>"
        )
    return "<div class=\"exrow\">" + "".join(cells) + "</div>"


def _hero(site: _Site, layer: str, c: int, vis_caption: str) -> str:
    data = site.data
    key = f"{layer}:{c}"
    parts = ["<div class=\"hero\">"]
    if key in data.images:
        value = data.vis_values.get(key)
        warn = ""
        if key in site.bad_images:
            warn = "<br><span class=\"flag\">the visualization has non-finite pixels; not shown</span>"
        elif value is not None and not math.isfinite(value):
            warn = "<br><span class=\"flag\">its objective value is non-finite</span>"
        elif value is not None and key in data.vis_data_best:
            best = data.vis_data_best[key]
            if value <= best:
                warn = (f"<br><span class=\"flag below-data\" title=\"more steps, another seed or other transforms "
                        f"may help\">does not beat the best {_e(data.dataset_name or 'data set')} image "
                        f"({_num(best)})</span>")
            else:
                warn = f"<br><span class=\"muted\">best {_e(data.dataset_name or 'data set')} image {_num(best)}</span>"
        reach = f"<br>objective {_num(value)}" if value is not None else ""
        img = _vis_img(site, layer, c, "../../", "vis-large")
        parts.append(f"<figure class=\"vis\">{img}<figcaption>feature visualization<br>{_e(vis_caption)}{reach}{warn}</figcaption></figure>")
    ex = data.examples.get(key)
    if ex is not None and data.example_images is not None:
        parts.append("<div class=\"examples\">")
        if hasattr(ex, "crops"):
            rf = f"{ex.rf_size[0]}×{ex.rf_size[1]} px receptive field" if ex.rf_exact else "whole images (receptive field not measured)"
            parts.append(f"<p class=\"exhead\">Top {len(ex.indices)} of {len(data.example_images)} {_e(data.dataset_name)} "
                         f"images by max activation over positions, cropped to the {rf}</p>")
            parts.append(_crop_strip(data.example_images, ex.indices, ex.crops, ex.values, data.example_labels, data.class_names))
            if len(ex.neg_indices):
                what = (f"its pre-activation <code>{_e(ex.negative_target)}</code>" if ex.negative_target != key
                        else "its activation")
                parts.append(f"<p class=\"exhead\">Most negative: the images where {what} is lowest</p>")
                parts.append(_crop_strip(data.example_images, ex.neg_indices, ex.neg_crops, ex.neg_values,
                                         data.example_labels, data.class_names))
        else:
            idx, vals = ex
            parts.append(f"<p class=\"exhead\">Top {len(idx)} {_e(data.dataset_name)} images by mean activation</p>")
            parts.append(f"<img class=\"strip pixel\" src=\"../../{site.examples(layer, c)}\" alt=\"dataset examples of {_e(key)}\">"
                         f"<p class=\"muted\">{_num(np.max(vals))} … {_num(np.min(vals))}</p>")
        parts.append("</div>")
    parts.append("</div>")
    return "".join(parts)


def _outgoing_html(site: _Site, layer: str, c: int) -> str:
    links = site.data.outgoing.get((layer, c), [])
    key = f"{layer}:{c}"
    if not links:
        return ("<h2>Outgoing</h2><p class=\"muted\">No downstream connections were computed for this neuron "
                "(its layer feeds no paged layer, block or dense output).</p>")
    groups: dict[str, list[Link]] = {}
    for link in links:
        groups.setdefault(link.layer, []).append(link)
    out = []
    for down, items in groups.items():
        n_down = site.data.counts.get(down, "?")
        if down == site.dense_output:
            what = (f"the weights from {_e(key)} through the linearised path (Σ over positions: the effect of a unit "
                    "activation everywhere)")
        else:
            what = f"the L2 of the weights from {_e(key)}; Σ is their signed sum"
        out.append(f"<h2>Outgoing → {_e(down)} <span class=\"muted\">· the {len(items)} strongest of its {n_down} "
                   f"neurons by {what}</span></h2>")
        spatial = any(site.has_vis(l.layer, l.channel) for l in items)
        limit = max(abs(l.total) for l in items) or 1.0
        if spatial:
            cells = [
                f"<div class=\"cell\">{_link_vis(site, l.layer, l.channel)}"
                f"{_name_link(site, l.layer, l.channel, '../../', str(l.channel))}"
                f"<span class=\"label num\">L2 {_num(l.norm)}</span>"
                f"<span class=\"label num {'pos' if l.total >= 0 else 'neg'}\">Σ {_num(l.total, signed=True)}</span></div>"
                for l in items
            ]
            out.append("<div class=\"cells\">" + "".join(cells) + "</div>")
        else:
            rows = []
            for l in items:
                name = str(l.channel)
                if site.data.class_names and down == site.dense_output and l.channel < len(site.data.class_names):
                    name = f"{l.channel} {site.data.class_names[l.channel]}"
                norm = "" if down == site.dense_output else f"<span class=\"label num\">L2 {_num(l.norm)}</span>"
                rows.append(f"<div class=\"barrow out{' dense' if not norm else ''}\">"
                            f"{_name_link(site, down, l.channel, '../../', name, 'label name')}{norm}"
                            f"{_bar(l.total, limit)}<span class=\"label num\">Σ {_num(l.total, signed=True)}</span></div>")
            out.append("<div class=\"bars\">" + "".join(rows) + "</div>")
    return "".join(out)


def _link_vis(site: _Site, layer: str, c: int, cls: str = "cv") -> str:
    img = _vis_img(site, layer, c, "../../", cls)
    if site.has_page(layer, c):
        return f"<a href=\"../../{site.page(layer, c)}\" title=\"{_e(layer)}:{c}\">{img}</a>"
    return img


def _section_html(site: _Site, layer: str, c: int, sec: NeuronConnections, factor_threshold: float) -> str:
    kh, kw = sec.slices.shape[1:]
    kind = "direct weights" if sec.kind == "direct" else "expanded weights"
    as_bars = distinct_positions(sec.slices) == 1 if len(sec.slices) else kh * kw == 1
    head = (
        f"<h3>{_e(sec.upstream)} → {_e(layer)}:{c} <span class=\"muted\">· {kind}, {kh}×{kw} · "
        f"top {len(sec.channels)} of {sec.n_inputs} inputs by L2</span></h3>"
    )
    info = ["<div class=\"sectionhead\">"]
    if sec.warning:
        info.append(f"<span class=\"flag\">{_e(sec.warning)}</span>")
    if sec.rgb is not None and sec.explained is not None:
        scale = max(1, 72 // max(sec.rgb.shape[:2]))
        info.append(f"<img class=\"nmf pixel\" src=\"{png_data_uri(to_uint8(sec.rgb), scale)}\" "
                    f"alt=\"NMF factors of the weights from {_e(sec.upstream)} as red, green, blue\">")
    if sec.explained is not None:
        if sec.by_factor:
            how = ("cells grouped by dominant factor (<span class=\"tag f0\">F0</span> red, <span class=\"tag f1\">F1</span> "
                   "green, <span class=\"tag f2\">F2</span> blue), by L2 within a group")
        else:
            how = f"below {_pct(factor_threshold)}, so cells are ordered by L2"
        info.append(f"<span>{site.data.settings.n_factors} NMF factors explain "
                    f"{_pct(sec.explained)} of these weights; {how}.</span>")
    elif sec.note:
        info.append(f"<span class=\"muted\">{_e(sec.note)}; ordered by L2.</span>")
    if as_bars:
        info.append(f"<span class=\"muted\">One weight per input (the same at every position): bars from −{_num(sec.limit)} "
                    f"to +{_num(sec.limit)}, red excites, blue inhibits.</span></div>")
    else:
        info.append(
            f"<span><img class=\"colorbar\" src=\"../../img/colorbar.png\" alt=\"colour scale\"> "
            f"<span class=\"muted\">−{_num(sec.limit)} … +{_num(sec.limit)} (blue inhibits, red excites)</span></span></div>"
        )
    if as_bars:
        rows = []
        for k, i in enumerate(sec.channels):
            v = float(np.asarray(sec.slices[k]).reshape(-1)[0]) if np.asarray(sec.slices[k]).size else 0.0
            tag = f"<span class=\"tag f{sec.factors[k] % 6}\">F{sec.factors[k]}</span>" if sec.factors is not None else "<span></span>"
            rows.append(f"<div class=\"barrow\">{_link_vis(site, sec.upstream, i, 'bv')}"
                        f"{_name_link(site, sec.upstream, i, '../../', str(i), 'label name')}{tag}"
                        f"{_bar(v, sec.limit)}<span class=\"label num\">{_num(v, signed=True)}</span></div>")
        return head + "".join(info) + "<div class=\"bars\">" + "".join(rows) + "</div>"
    cells = []
    for k, i in enumerate(sec.channels):
        tag = f" <span class=\"tag f{sec.factors[k] % 6}\">F{sec.factors[k]}</span>" if sec.factors is not None else ""
        cells.append(
            f"<div class=\"cell\">{_link_vis(site, sec.upstream, i)}"
            f"<img class=\"w pixel\" src=\"{_heat_uri(sec.slices[k], sec.limit)}\" alt=\"weights from {_e(sec.upstream)}:{i}\">"
            f"<span class=\"label\">{_name_link(site, sec.upstream, i, '../../', str(i), 'name')}{tag}</span>"
            f"<span class=\"label num\">L2 {_num(sec.norms[k])}</span></div>"
        )
    return head + "".join(info) + "<div class=\"cells\">" + "".join(cells) + "</div>"


def _prev_next(site: _Site, layer: str, c: int, chs: list[int]) -> str:
    i = chs.index(c)
    prev = f"<a rel=\"prev\" class=\"label\" href=\"{chs[i - 1]}.html\">← {_e(layer)}:{chs[i - 1]}</a>" if i > 0 else "<span></span>"
    nxt = f"<a rel=\"next\" class=\"label\" href=\"{chs[i + 1]}.html\">{_e(layer)}:{chs[i + 1]} →</a>" if i + 1 < len(chs) else "<span></span>"
    return f"<nav class=\"pn\">{prev}<a class=\"label\" href=\"index.html\">all of {_e(layer)}</a>{nxt}</nav>"


def _branch_of(data: PageData, layer: str, c: int) -> Optional[tuple[str, int, int]]:
    for branch, first, n in data.branches.get(layer) or []:
        if first <= c < first + n:
            return branch, first, n
    return None


def _neuron_page(site: _Site, layer: str, c: int, chs: list[int], vis_caption: str) -> str:
    data = site.data
    key = f"{layer}:{c}"
    crumbs = (f"<a href=\"../../index.html\">all layers</a> › <a href=\"index.html\">{_e(layer)}</a> › {_e(key)}")
    body = [_top_bar(site, "../../", crumbs), _prev_next(site, layer, c, chs), f"<h1>{_e(key)}</h1>"]
    br = _branch_of(data, layer, c)
    if br is not None:
        branch, first, n = br
        body.append(f"<p class=\"muted\">Channel {c - first} of branch <code>{_e(branch)}</code> "
                    f"(channels {first}–{first + n - 1} of {_e(layer)}).</p>")
    body.append(_hero(site, layer, c, vis_caption))
    body.append(_outgoing_html(site, layer, c))
    if c in data.full.get(layer, []):
        secs = data.sections.get((layer, c), [])
        body.append(f"<h2>Incoming <span class=\"muted\">· the strongest inputs from each upstream layer "
                    f"({', '.join(_e(u) for u in data.upstream.get(layer, []))})</span></h2>")
        if not secs:
            body.append("<p class=\"muted\">No upstream layer has non-zero weights to this neuron.</p>")
        for sec in secs:
            body.append(_section_html(site, layer, c, sec, data.settings.factor_threshold))
    else:
        body.append(
            "<h2>Incoming</h2><p class=\"muted\">A short page: this neuron is an input of the paged neurons. "
            "Its own inputs were not computed; page it with <code>circuits explore --neurons "
            f"{_e(key)}</code> or <code>build_pages(..., neurons=[{_e(repr(key))}])</code>.</p>"
        )
    return _doc(key, "\n".join(body), site.css, site.search)


def _layer_page(site: _Site, layer: str) -> str:
    data = site.data
    chs = sorted(data.known[layer])
    i = site.layers.index(layer)
    prev = (f"<a rel=\"prev\" class=\"label\" href=\"../{_slug(site.layers[i - 1])}/index.html\">← {_e(site.layers[i - 1])}</a>"
            if i > 0 else "<span></span>")
    nxt = (f"<a rel=\"next\" class=\"label\" href=\"../{_slug(site.layers[i + 1])}/index.html\">{_e(site.layers[i + 1])} →</a>"
           if i + 1 < len(site.layers) else "<span></span>")
    body = [_top_bar(site, "../../", f"<a href=\"../../index.html\">all layers</a> › {_e(layer)}"),
            f"<nav class=\"pn\">{prev}<a class=\"label\" href=\"../../index.html\">all layers</a>{nxt}</nav>",
            f"<h1>{_e(layer)}</h1>"]
    n_full = len([c for c in chs if c in data.full.get(layer, [])])
    body.append(f"<p>{len(chs)} of its {data.counts.get(layer, '?')} neurons have pages here: {n_full} full pages "
                f"(blue frame) and {len(chs) - n_full} short pages of inputs. Each picture is the neuron's feature "
                "visualization; click it for the neuron's page.</p>")
    groups: list[tuple[str, list[int]]] = []
    branches = data.branches.get(layer) or []
    if branches:
        for branch, first, n in branches:
            mine = [c for c in chs if first <= c < first + n]
            if mine:
                groups.append((f"{branch} · channels {first}–{first + n - 1}", mine))
    else:
        groups.append(("", chs))
    for title, mine in groups:
        if title:
            body.append(f"<h2>{_e(title)}</h2>")
        body.append("<div class=\"grid\">" + "".join(_thumb(site, layer, c, "../../") for c in mine) + "</div>")
    return _doc(layer, "\n".join(body), site.css, site.search)


def _search_index(data: PageData, layers: list[str]) -> str:
    """The inline search script: the site's neurons (with a hint: the class most of a neuron's
    top examples belong to, when labels are known) and the search code."""
    entries = []
    for layer in layers:
        chs = sorted(data.known[layer])
        hints: dict[str, str] = {}
        if data.example_labels is not None and data.class_names:
            for c in chs:
                ex = data.examples.get(f"{layer}:{c}")
                idx = getattr(ex, "indices", None) if ex is not None else None
                if idx is None and isinstance(ex, tuple):
                    idx = ex[0]
                if idx is None or not len(idx):
                    continue
                counts = Counter(int(data.example_labels[int(i)]) for i in idx)
                label, n = counts.most_common(1)[0]
                if n * 2 > len(idx) and 0 <= label < len(data.class_names):
                    hints[str(c)] = data.class_names[label]
        entries.append([layer, _slug(layer), chs, hints])
    return "var CIRCUITS_NEURONS = " + json.dumps(entries, separators=(",", ":")) + ";\n" + _search_js()


# ----------------------------------------------------------------------------- write


def _site_layers(data: PageData) -> list[str]:
    return list(data.full) + [l for l in data.known if l not in data.full]


def write_pages(data: PageData, out_dir: PathLike, progress: bool = True) -> Path:
    """Write the site for ``data`` into ``out_dir`` and return the path of ``index.html``.

    Every file is written atomically; ``index.html`` is written last.
    """
    out = check_writable(out_dir)
    settings = data.settings
    layers = _site_layers(data)
    site = _Site(out, _css(), data, layers=layers)
    site.search = _search_index(data, layers)
    site.dense_output = next(
        (l.layer for links in data.outgoing.values() for l in links if l.layer not in data.known), None)
    save_png(colorbar_rgb(), out / "img/colorbar.png")
    for name, image in tqdm(data.images.items(), desc="images", disable=not progress, leave=False):
        t = parse_target(name)
        if not np.isfinite(np.asarray(image, dtype=np.float64)).all():
            site.bad_images.add(name)
            continue
        save_image_png(image, out / site.vis(t.layer, t.channel))  # type: ignore[arg-type]
    for name, ex in data.examples.items():
        if data.example_images is None:
            raise ValueError("PageData has dataset examples but no example_images to draw them from")
        if not hasattr(ex, "crops"):
            t = parse_target(name)
            strip = tile_images([data.example_images[int(j)] for j in ex[0]], pad=1)
            save_png(strip, out / site.examples(t.layer, t.channel))  # type: ignore[arg-type]

    steps = settings.render.get("steps", PAGE_STEPS)
    vis_caption = f"{steps} steps, seed {settings.render.get('seed', 0)}"
    for layer in tqdm(layers, desc="pages", disable=not progress, unit="layer"):
        chs = sorted(data.known[layer])
        for c in chs:
            site.write(site.page(layer, c), _neuron_page(site, layer, c, chs, vis_caption))
        site.write(site.layer_index(layer), _layer_page(site, layer))

    rows = []
    for layer in layers:
        n_full = len(data.full.get(layer, []))
        outs = sorted({l.layer for (lay, _c), links in data.outgoing.items() if lay == layer for l in links})
        rows.append(
            f"<tr><td><a href=\"{site.layer_index(layer)}\">{_e(layer)}</a></td><td>{data.counts.get(layer, '?')}</td>"
            f"<td>{n_full}</td><td>{len(data.known[layer]) - n_full}</td>"
            f"<td>{_e(', '.join(data.upstream[layer])) if layer in data.upstream else ''}</td>"
            f"<td>{_e(', '.join(outs))}</td></tr>"
        )
    samples = []
    for layer in data.full:
        chs = data.full[layer]
        pick = [chs[int(i)] for i in np.linspace(0, len(chs) - 1, min(len(chs), 12)).round().astype(int)] if chs else []
        samples.append(f"<h3><a href=\"{site.layer_index(layer)}\">{_e(layer)}</a> <span class=\"muted\">· "
                       f"{len(chs)} full pages</span></h3><div class=\"grid\">"
                       + "".join(_thumb(site, layer, c, "") for c in dict.fromkeys(pick)) + "</div>")
    body = [
        _top_bar(site, "", f"{_e(data.title)}"),
        f"<h1>{_e(data.title)}</h1>",
        "<p>Each neuron page shows the neuron's variable names (feature visualization"
        + (", the dataset examples that activate it most, cropped to its receptive field, and those that drive it most "
           "negative" if data.examples else "")
        + "), its <b>outgoing</b> connections (the downstream neurons it drives most) and, for every upstream layer that "
        "connects to it, its strongest <b>incoming</b> connections by the L2 norm of their weights: the input neuron's "
        "feature visualization above its weight map (red excites, blue inhibits, one colour scale per section). "
        "Weights across bottlenecks and pools are <em>expanded weights</em> (the linearised path: ReLU → identity, "
        "max pool → average pool). Search for a neuron above (<code>mixed3b:60</code>, <code>3b:60</code>"
        + (", or a class its top examples belong to" if data.example_labels is not None else "") + ").</p>",
        "<h2>Layers</h2><table class=\"layers\"><tr><th>layer</th><th>channels</th><th>full pages</th>"
        "<th>input pages</th><th>upstream layers shown</th><th>outgoing to</th></tr>" + "".join(rows) + "</table>",
        "<h2>Neurons</h2>" + "".join(samples),
        f"<p class=\"muted\">Feature visualizations: {_e(vis_caption)}. Top {settings.top_k} incoming connections per "
        f"upstream layer, {settings.n_outgoing} outgoing per downstream layer; cells grouped by NMF factor when "
        f"{settings.n_factors} factors explain ≥ {_pct(settings.factor_threshold)} of the weights.</p>",
    ]
    index = out / "index.html"
    site.write("index.html", _doc(data.title, "\n".join(body), site.css, site.search))
    return index


# ----------------------------------------------------------------------------- build

def build_pages(
    model: nn.Module,
    layers: Optional[Sequence[str]] = None,
    out_dir: PathLike = "circuits-pages",
    settings: Optional[PageSettings] = None,
    *,
    neurons: NeuronSpec = None,
    upstream: Optional[Mapping[str, Sequence[str]]] = None,
    cache: Any = True,
    dataset: Union[None, bool, str, torch.Tensor] = None,
    dataset_name: Optional[str] = None,
    progress: bool = True,
    **overrides: Any,
) -> Path:
    """Build the static neuron pages for ``layers`` and return the path of ``index.html``.

    :func:`compute_pages` then :func:`write_pages`; the output folder is checked to be
    writable before any work starts.

    Args:
        model: the model (eval mode; any device).
        layers: layers to page (default :func:`circuits.wiring.interesting_layers`).
        out_dir: output folder (created).
        settings: :class:`PageSettings`; keyword ``overrides`` replace single fields
            (``top_k=12``, ``render={"steps": 256}``; ``render_kwargs=`` is an alias of ``render=``).
        neurons, upstream, cache, progress: see :func:`compute_pages`.
        dataset: images ``[N, C, H, W]`` in ``[0, 1]`` for dataset examples (named by
            ``dataset_name``), a data set name, ``None`` (``"auto"``: Fashion-MNIST test for
            ``1×28×28`` models when installed) or ``False`` (no dataset examples).

    Example:
        >>> index = build_pages(model, ["mixed3b"], "pages/", neurons=4, render={"steps": 256})  # doctest: +SKIP
    """
    if "render_kwargs" in overrides:
        overrides["render"] = overrides.pop("render_kwargs") or {}
    precomputed = overrides.pop("precomputed", None)
    if precomputed is not None:
        warnings.warn("build_pages(precomputed=...) is deprecated; use compute_pages(..., sections=...) and "
                      "write_pages, or PageData.build", DeprecationWarning, stacklevel=2)
    images = None
    if isinstance(dataset, torch.Tensor):
        images = dataset
    elif dataset is False:
        overrides["dataset"] = None
    elif dataset is True or dataset is None:
        overrides.setdefault("dataset", "auto")
    else:
        overrides["dataset"] = dataset
    check_writable(out_dir)
    data = compute_pages(model, layers, settings, neurons=neurons, upstream=upstream, cache=cache, images=images,
                         images_name=dataset_name or "dataset", sections=precomputed, progress=progress, **overrides)
    return write_pages(data, out_dir, progress=progress)
