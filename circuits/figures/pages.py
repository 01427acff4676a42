"""Static neuron pages: a self-contained HTML site that puts each neuron's weights in context.

For every chosen neuron, a page shows

- its *variable names*: the feature visualization and, when a data set is available, the
  data set images that activate it most (Fashion-MNIST test images for FashionInception);
- every upstream layer that matters (direct weights from the layer just before, expanded
  weights across bottlenecks and pools; a layer whose weights to this neuron are all zero,
  e.g. another branch's bottleneck, is left out): the top-``k`` connections by L2, each the
  upstream neuron's feature visualization (a link to its page) above its weight map on the
  diverging palette, one colour scale per section (:mod:`circuits.figures.sections`);
- the NMF picture of each section (3 spatial factors as R, G, B) and how much of the weights
  the factors explain; when that is at least ``factor_threshold`` the cells are ordered by
  factor (grouped by dominant factor), otherwise by L2;
- links to the downstream neurons whose pages list it.

Building is two steps: :func:`compute_pages` computes everything into a :class:`PageData`
(sections, variable names, dataset examples), :func:`write_pages` writes the site. The atlas
computes the parts in its own tasks and joins them with :meth:`PageData.build`.
:func:`build_pages` does both steps.

Upstream neurons that were not chosen get a short page (variable names and downstream links)
so every link resolves. The site has an ``index.html``, one index per layer, and images as
relative PNG files; no JavaScript, no network, no external CSS. Every file is written
atomically and ``index.html`` last.

Layout of ``out_dir``::

    index.html
    layers/<layer>/index.html         layers/<layer>/<channel>.html
    img/vis/<layer>/<channel>.png     img/examples/<layer>/<channel>.png
    img/w/<layer>/<channel>/<upstream>/<in_channel>.png
    img/nmf/<layer>/<channel>/<upstream>.png
"""

from __future__ import annotations

import dataclasses
import html
import re
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .._io import PathLike, atomic_write_text, check_writable
from ..datasets import DATASET_TITLES, DATASETS, load_dataset, resolve_dataset
from ..featurevis.settings import RenderSettings
from ..layers import get_layer, parse_target
from ..models import input_shape as model_input_shape
from ..wiring import NeuronSpec, channel_counts, concat_branches, default_upstream, interesting_layers, layer_graph, select_neurons
from .raster import colorbar_rgb, save_heatmap_png, save_image_png, save_png, save_rgb_png, tile_images
from .sections import NeuronConnections, layer_sections

__all__ = [
    "PageSettings",
    "split_overrides",
    "RENDER_KEYS",
    "PageData",
    "compute_pages",
    "write_pages",
    "build_pages",
    "neuron_index",
]

Downstream = dict[tuple[str, int], list[tuple[str, int, str, float]]]


# ----------------------------------------------------------------------------- settings


#: Render settings that may be given as plain keyword arguments where page settings are taken
#: (``build_pages(model, steps=256)``): the fields of
#: :class:`~circuits.featurevis.RenderSettings`; they go into ``PageSettings.render``.
RENDER_KEYS = RenderSettings.field_names()


@dataclass(frozen=True)
class PageSettings:
    """What the neuron pages (and the atlas, which builds the same pages) show.

    Attributes:
        top_k: connections shown per upstream layer (largest L2 of the weight slice).
        factor_threshold: order cells by NMF factor when the factors explain at least this
            fraction of the weights (else by L2).
        n_factors: NMF factors per section.
        dataset: where dataset examples come from: ``"auto"`` (Fashion-MNIST test for
            ``1×28×28`` models when installed), ``None`` or ``False`` (none) or a name from
            :data:`circuits.datasets.DATASETS`.
        dataset_size: images of the data set scanned.
        n_examples: dataset examples per neuron.
        render: feature-visualization settings: a :class:`~circuits.featurevis.RenderSettings`
            or a mapping of some of its fields (e.g. ``{"steps": 256, "seed": 0}``; the rest
            keep the page builder's defaults), validated when the settings are made.
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
    render: Mapping[str, Any] = field(default_factory=dict)
    title: Optional[str] = None

    def __post_init__(self) -> None:
        for name in ("top_k", "n_factors", "dataset_size", "n_examples"):
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
        downstream: see :func:`neuron_index`.
        branches: ``{layer: [(branch, first channel, n)]}`` for concatenating layers.
        images: ``{"layer:channel": [C, H, W] in [0, 1]}`` feature visualizations.
        examples: ``{"layer:channel": (indices [k], values [k])}`` top dataset images.
        example_images: the data set images ``[N, C, H, W]`` the indices point into.
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
    images: dict[str, np.ndarray] = field(default_factory=dict)
    examples: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    example_images: Optional[torch.Tensor] = None
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
        examples: Optional[Mapping[str, tuple[np.ndarray, np.ndarray]]] = None,
        example_images: Optional[torch.Tensor] = None,
        dataset_name: str = "",
    ) -> "PageData":
        """Join computed parts (sections, renders, examples) with the model's wiring."""
        known, downstream = neuron_index(full, sections)
        graph = layer_graph(model)
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
            images=dict(images or {}),
            examples=dict(examples or {}),
            example_images=example_images,
            dataset_name=dataset_name,
        )

    def targets(self) -> dict[str, list[int]]:
        """``{layer: [channels]}`` of every page, i.e. every variable name the site shows."""
        return {layer: sorted(chs) for layer, chs in self.known.items()}


