"""Static neuron pages: a self-contained HTML site that puts each neuron's weights in context.

For every chosen neuron, a page shows

- its *variable names*: the feature visualization and, when a data set is available, the
  data set images that activate it most (Fashion-MNIST test images for FashionInception);
- every upstream layer that matters (direct weights from the layer just before, expanded
  weights across bottlenecks and pools; a layer whose weights to this neuron are all zero,
  e.g. another branch's bottleneck, is left out): the top-``k`` connections by L2, each the
  upstream neuron's feature visualization (a link to its page) above its weight map on the
  diverging palette, one colour scale per section;
- the NMF picture of each section (3 spatial factors as R, G, B) and how much of the weights
  the factors explain; when that is at least ``factor_threshold`` the cells are ordered by
  factor (grouped by dominant factor), otherwise by L2;
- links to the downstream neurons whose pages list it.

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

import html
import re
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .._io import PathLike, atomic_write_text
from ..layers import check_channel, get_layer, layer_names, list_layers, parse_target
from ..models import input_shape as model_input_shape
from .palette import symmetric_limit
from .raster import colorbar_rgb, save_heatmap_png, save_image_png, save_png, save_rgb_png, tile_images
from .smallmultiples import factor_order, rank_inputs

__all__ = [
    "build_pages",
    "default_upstream",
    "interesting_layers",
    "select_neurons",
    "check_writable",
    "concat_branches",
    "connections_to",
    "layer_sections",
    "NeuronConnections",
]

_MAIN_LAYER = re.compile(r"^(conv2d\d+|mixed\d+[a-z])$")
_BRANCH_INPUTS = ("_3x3_bottleneck", "_5x5_bottleneck")
NeuronSpec = Union[None, int, Sequence[str], Mapping[str, Sequence[int]]]


# ----------------------------------------------------------------------------- choices


def interesting_layers(model: nn.Module) -> list[str]:
    """The layers ``circuits explore`` pages by default: the ``mixed*`` blocks of an
    InceptionV1-style model up to the first 4-block (``mixed3a, mixed3b, mixed4a``), else the
    last three main (``conv2d*``/``mixed*``) layers."""
    names = [n for n in layer_names(model) if _MAIN_LAYER.match(n)]
    mixed = [n for n in names if n.startswith("mixed")]
    if mixed:
        early = [n for n in mixed if n[5:6] in ("3",)] + [n for n in mixed if n[5:6] == "4"][:1]
        return early or mixed[:3]
    if not names:
        raise ValueError(
            "no default layers for this model (no conv2d*/mixed* layers); pass the layers to page explicitly"
        )
    return names[-3:]


def default_upstream(model: nn.Module, layer: str) -> list[str]:
    """Upstream layers shown on ``layer``'s pages: the previous main layer (``conv2d*`` /
    ``mixed*``; expanded weights when not adjacent) and the block's own bottlenecks
    (``<layer>_3x3_bottleneck``, ``<layer>_5x5_bottleneck``; direct weights).

    Raises ``ValueError`` when the model has no such naming; pass ``upstream=`` then.
    """
    names = layer_names(model)
    get_layer(model, layer)  # UnknownLayerError with close matches
    main = [n for n in names if _MAIN_LAYER.match(n)]
    ups: list[str] = []
    if layer in main and main.index(layer) > 0:
        ups.append(main[main.index(layer) - 1])
    ups += [layer + s for s in _BRANCH_INPUTS if layer + s in names]
    if not ups:
        raise ValueError(
            f"no default upstream layers for {layer!r} (the model has no Lucid-style names); "
            f"pass upstream={{{layer!r}: ['<layer>', ...]}}"
        )
    return ups


def _channel_counts(model: nn.Module) -> dict[str, int]:
    shapes = {}
    for info in list_layers(model, model_input_shape(model)):
        if info.output_shape:
            shapes[info.name] = int(info.output_shape[0])
    return shapes


def select_neurons(model_or_counts: Union[nn.Module, Mapping[str, int]], layers: Sequence[str], neurons: NeuronSpec = None) -> dict[str, list[int]]:
    """Resolve a neuron selection to ``{layer: [channels]}``.

    ``neurons`` is ``None`` (every channel of every layer), an ``int`` ``n`` (``n`` channels
    per layer, evenly spaced so that every branch of a mixed block is visited), a list of
    targets (``"mixed3b:12"``; their layers are added to ``layers``) or a mapping
    ``{layer: [channels]}``.
    """
    counts = _channel_counts(model_or_counts) if isinstance(model_or_counts, nn.Module) else dict(model_or_counts)
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
    items: Iterable[tuple[str, int]]
    if isinstance(neurons, Mapping):
        items = [(layer, int(c)) for layer, chs in neurons.items() for c in chs]
    else:
        if isinstance(neurons, str):
            neurons = [neurons]
        items = []
        for spec in neurons:
            t = parse_target(spec)
            if t.channel is None:
                raise ValueError(f"neuron {spec!r} needs a channel: 'layer:channel'")
            items.append((t.layer, t.channel))  # type: ignore[union-attr]
    for layer in layers:
        chosen.setdefault(layer, [])
    for layer, c in items:
        check_channel(layer, c, n_of(layer))
        if c not in chosen.setdefault(layer, []):
            chosen[layer].append(c)
    return {layer: sorted(chs) for layer, chs in chosen.items() if chs}


def check_writable(out_dir: PathLike) -> Path:
    """Create ``out_dir`` if needed and prove a file can be written there.

    Raises ``PermissionError`` / ``NotADirectoryError`` with a message that names the folder,
    before any expensive work starts and without leaving anything behind.
    """
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output path {out} exists and is not a folder; choose another with --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except PermissionError:
        raise PermissionError(f"cannot write to output folder {out}: permission denied; choose another with --out") from None
    except OSError as exc:
        raise PermissionError(f"cannot write to output folder {out}: {exc.strerror or exc}; choose another with --out") from None
    return out


# ----------------------------------------------------------------------------- weights


@dataclass
class NeuronConnections:
    """One section of a neuron page: the neuron's connections from one upstream layer.

    ``channels`` are the upstream channels shown, in display order; ``slices`` their weight
    maps ``[n, kh, kw]``; ``norms`` their L2; ``factors`` the dominant NMF factor of each (or
    ``None``); ``limit`` the section's colour scale ``m``; ``explained`` the fraction of the
    weights the NMF factors explain (``None`` when not factored); ``rgb`` the NMF picture.
    """

    upstream: str
    kind: str
    n_inputs: int
    channels: list[int]
    slices: np.ndarray
    norms: np.ndarray
    limit: float
    factors: Optional[list[int]] = None
    explained: Optional[float] = None
    by_factor: bool = False
    rgb: Optional[np.ndarray] = None
    note: str = ""


def _factor(weights: np.ndarray, k: int) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """NMF of ``weights [n, in, kh, kw]`` → ``(spatial [n,k,kh,kw], loadings [n,k,in], explained [n], rgb [n,H,W,3])``,
    or ``None`` when the kernel has fewer positions than factors (nothing spatial to factor)."""
    kh, kw = weights.shape[-2:]
    if kh * kw < k:
        return None
    from .. import nmf

    f = nmf.neuron_factors(torch.as_tensor(weights, dtype=torch.float32), k)
    spatial = np.asarray(f.spatial.detach().cpu() if isinstance(f.spatial, torch.Tensor) else f.spatial)
    loadings = np.asarray(f.loadings.detach().cpu() if isinstance(f.loadings, torch.Tensor) else f.loadings)
    explained = np.asarray(f.explained.detach().cpu() if isinstance(f.explained, torch.Tensor) else f.explained)
    rgb = np.asarray(nmf.factors_rgb(f, scale=1))
    return spatial, loadings, explained.reshape(-1), rgb


@dataclass
class _Trace:
    """What one forward pass on zeros says about how named layers feed each other."""

    inputs: dict[str, list[int]]  # layer → ids of the tensors it received
    output: dict[str, int]  # layer → id of the tensor it returned
    shapes: dict[str, tuple[int, ...]]  # layer → shape of each received tensor (first input)
    keep: list[torch.Tensor]  # keeps the tensors alive so that ids stay unique

    def producer(self, tensor_id: int) -> Optional[str]:
        for name, out in self.output.items():  # registration order: outermost name first
            if out == tensor_id:
                return name
        return None


def _trace(model: nn.Module) -> _Trace:
    names = layer_names(model)
    modules = dict(model.named_modules())
    inputs: dict[str, list[int]] = {}
    output: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    keep: list[torch.Tensor] = []

    def make(name: str) -> Any:
        def hook(_m: nn.Module, args: tuple, out: object) -> None:
            ts = [a for a in args if isinstance(a, torch.Tensor)]
            inputs[name] = [id(t) for t in ts]
            shapes[name] = tuple(ts[0].shape) if ts else ()
            keep.extend(ts)
            if isinstance(out, torch.Tensor):
                output[name] = id(out)
                keep.append(out)

        return hook

    param = next(model.parameters(), None)
    x = torch.zeros((1, *model_input_shape(model)), device=param.device if param is not None else "cpu")
    handles = []
    try:
        for n in names:
            handles.append(modules[n].register_forward_hook(make(n)))
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return _Trace(inputs, output, shapes, keep)


def concat_branches(model: nn.Module, layer: str, trace: Optional[_Trace] = None) -> Optional[list[tuple[str, int, int]]]:
    """When ``layer`` concatenates named layers (an Inception block), its branches as
    ``[(branch layer, first channel, n channels)]`` in channel order; else ``None``.

    Found with one forward pass on zeros: the concatenating module's inputs are matched
    (by identity) to the outputs of the model's named layers.
    """
    get_layer(model, layer)
    tr = trace or _trace(model)
    ids = tr.inputs.get(layer, [])
    if len(ids) < 2:
        return None
    out, offset = [], 0
    for i in ids:
        name = tr.producer(i)
        t = next((k for k in tr.keep if id(k) == i), None)
        if name is None or t is None or t.ndim < 2:
            return None
        out.append((name, offset, int(t.shape[1])))
        offset += int(t.shape[1])
    return out


def _adjacent_conv(model: nn.Module, upstream: str, layer: str, tr: _Trace) -> Optional[nn.Conv2d]:
    """The ``Conv2d`` that maps ``upstream``'s output straight to ``layer`` (``layer`` is that
    conv, or an elementwise activation applied to its output), else ``None``."""
    modules = dict(model.named_modules())
    up_out = tr.output.get(upstream)
    if up_out is None:
        return None

    def conv_of(name: str) -> Optional[nn.Conv2d]:
        m = modules.get(name)
        if isinstance(m, nn.Conv2d) and m.groups == 1 and tuple(m.dilation) == (1, 1) and tr.inputs.get(name) == [up_out]:
            return m
        return None

    conv = conv_of(layer)
    if conv is not None:
        return conv
    ins = tr.inputs.get(layer, [])
    m = modules.get(layer)
    if len(ins) == 1 and m is not None and not any(True for _ in m.parameters()):
        prev = tr.producer(ins[0])
        if prev is not None and prev != upstream:
            return conv_of(prev)
    return None


def _crop_to_support(w: np.ndarray) -> np.ndarray:
    """Crop ``[n, in, kh, kw]`` to the bounding box where any weight is non-zero."""
    nz = np.abs(w).reshape(-1, *w.shape[-2:]).max(axis=0) > 0
    if not nz.any():
        return w
    ys, xs = np.where(nz.any(axis=1))[0], np.where(nz.any(axis=0))[0]
    return w[..., ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1]


def _as_numpy4(w: object) -> np.ndarray:
    a = w.detach().cpu().numpy() if isinstance(w, torch.Tensor) else np.asarray(w)
    if a.ndim == 2:
        a = a[:, :, None, None]
    return a.astype(np.float64)


def connections_to(
    model: nn.Module,
    upstream: str,
    layer: str,
    channels: Sequence[int],
    trace: Optional[_Trace] = None,
) -> dict[int, tuple[np.ndarray, str]]:
    """``{channel: (weights [in, kh, kw], kind)}`` from ``upstream`` for the channels it reaches.

    One call of :func:`circuits.expanded.connection_weights` for the layer (expanded weights
    across bottlenecks/pools, or the direct kernel); a channel whose weights are all zero is
    not reached (e.g. another branch's bottleneck) and left out. When ``layer`` concatenates
    branches, each branch's neurons get their own footprint (the bounding box of their
    non-zero weights: 1×1 for a 1×1 branch), and a branch that is a convolution of
    ``upstream`` itself gets its *direct* kernel (``kind="direct"``), e.g.
    ``mixed3b_3x3_bottleneck → mixed3b:60``.
    """
    from ..expanded import connection_weights

    channels = [int(c) for c in channels]
    tr = trace or _trace(model)
    conn = connection_weights(model, upstream, layer, channels=channels)
    W = _as_numpy4(conn.weights)
    scale = float(np.abs(W).max()) if W.size else 0.0
    if scale == 0.0:
        return {}
    live = [i for i, c in enumerate(channels) if np.abs(W[i]).max() > 1e-6 * scale]
    branches = concat_branches(model, layer, tr)
    if not branches:
        return {channels[i]: (W[i], str(conn.kind)) for i in live}
    result: dict[int, tuple[np.ndarray, str]] = {}
    for branch, first, n in branches:
        mine = [i for i in live if first <= channels[i] < first + n]
        if not mine:
            continue
        conv = _adjacent_conv(model, upstream, branch, tr)
        if conv is not None:
            k = conv.weight.detach().cpu().numpy().astype(np.float64)
            for i in mine:
                result[channels[i]] = (k[channels[i] - first], "direct")
        else:
            sub = _crop_to_support(W[mine])
            for j, i in enumerate(mine):
                result[channels[i]] = (sub[j], str(conn.kind))
    return result


def layer_sections(
    model: nn.Module,
    layer: str,
    channels: Sequence[int],
    upstream: Sequence[str],
    *,
    top_k: int = 50,
    factor_threshold: float = 0.8,
    n_factors: int = 3,
) -> dict[int, list[NeuronConnections]]:
    """The weights/NMF sections of ``layer``'s neuron pages: ``{channel: [NeuronConnections, ...]}``.

    For each of ``channels`` and each layer of ``upstream`` that reaches it (see
    :func:`connections_to`), the top-``top_k`` inputs by L2 with their weight slices
    ``[k, kh, kw]``, the section's colour scale and ``n_factors`` NMF factors (one batched NMF
    per kernel shape); cells are ordered by factor when the factors explain at least
    ``factor_threshold`` of the weights, else by L2. This is what :func:`build_pages` computes
    per layer; pass its result (e.g. computed elsewhere and stored) as ``build_pages(...,
    precomputed={layer: sections})`` to skip the computation.
    """
    channels = [int(c) for c in channels]
    out: dict[int, list[NeuronConnections]] = {c: [] for c in channels}
    tr = _trace(model)
    for up in upstream:
        found = connections_to(model, up, layer, channels, tr)
        # factor neurons that share a kernel shape together (one batched NMF per shape)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for c, (w, _) in found.items():
            by_shape.setdefault(w.shape, []).append(c)
        for shape, chs in by_shape.items():
            fac = _factor(np.stack([found[c][0] for c in chs]), n_factors)
            for j, c in enumerate(chs):
                w, kind = found[c]
                k = min(top_k, w.shape[0])
                order, norms = rank_inputs(w, k)
                sec = NeuronConnections(
                    upstream=up, kind=kind, n_inputs=w.shape[0], channels=[int(x) for x in order],
                    slices=w[order], norms=norms[order], limit=symmetric_limit(w[order]),
                )
                if fac is None:
                    sec.note = f"{w.shape[1]}×{w.shape[2]} kernel: no spatial structure to factor"
                else:
                    spatial, loadings, explained, rgb = fac
                    sec.explained = float(explained[j])
                    sec.rgb = rgb[j]
                    if sec.explained >= factor_threshold:
                        forder, fdom = factor_order(w, loadings[j], k, spatial[j])
                        sec.channels = [int(x) for x in forder]
                        sec.slices = w[forder]
                        sec.norms = norms[forder]
                        sec.factors = [int(x) for x in fdom]
                        sec.by_factor = True
                out[c].append(sec)
    return out


# ----------------------------------------------------------------------------- variable names


def _default_dataset(model: nn.Module, size: int) -> Optional[torch.Tensor]:
    if tuple(model_input_shape(model)) != (1, 28, 28):
        return None
    from ..datasets import DatasetNotFoundError, load_fashion_mnist

    try:
        images, _ = load_fashion_mnist("test")
    except DatasetNotFoundError:
        return None
    return images[:size]


def _render_by_layer(
    model: nn.Module, targets: dict[str, list[int]], cache: Any, render_kwargs: dict, progress: bool
) -> dict[str, np.ndarray]:
    from ..featurevis import variable_names

    images: dict[str, np.ndarray] = {}
    layers = [l for l in targets if targets[l]]
    for layer in tqdm(layers, desc="feature visualizations", disable=not progress, unit="layer"):
        names = [f"{layer}:{c}" for c in targets[layer]]
        kw = dict(render_kwargs)
        kw.setdefault("progress", progress)
        images.update(variable_names(model, names, cache=cache, **kw))
    return images


def _examples(model: nn.Module, targets: list[str], data: torch.Tensor, k: int, progress: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from ..featurevis import dataset_examples

    found = dataset_examples(model, targets, data, k=k, progress=progress)
    return {t: (ex.indices.cpu().numpy(), ex.values.cpu().numpy()) for t, ex in found.items()}


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


# ----------------------------------------------------------------------------- build


def build_pages(
    model: nn.Module,
    layers: Optional[Sequence[str]],
    out_dir: PathLike,
    *,
    neurons: NeuronSpec = None,
    upstream: Optional[Mapping[str, Sequence[str]]] = None,
    top_k: int = 50,
    render_kwargs: Optional[Mapping[str, Any]] = None,
    cache: Any = True,
    dataset: Union[None, bool, torch.Tensor] = None,
    dataset_name: Optional[str] = None,
    dataset_size: int = 2000,
    n_examples: int = 8,
    factor_threshold: float = 0.8,
    n_factors: int = 3,
    title: Optional[str] = None,
    progress: bool = True,
    precomputed: Optional[Mapping[str, Mapping[int, Sequence[NeuronConnections]]]] = None,
) -> Path:
    """Build the static neuron pages for ``layers`` and return the path of ``index.html``.

    Args:
        model: the model (eval mode; any device).
        layers: layers to page (default :func:`interesting_layers`).
        out_dir: output folder (created; must be writable — checked before any work).
        neurons: which neurons get full pages, see :func:`select_neurons` (``None``: all).
        upstream: ``{layer: [upstream layers]}`` (default :func:`default_upstream`).
        top_k: connections shown per upstream layer (largest L2 of the weight slice).
        render_kwargs: passed to :func:`circuits.featurevis.variable_names` (``steps``,
            ``size``, ``seed``, ``batch_size``...).
        cache: the feature-visualization cache (``True``: default folder; a folder; ``None``: off).
        dataset: images ``[N, C, H, W]`` in ``[0, 1]`` for dataset examples; ``None``: the
            Fashion-MNIST test set for 1×28×28 models when installed; ``False``: none.
        dataset_size: how many images of the default data set to scan.
        n_examples: dataset examples per neuron.
        factor_threshold: order cells by NMF factor when the factors explain at least this
            fraction of the weights.
        n_factors: NMF factors per section.
        title: the site's title.
        progress: progress bars.
        precomputed: weights/NMF sections already computed with these settings,
            ``{layer: {channel: [NeuronConnections, ...]}}`` as :func:`layer_sections` returns
            them (e.g. read back from a result store). A layer is taken from here when it
            covers every chosen channel of that layer; otherwise (or when ``None``) its
            sections are computed.
    """
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    if not 0.0 <= factor_threshold <= 1.0:
        raise ValueError(f"factor_threshold is a fraction in [0, 1], got {factor_threshold!r}")
    layers = list(layers) if layers else interesting_layers(model)
    for layer in layers:
        get_layer(model, layer)
    counts = _channel_counts(model)
    full = select_neurons(counts if all(l in counts for l in layers) else model, layers, neurons)
    layers = list(full)
    ups = {layer: list(upstream[layer]) if upstream and layer in upstream else default_upstream(model, layer) for layer in layers}
    for layer, us in ups.items():
        for u in us:
            get_layer(model, u)
    out = check_writable(out_dir)
    render_kwargs = dict(render_kwargs or {})

    # 1. connections
    sections: dict[tuple[str, int], list[NeuronConnections]] = {}
    for layer in tqdm(layers, desc="weights and NMF", disable=not progress, unit="layer"):
        have = precomputed.get(layer) if precomputed is not None else None
        if have is not None and all(c in have for c in full[layer]):
            per = {c: list(have[c]) for c in full[layer]}
        else:
            per = layer_sections(model, layer, full[layer], ups[layer], top_k=top_k,
                                 factor_threshold=factor_threshold, n_factors=n_factors)
        for c, secs in per.items():
            sections[(layer, c)] = secs

    # 2. every neuron that appears: chosen ones and their shown inputs
    known: dict[str, set[int]] = {layer: set(chs) for layer, chs in full.items()}
    downstream: dict[tuple[str, int], list[tuple[str, int, str, float]]] = {}
    for (layer, c), secs in sections.items():
        for sec in secs:
            known.setdefault(sec.upstream, set()).update(sec.channels)
            for i, norm in zip(sec.channels, sec.norms):
                downstream.setdefault((sec.upstream, i), []).append((layer, c, sec.upstream, float(norm)))
    targets = {layer: sorted(chs) for layer, chs in known.items()}

    # 3. variable names: feature visualizations (cached) and dataset examples
    vis = _render_by_layer(model, targets, cache, render_kwargs, progress)
    data = None
    if dataset is None:
        data = _default_dataset(model, dataset_size)
        dataset_name = dataset_name or "Fashion-MNIST test"
    elif dataset is not False:
        data = torch.as_tensor(dataset)
        dataset_name = dataset_name or "dataset"
    all_targets = [f"{l}:{c}" for l, chs in targets.items() for c in chs]
    examples = _examples(model, all_targets, data, n_examples, progress) if data is not None else {}

    # 4. images
    site = _Site(out, _css(), full, known)
    tr = _trace(model)
    branch_map = {layer: concat_branches(model, layer, tr) for layer in known}
    save_png(colorbar_rgb(), out / "img/colorbar.png")
    has_vis = set(vis)
    for name, image in tqdm(vis.items(), desc="images", disable=not progress, leave=False):
        t = parse_target(name)
        save_image_png(image, out / site.vis(t.layer, t.channel))  # type: ignore[arg-type]
    for name, (idx, _vals) in examples.items():
        t = parse_target(name)
        strip = tile_images([data[int(j)] for j in idx], pad=1)  # type: ignore[index]
        save_png(strip, out / site.examples(t.layer, t.channel))  # type: ignore[arg-type]
    for (layer, c), secs in sections.items():
        for sec in secs:
            kh, kw = sec.slices.shape[1:]
            scale = max(1, 64 // max(kh, kw))
            for i, sl in zip(sec.channels, sec.slices):
                save_heatmap_png(sl, out / site.heat(layer, c, sec.upstream, i), limit=sec.limit, scale=scale)
            if sec.rgb is not None:
                save_rgb_png(sec.rgb, out / site.nmf(layer, c, sec.upstream), scale=max(1, 72 // max(sec.rgb.shape[:2])))

    # 5. pages
    steps = render_kwargs.get("steps", 512)
    vis_caption = f"{steps} steps, seed {render_kwargs.get('seed', 0)}"
    for layer, chs in tqdm(list(known.items()), desc="pages", disable=not progress, unit="layer"):
        for c in sorted(chs):
            key = f"{layer}:{c}"
            body = [_crumbs(layer, c), f"<h1>{_e(key)}</h1>"]
            for branch, first, n in branch_map.get(layer) or []:
                if first <= c < first + n:
                    body.append(f"<p class=\"muted\">Channel {c - first} of branch <code>{_e(branch)}</code> "
                                f"(channels {first}–{first + n - 1} of {_e(layer)}).</p>")
            body.append(_hero(site, layer, c, vis_caption, examples.get(key), key in has_vis, dataset_name or ""))
            if c in full.get(layer, []):
                secs = sections.get((layer, c), [])
                body.append(f"<h2>Downstream <span class=\"muted\">· chosen neurons that list {_e(key)} among their top inputs</span></h2>")
                body.append(_downstream_html(site, downstream.get((layer, c), []), has_vis))
                if not secs:
                    body.append("<p class=\"muted\">No upstream layer has non-zero weights to this neuron.</p>")
                for sec in secs:
                    body.append(_section_html(site, layer, c, sec, has_vis, factor_threshold))
            else:
                body.append(
                    "<p class=\"muted\">A short page: this neuron appears among the inputs of the neurons below. "
                    "Its own inputs were not computed; page it with <code>circuits explore --neurons "
                    f"{_e(key)}</code> or <code>build_pages(..., neurons=[{_e(repr(key))}])</code>.</p>"
                )
                body.append(f"<h2>Downstream</h2>")
                body.append(_downstream_html(site, downstream.get((layer, c), []), has_vis))
            site.write(site.page(layer, c), _doc(key, "\n".join(body), site.css))
        # layer index
        chosen = [c for c in sorted(chs) if c in full.get(layer, [])]
        others = [c for c in sorted(chs) if c not in full.get(layer, [])]
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

    # 6. the index, last
    name = title or f"{type(model).__name__} neuron pages"
    rows = []
    for layer in list(full) + [l for l in known if l not in full]:
        n_full = len(full.get(layer, []))
        rows.append(
            f"<tr><td><a href=\"layers/{_slug(layer)}/index.html\">{_e(layer)}</a></td><td>{counts.get(layer, '?')}</td>"
            f"<td>{n_full}</td><td>{len(known[layer]) - n_full}</td>"
            f"<td>{_e(', '.join(ups[layer])) if layer in ups else ''}</td></tr>"
        )
    first = []
    for layer in full:
        first += [_thumb(site, layer, c, "", f"{layer}:{c}" in has_vis) for c in full[layer]]
    body = [
        f"<h1>{_e(name)}</h1>",
        "<p>Each neuron page shows the neuron's variable names (feature visualization"
        + (", dataset examples" if examples else "")
        + ") and, for every upstream layer that connects to it, its strongest inputs by the L2 norm of their "
        "weights: the input neuron's feature visualization above its weight map (red excites, blue inhibits, "
        "one colour scale per section). Weights across bottlenecks and pools are <em>expanded weights</em> "
        "(the linearised path: ReLU → identity, max pool → average pool).</p>",
        "<h2>Layers</h2><table class=\"layers\"><tr><th>layer</th><th>channels</th><th>full pages</th>"
        "<th>input pages</th><th>upstream layers shown</th></tr>" + "".join(rows) + "</table>",
        "<h2>Neurons</h2><div class=\"grid\">" + "".join(first) + "</div>",
        f"<p class=\"muted\">Feature visualizations: {_e(vis_caption)}. Top {top_k} connections per upstream layer; "
        f"cells ordered by NMF factor when {n_factors} factors explain ≥ {factor_threshold:.0%} of the weights.</p>",
    ]
    index = out / "index.html"
    site.write("index.html", _doc(name, "\n".join(body), site.css))
    return index