def _render_variable_names(model: nn.Module, targets: Mapping[str, Sequence[int]], cache: Any,
                           render: Mapping[str, Any], progress: bool) -> dict[str, np.ndarray]:
    from ..featurevis import variable_names

    images: dict[str, np.ndarray] = {}
    layers = [layer for layer in targets if targets[layer]]
    for layer in tqdm(layers, desc="feature visualizations", disable=not progress, unit="layer"):
        kw = dict(render)
        kw.setdefault("progress", progress)
        images.update(variable_names(model, [f"{layer}:{c}" for c in targets[layer]], cache=cache, **kw))
    return images


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
    """Compute the neuron pages of ``layers``: connection sections, variable names, examples.

    Args:
        model: the model (eval mode; any device).
        layers: layers to page (default :func:`circuits.wiring.interesting_layers`).
        settings: :class:`PageSettings` (default settings when ``None``); keyword
            ``overrides`` replace single fields (``top_k=12``).
        neurons: which neurons get full pages, see :func:`circuits.wiring.select_neurons`
            (``None``: all).
        upstream: ``{layer: [upstream layers]}`` (default :func:`circuits.wiring.default_upstream`).
        cache: the feature-visualization cache (``True``: default folder; a folder; ``None``: off).
        images: dataset images ``[N, C, H, W]`` in ``[0, 1]`` for dataset examples, instead of
            ``settings.dataset``; ``images_name`` names them on the pages.
        sections: connection sections already computed with these settings,
            ``{layer: {channel: [NeuronConnections, ...]}}`` (e.g. read back from a store); a
            layer is taken from here when it covers every chosen channel, else computed.
        progress: progress bars.
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
    for layer in tqdm(list(full), desc="weights and NMF", disable=not progress, unit="layer"):
        have = given.get(layer)
        if have is not None and all(c in have for c in full[layer]):
            per = {c: list(have[c]) for c in full[layer]}
        else:
            per = layer_sections(model, layer, full[layer], ups[layer], top_k=settings.top_k,
                                 factor_threshold=settings.factor_threshold, n_factors=settings.n_factors)
        for c, secs in per.items():
            computed[(layer, c)] = secs

    known, _ = neuron_index(full, computed)
    vis = _render_variable_names(model, {l: sorted(c) for l, c in known.items()}, cache, settings.render, progress)
    data, name = None, ""
    if images is not None:
        data, name = torch.as_tensor(images), images_name
    else:
        dataset = resolve_dataset(model_input_shape(model), settings.dataset)
        if dataset is not None:
            data, name = load_dataset(dataset, settings.dataset_size), DATASET_TITLES.get(dataset, dataset)
    examples: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if data is not None:
        from ..featurevis import dataset_examples

        targets = [f"{l}:{c}" for l, chs in known.items() for c in sorted(chs)]
        found = dataset_examples(model, targets, data, k=settings.n_examples, progress=progress)
        examples = {t: (ex.indices.cpu().numpy(), ex.values.cpu().numpy()) for t, ex in found.items()}
    return PageData.build(model, full, ups, computed, settings, images=vis, examples=examples,
                          example_images=data, dataset_name=name)


# ----------------------------------------------------------------------------- html


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "_"


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _css() -> str:
    return resources.files("circuits.figures").joinpath("templates/page.css").read_text(encoding="utf-8")


def _doc(title: str, body: str, css: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        "<link rel=\"icon\" href=\"data:,\">\n"
        f"<title>{_e(title)}</title>\n<style>\n{css}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


@dataclass
class _Site:
    out: Path
    css: str
    full: dict[str, list[int]]
    known: dict[str, set[int]] = field(default_factory=dict)

    def page(self, layer: str, c: int) -> str:
        return f"layers/{_slug(layer)}/{c}.html"

    def vis(self, layer: str, c: int) -> str:
        return f"img/vis/{_slug(layer)}/{c}.png"

    def examples(self, layer: str, c: int) -> str:
        return f"img/examples/{_slug(layer)}/{c}.png"

    def heat(self, layer: str, c: int, up: str, i: int) -> str:
        return f"img/w/{_slug(layer)}/{c}/{_slug(up)}/{i}.png"

    def nmf(self, layer: str, c: int, up: str) -> str:
        return f"img/nmf/{_slug(layer)}/{c}/{_slug(up)}.png"

    def write(self, rel: str, text: str) -> None:
        atomic_write_text(self.out / rel, text)


def _thumb(site: _Site, layer: str, c: int, prefix: str, has_vis: bool, extra: str = "") -> str:
    cls = "thumb full" if c in site.full.get(layer, []) else "thumb"
    img = (
        f"<img class=\"pixel\" src=\"{prefix}{site.vis(layer, c)}\" alt=\"feature visualization of {_e(layer)}:{c}\">"
        if has_vis else ""
    )
    return f"<div class=\"{cls}\"><a href=\"{prefix}{site.page(layer, c)}\">{img}<br>{_e(layer)}:{c}</a>{extra}</div>"


def _hero(site: _Site, layer: str, c: int, vis_caption: str, examples: Optional[tuple[np.ndarray, np.ndarray]], has_vis: bool, dataset_name: str) -> str:
    parts = ["<div class=\"hero\">"]
    if has_vis:
        parts.append(
            f"<figure><img class=\"vis-large pixel\" src=\"../../{site.vis(layer, c)}\" alt=\"feature visualization of {_e(layer)}:{c}\">"
            f"<figcaption>feature visualization<br>{_e(vis_caption)}</figcaption></figure>"
        )
    if examples is not None:
        idx, vals = examples
        parts.append(
            f"<figure><img class=\"examples pixel\" src=\"../../{site.examples(layer, c)}\" alt=\"dataset examples of {_e(layer)}:{c}\">"
            f"<figcaption>top {len(idx)} {_e(dataset_name)} images by mean activation "
            f"({vals.max():.3g} … {vals.min():.3g})</figcaption></figure>"
        )
    parts.append("</div>")
    return "".join(parts)


def _downstream_html(site: _Site, refs: list[tuple[str, int, str, float]], has_vis: set[str]) -> str:
    if not refs:
        return "<p class=\"muted\">No chosen neuron lists this one among its top connections.</p>"
    seen: dict[tuple[str, int], tuple[str, float]] = {}
    for layer, c, up, norm in refs:
        key = (layer, c)
        if key not in seen or norm > seen[key][1]:
            seen[key] = (up, norm)
    cells = [
        _thumb(site, layer, c, "../../", f"{layer}:{c}" in has_vis, f"<br><span class=\"muted\">L2 {norm:.3g}</span>")
        for (layer, c), (up, norm) in sorted(seen.items(), key=lambda kv: -kv[1][1])
    ]
    return "<div class=\"grid\">" + "".join(cells) + "</div>"


def _section_html(site: _Site, layer: str, c: int, sec: NeuronConnections, has_vis: set[str], factor_threshold: float) -> str:
    kh, kw = sec.slices.shape[1:]
    kind = "direct weights" if sec.kind == "direct" else "expanded weights"
    head = (
        f"<h2>{_e(sec.upstream)} → {_e(layer)}:{c} <span class=\"muted\">· {kind}, {kh}×{kw} · "
        f"top {len(sec.channels)} of {sec.n_inputs} inputs by L2</span></h2>"
    )
    info = ["<div class=\"sectionhead\">"]
    if sec.rgb is not None:
        info.append(
            f"<img class=\"nmf pixel\" src=\"../../{site.nmf(layer, c, sec.upstream)}\" "
            f"alt=\"NMF factors of the weights from {_e(sec.upstream)} as red, green, blue\">"
        )
    if sec.explained is not None:
        if sec.by_factor:
            how = f"cells grouped by dominant factor (<span class=\"tag f0\">F0</span> red, <span class=\"tag f1\">F1</span> green, <span class=\"tag f2\">F2</span> blue)"
        else:
            how = f"below {factor_threshold:.0%}, so cells are ordered by L2"
        info.append(f"<span>3 NMF factors explain {sec.explained:.0%} of these weights; {how}.</span>")
    elif sec.note:
        info.append(f"<span class=\"muted\">{_e(sec.note)}; cells ordered by L2.</span>")
    info.append(
        f"<span><img class=\"colorbar\" src=\"../../img/colorbar.png\" alt=\"colour scale\"> "
        f"<span class=\"muted\">−{sec.limit:.3g} … +{sec.limit:.3g} (blue inhibits, red excites)</span></span></div>"
    )
    cells = []
    for k, i in enumerate(sec.channels):
        name = f"{sec.upstream}:{i}"
        vis = (
            f"<img class=\"vis pixel\" src=\"../../{site.vis(sec.upstream, i)}\" alt=\"feature visualization of {_e(name)}\">"
            if name in has_vis else ""
        )
        tag = f" <span class=\"tag f{sec.factors[k] % 6}\">F{sec.factors[k]}</span>" if sec.factors is not None else ""
        cells.append(
            f"<div class=\"cell\"><a href=\"../../{site.page(sec.upstream, i)}\" title=\"{_e(name)}\">{vis}</a>"
            f"<img class=\"w pixel\" src=\"../../{site.heat(layer, c, sec.upstream, i)}\" alt=\"weights from {_e(name)}\">"
            f"<a href=\"../../{site.page(sec.upstream, i)}\">{_e(name)}</a><br>L2 {sec.norms[k]:.3g}{tag}</div>"
        )
    return head + "".join(info) + "<div class=\"cells\">" + "".join(cells) + "</div>"


def _crumbs(layer: str, c: Optional[int] = None) -> str:
    s = "<p class=\"crumbs\"><a href=\"../../index.html\">all layers</a> › "
    if c is None:
        return s + f"{_e(layer)}</p>"
    return s + f"<a href=\"index.html\">{_e(layer)}</a> › {_e(layer)}:{c}</p>"


# ----------------------------------------------------------------------------- write


def write_pages(data: PageData, out_dir: PathLike, progress: bool = True) -> Path:
    """Write the site for ``data`` into ``out_dir`` and return the path of ``index.html``.

    Every file is written atomically; ``index.html`` is written last.
    """
    out = check_writable(out_dir)
    settings = data.settings
    site = _Site(out, _css(), data.full, data.known)
    save_png(colorbar_rgb(), out / "img/colorbar.png")
    has_vis = set(data.images)
    for name, image in tqdm(data.images.items(), desc="images", disable=not progress, leave=False):
        t = parse_target(name)
        save_image_png(image, out / site.vis(t.layer, t.channel))  # type: ignore[arg-type]
    for name, (idx, _vals) in data.examples.items():
        if data.example_images is None:
            raise ValueError("PageData has dataset examples but no example_images to draw them from")
        t = parse_target(name)
        strip = tile_images([data.example_images[int(j)] for j in idx], pad=1)
        save_png(strip, out / site.examples(t.layer, t.channel))  # type: ignore[arg-type]
    for (layer, c), secs in data.sections.items():
        for sec in secs:
            kh, kw = sec.slices.shape[1:]
            scale = max(1, 64 // max(kh, kw))
            for i, sl in zip(sec.channels, sec.slices):
                save_heatmap_png(sl, out / site.heat(layer, c, sec.upstream, i), limit=sec.limit, scale=scale)
            if sec.rgb is not None:
                save_rgb_png(sec.rgb, out / site.nmf(layer, c, sec.upstream), scale=max(1, 72 // max(sec.rgb.shape[:2])))

    steps = settings.render.get("steps", 512)
    vis_caption = f"{steps} steps, seed {settings.render.get('seed', 0)}"
    for layer, chs in tqdm(list(data.known.items()), desc="pages", disable=not progress, unit="layer"):
        for c in sorted(chs):
            key = f"{layer}:{c}"
            body = [_crumbs(layer, c), f"<h1>{_e(key)}</h1>"]
            for branch, first, n in data.branches.get(layer) or []:
                if first <= c < first + n:
                    body.append(f"<p class=\"muted\">Channel {c - first} of branch <code>{_e(branch)}</code> "
                                f"(channels {first}–{first + n - 1} of {_e(layer)}).</p>")
            body.append(_hero(site, layer, c, vis_caption, data.examples.get(key), key in has_vis, data.dataset_name))
            if c in data.full.get(layer, []):
                secs = data.sections.get((layer, c), [])
                body.append(f"<h2>Downstream <span class=\"muted\">· chosen neurons that list {_e(key)} among their top inputs</span></h2>")
                body.append(_downstream_html(site, data.downstream.get((layer, c), []), has_vis))
                if not secs:
                    body.append("<p class=\"muted\">No upstream layer has non-zero weights to this neuron.</p>")
                for sec in secs:
                    body.append(_section_html(site, layer, c, sec, has_vis, settings.factor_threshold))
            else:
                body.append(
                    "<p class=\"muted\">A short page: this neuron appears among the inputs of the neurons below. "
                    "Its own inputs were not computed; page it with <code>circuits explore --neurons "
                    f"{_e(key)}</code> or <code>build_pages(..., neurons=[{_e(repr(key))}])</code>.</p>"
                )
                body.append("<h2>Downstream</h2>")
                body.append(_downstream_html(site, data.downstream.get((layer, c), []), has_vis))
            site.write(site.page(layer, c), _doc(key, "\n".join(body), site.css))
        chosen = [c for c in sorted(chs) if c in data.full.get(layer, [])]
        others = [c for c in sorted(chs) if c not in data.full.get(layer, [])]
        body = [_crumbs(layer), f"<h1>{_e(layer)}</h1>"]
        if chosen:
            body.append(f"<h2>Neurons with full pages ({len(chosen)})</h2><div class=\"grid\">")
            body += [_thumb(site, layer, c, "../../", f"{layer}:{c}" in has_vis) for c in chosen]
            body.append("</div>")
        if others:
            body.append(f"<h2>Inputs of the pages above ({len(others)})</h2><div class=\"grid\">")
            body += [_thumb(site, layer, c, "../../", f"{layer}:{c}" in has_vis) for c in others]
            body.append("</div>")
        site.write(f"layers/{_slug(layer)}/index.html", _doc(layer, "\n".join(body), site.css))

    rows = []
    for layer in list(data.full) + [l for l in data.known if l not in data.full]:
        n_full = len(data.full.get(layer, []))
        rows.append(
            f"<tr><td><a href=\"layers/{_slug(layer)}/index.html\">{_e(layer)}</a></td><td>{data.counts.get(layer, '?')}</td>"
            f"<td>{n_full}</td><td>{len(data.known[layer]) - n_full}</td>"
            f"<td>{_e(', '.join(data.upstream[layer])) if layer in data.upstream else ''}</td></tr>"
        )
    first = []
    for layer in data.full:
        first += [_thumb(site, layer, c, "", f"{layer}:{c}" in has_vis) for c in data.full[layer]]
    body = [
        f"<h1>{_e(data.title)}</h1>",
        "<p>Each neuron page shows the neuron's variable names (feature visualization"
        + (", dataset examples" if data.examples else "")
        + ") and, for every upstream layer that connects to it, its strongest inputs by the L2 norm of their "
        "weights: the input neuron's feature visualization above its weight map (red excites, blue inhibits, "
        "one colour scale per section). Weights across bottlenecks and pools are <em>expanded weights</em> "
        "(the linearised path: ReLU → identity, max pool → average pool).</p>",
        "<h2>Layers</h2><table class=\"layers\"><tr><th>layer</th><th>channels</th><th>full pages</th>"
        "<th>input pages</th><th>upstream layers shown</th></tr>" + "".join(rows) + "</table>",
        "<h2>Neurons</h2><div class=\"grid\">" + "".join(first) + "</div>",
        f"<p class=\"muted\">Feature visualizations: {_e(vis_caption)}. Top {settings.top_k} connections per upstream layer; "
        f"cells ordered by NMF factor when {settings.n_factors} factors explain ≥ {settings.factor_threshold:.0%} of the weights.</p>",
    ]
    index = out / "index.html"
    site.write("index.html", _doc(data.title, "\n".join(body), site.css))
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
