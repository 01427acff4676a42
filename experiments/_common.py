"""Helpers shared by the figure scripts (``experiments/fig*.py``), the story-neuron search and
the bottleneck study.

Every script has ``run(config: dict) -> dict``, is driven by a YAML file in ``configs/`` (see
:mod:`circuits.experiment`) and declares the keys it reads in ``OPTIONS`` (built with
:func:`options`): any other key is an error naming the valid ones. Keys common to all scripts:

``model``      ``inceptionv1`` | ``fashion-inception`` | a torchvision name, or an ``nn.Module``
               (tests pass one model to many runs).
``weights``    checkpoint path/URL (``sha256`` required for a URL); ``random`` = random init
               (seeded by ``seed``); ``null`` = the bundled checkpoint for fashion-inception,
               random init for the others (a smoke run: numbers are not meaningful).
``device``     ``cpu`` (default) or ``cuda``.
``out``        output folder (default ``outputs/<experiment>``); ``formats`` (default
               ``[png, svg]``), ``dpi`` (default 150).
``render``     feature-visualization settings: the keyword arguments of
               :func:`circuits.featurevis.render` (``steps``, ``size``, ``seed``, ``cache``...).
``nmf``        ``max_iter``, ``tol``, ``seed``.
``controls``   ``random_init`` (number of random-init draws, default 3), ``shuffled`` (number of
               shuffles, default 3), ``seed`` (default 0): the controls every claim is compared
               with (see ``_measures.py``).
``story``      the story-neuron file (JSON written by ``story_neurons.py``; relative paths are
               looked up next to the config). Targets ``story:NAME`` read it.

Neuron choices: a target is ``"layer:index"`` or ``"story:NAME"`` (an entry of the story file,
e.g. ``story:boundary``; ``story:boundary.source`` for a field of it); a list of neurons is a
list of indices or ``story:NAME``. Figures never pick their own neurons: the story file holds
one shared choice, with the measurements that made it.
"""

from __future__ import annotations

import json
import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from circuits.expanded import connection_weights
from circuits.featurevis import RENDER_OPTIONS, render
from circuits.featurevis.objectives import Objective
from circuits.layers import centre, get_layer, parse_target, run_until
from circuits.models import resolve_model
from circuits.wiring import layer_graph

__all__ = [
    "Run",
    "options",
    "start",
    "model_from_config",
    "feature_vis",
    "layer_shapes",
    "n_channels",
    "weights_between",
    "resolve_target",
    "resolve_neurons",
    "strongest_outputs",
    "load_story",
    "grid_shape",
    "support_box",
    "on_support",
    "add_caption",
    "RENDER_KEYS",
]

_DEFAULT_RENDER = {"steps": 512, "seed": 0, "cache": True, "progress": True}
#: valid ``render:`` keys: the settings and call arguments of :func:`circuits.featurevis.render`
RENDER_KEYS = RENDER_OPTIONS
NMF_KEYS = ("max_iter", "tol", "seed")
CONTROL_KEYS = ("random_init", "shuffled", "seed")
_DEFAULT_CONTROLS = {"random_init": 3, "shuffled": 3, "seed": 0}

COMMON_OPTIONS: dict[str, Any] = {
    "model": "model name or nn.Module",
    "weights": "checkpoint path/URL, 'random' or null",
    "sha256": "checksum of a weights URL",
    "device": "cpu or cuda",
    "seed": "seed of random initialisation",
    "out": "output folder",
    "formats": "figure formats (png, svg, pdf)",
    "dpi": "PNG resolution",
    "progress": "progress bars",
    "render": RENDER_KEYS,
    "nmf": NMF_KEYS,
    "controls": CONTROL_KEYS,
    "story": "story-neuron JSON file",
    "model_weights_note": "description of an in-memory model's weights",
    "model_is_trained": "whether an in-memory model is trained",
}


def options(**script_options: Any) -> dict[str, Any]:
    """A script's ``OPTIONS``: the common keys plus its own (``key="what it is"``)."""
    out = dict(COMMON_OPTIONS)
    out.update(script_options)
    return out


@dataclass
class Run:
    """State of one experiment run: config, model, where outputs go, what was written, claims."""

    config: dict
    model: nn.Module
    model_info: dict
    out: Path
    formats: list[str]
    dpi: int
    files: list[str] = field(default_factory=list)
    _random: list = field(default_factory=list, repr=False)

    # ---------------------------------------------------------------- outputs
    def save_figure(self, result: Any, stem: str) -> list[str]:
        """Save a FigureResult / Figure in every configured format; returns the paths."""
        from circuits.figures import save_figure

        paths = []
        for fmt in self.formats:
            p = save_figure(result, self.out / f"{stem}.{fmt}", dpi=self.dpi)
            paths.append(str(p))
        self.files += paths
        fig = getattr(result, "figure", result)
        try:  # free memory held by the figure
            fig.clf()
        except Exception:  # pragma: no cover
            pass
        return paths

    def save_numbers(self, stem: str, arrays: dict[str, Any], summary: dict[str, Any]) -> dict[str, str]:
        """``<stem>.npz`` (arrays) and ``<stem>.json`` (summary + model info), atomically."""
        from circuits._io import atomic_path, atomic_write_text

        npz = self.out / f"{stem}.npz"
        clean = {k: np.asarray(_numpy(v)) for k, v in arrays.items()}
        with atomic_path(npz) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **clean)
        js = self.out / f"{stem}.json"
        doc = {"experiment": self.config.get("experiment"), "model": self.model_info, **summary}
        atomic_write_text(js, json.dumps(_jsonable(doc), indent=2, sort_keys=False) + "\n")
        self.files += [str(npz), str(js)]
        return {"npz": str(npz), "json": str(js)}

    def result(self, summary: dict[str, Any], **extra: Any) -> dict[str, Any]:
        """What ``run`` returns: files written, summary numbers, model info."""
        return {"experiment": self.config.get("experiment"), "out": str(self.out), "files": list(self.files),
                "model": self.model_info, "summary": _jsonable(summary), **extra}

    # ---------------------------------------------------------------- settings
    def render_settings(self) -> dict[str, Any]:
        r = dict(_DEFAULT_RENDER)
        r.update(self.config.get("render") or {})
        return r

    def nmf_settings(self) -> dict[str, Any]:
        n = {"max_iter": 200, "tol": 1e-4, "seed": 0}
        n.update(self.config.get("nmf") or {})
        return n

    def control_settings(self) -> dict[str, int]:
        c = dict(_DEFAULT_CONTROLS)
        c.update(self.config.get("controls") or {})
        bad = {k: v for k, v in c.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0}
        if bad:
            raise ValueError(f"controls must be non-negative integers; got {bad}")
        return c

    def random_models(self) -> list[nn.Module]:
        """The random-init controls (``controls.random_init`` re-initialised copies of the
        model, seeds ``controls.seed + i``), made once per run."""
        from _measures import random_init_copies

        c = self.control_settings()
        if len(self._random) != c["random_init"]:
            self._random = list(random_init_copies(self.model, c["random_init"], c["seed"]))
        return self._random

    def shuffle_seeds(self) -> list[int]:
        c = self.control_settings()
        return [c["seed"] + i for i in range(c["shuffled"])]


def _numpy(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().numpy()
    return v


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().numpy()
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    if isinstance(v, (np.floating, float)):
        f = float(v)
        return f if math.isfinite(f) else None
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.bool_,)):
        return bool(v)
    if isinstance(v, Path):
        return str(v)
    return v


# ---------------------------------------------------------------------------- model


def model_from_config(config: dict) -> tuple[nn.Module, dict]:
    """The model a config asks for, in eval mode, and a description of it.

    The description's ``meaningful`` is ``False`` for random initialisation: the plumbing
    (layer names, shapes, the pipeline) is exercised, but the pictures and numbers say
    nothing about a trained network.
    """
    spec = config.get("model", "fashion-inception")
    weights = config.get("weights")
    device = config.get("device", "cpu")
    if isinstance(spec, nn.Module):
        info = {"name": type(spec).__name__, "weights": config.get("model_weights_note", "given in memory"),
                "meaningful": bool(config.get("model_is_trained", False))}
        return spec.eval(), info
    if not isinstance(spec, str):
        raise TypeError(f"config 'model' must be a model name or an nn.Module; got {type(spec).__name__}")
    name = spec.lower().replace("_", "-")
    random_init = weights == "random" or (weights is None and name not in ("fashion-inception", "fashion"))
    if random_init:
        torch.manual_seed(int(config.get("seed", 0)))
        model = resolve_model(spec, device=device) if name not in ("fashion-inception", "fashion") else _random_fashion(device)
        info = {"name": spec, "weights": "random init (seed %d)" % int(config.get("seed", 0)), "meaningful": False}
    else:
        weights = _resolve_path(weights, config) if weights else None
        model = resolve_model(spec, weights, config.get("sha256"), device)
        info = {"name": spec, "weights": str(weights) if weights else "bundled checkpoint", "meaningful": True}
    return model, info


def _random_fashion(device: str) -> nn.Module:
    from circuits.models import FashionInception

    return FashionInception().to(device)


def _resolve_path(p: str, config: dict) -> str:
    """A relative weights path is tried as given (cwd), then relative to the config's folder."""
    if "://" in str(p):
        return p
    path = Path(p).expanduser()
    if path.exists() or path.is_absolute() or not config.get("_config_dir"):
        return str(path)
    alt = Path(config["_config_dir"]) / path
    return str(alt) if alt.exists() else str(path)


def start(config: dict, opts: Optional[dict] = None) -> Run:
    """Validate the config's keys against ``opts`` (the script's ``OPTIONS``), then load the
    model and create the output folder."""
    if opts is not None:
        from circuits.experiment import validate_config

        validate_config(config, opts, config.get("_config_path") or f"{config.get('experiment', 'experiment')} config")
    model, info = model_from_config(config)
    out = Path(config.get("out") or f"outputs/{config.get('experiment', 'experiment')}").expanduser()
    out.mkdir(parents=True, exist_ok=True)
    formats = config.get("formats") or ["png", "svg"]
    if isinstance(formats, str):
        formats = [formats]
    bad = [f for f in formats if f not in ("png", "svg", "pdf")]
    if bad:
        raise ValueError(f"formats must be among png, svg, pdf; got {bad}")
    return Run(config=config, model=model, model_info=info, out=out, formats=list(formats), dpi=int(config.get("dpi", 150)))


# ---------------------------------------------------------------------------- story neurons


def load_story(config: dict) -> dict:
    """The story-neuron file named by ``config["story"]`` (relative: next to the config, then the
    working directory)."""
    spec = config.get("story")
    if not spec:
        raise ValueError("a 'story:' target needs the config key 'story' (the JSON written by story_neurons.py)")
    path = Path(_resolve_path(str(spec), config))
    if not path.is_file():
        raise FileNotFoundError(f"story-neuron file {spec!r} not found (run: circuits run configs/story_neurons_fashion.yaml)")
    return json.loads(path.read_text())


def story_entry(spec: str, config: dict) -> Any:
    """``"story:boundary"`` → the ``boundary`` entry; ``"story:boundary.source"`` → its field."""
    story = load_story(config)
    node: Any = story["neurons"]
    for part in spec[len("story:"):].split("."):
        if not isinstance(node, dict) or part not in node:
            have = sorted(node) if isinstance(node, dict) else []
            raise ValueError(f"{spec!r}: no {part!r} in the story file {config.get('story')!r} (it has {', '.join(have)})")
        node = node[part]
    return node


def story_matches(run: "Run") -> Optional[bool]:
    """Whether the run's model is the one the story file was measured on (``None``: no story)."""
    if not run.config.get("story"):
        return None
    from circuits._io import state_dict_hash

    return load_story(run.config).get("model", {}).get("state_dict_hash") == state_dict_hash(run.model)


def layer_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Output shape (no batch) of every named layer at the model's input size (the model's cached wiring)."""
    graph = layer_graph(model)
    return {n: s for n in graph.order if (s := graph.output_shape(n)) is not None}


def n_channels(model: nn.Module, layer: str) -> int:
    """Number of channels of ``layer`` (raises UnknownLayerError for a bad name)."""
    get_layer(model, layer)
    shapes = layer_shapes(model)
    if layer not in shapes:
        raise ValueError(f"layer {layer!r} did not run in a forward pass at the model's input size")
    return int(shapes[layer][0])


def weights_between(model: nn.Module, from_layer: str, to_layer: str, channels: Optional[Sequence[int]] = None) -> tuple[torch.Tensor, str]:
    """``([out, in, kh, kw], kind)``: direct kernel for adjacent layers, else expanded weights."""
    c = connection_weights(model, from_layer, to_layer, list(channels) if channels is not None else None)
    return c.weights.detach().float().cpu(), c.kind


def strongest_outputs(weights: torch.Tensor, n: int) -> list[int]:
    """Output channels of ``weights [out, in, kh, kw]`` with the largest total L2, strongest first."""
    from circuits.figures import rank_inputs

    return rank_inputs(weights.reshape(weights.shape[0], -1, 1), max(1, n))[0].tolist()


def resolve_target(spec: str, model: nn.Module, config: Optional[dict] = None) -> tuple[str, int]:
    """``"layer:idx"`` → (layer, idx); ``"story:NAME"`` → the story file's neuron (its
    ``target``, or the entry itself when it is a ``"layer:idx"`` string)."""
    if isinstance(spec, str) and spec.startswith("story:"):
        entry = story_entry(spec, config or {})
        spec = entry["target"] if isinstance(entry, dict) else entry
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"a target is 'layer:index' or 'story:NAME'; got {spec!r}")
    t = parse_target(spec)
    if t.channel is None:
        raise ValueError(f"target {spec!r} needs a channel index")
    from circuits.layers import check_channel

    check_channel(t.layer, t.channel, n_channels(model, t.layer))
    return t.layer, int(t.channel)


def resolve_neurons(spec: Union[str, Sequence[int], None], n_total: int, auto: Any = None, what: str = "neurons",
                    config: Optional[dict] = None) -> list[int]:
    """A list of channel indices from a config value: a list (checked against ``n_total``),
    ``story:NAME`` (the entry's ``neurons``), or ``auto``/``None`` → ``auto()`` where the
    script offers one (a callable returning the list)."""
    if isinstance(spec, str) and spec.startswith("story:"):
        entry = story_entry(spec, config or {})
        spec = entry["neurons"] if isinstance(entry, dict) else entry
    if spec is None or spec == "auto":
        if auto is None:
            raise ValueError(f"{what}: give a list of channel indices or 'story:NAME'")
        return [int(i) for i in auto()]
    if isinstance(spec, (int, np.integer)):
        spec = [int(spec)]
    if not isinstance(spec, (list, tuple)) or not spec:
        raise ValueError(f"{what} must be a non-empty list of channel indices, 'story:NAME' or 'auto'; got {spec!r}")
    out = [int(i) for i in spec]
    bad = [i for i in out if i < 0 or i >= n_total]
    if bad:
        raise ValueError(f"{what}: indices {bad} are out of range for a layer with {n_total} channels (0..{n_total - 1})")
    return out


def support_box(w: Any) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)``: the bounding box of the positions where weights ``[..., kh, kw]`` are
    non-zero (the whole window when all are zero). Expanded weights come in the receptive-field
    window of a layer; a neuron whose kernel is smaller has zero padding there, which is not a
    weight and should not be drawn as one."""
    a = np.abs(np.asarray(_numpy(w), dtype=np.float64))
    nz = a.reshape(-1, *a.shape[-2:]).sum(0) > 0
    if not nz.any():
        return 0, a.shape[-2], 0, a.shape[-1]
    ys, xs = np.flatnonzero(nz.any(1)), np.flatnonzero(nz.any(0))
    return int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1


def on_support(w: Any) -> Any:
    """``w [..., kh, kw]`` cropped to :func:`support_box` (for drawing)."""
    y0, y1, x0, x1 = support_box(w)
    return w[..., y0:y1, x0:x1]


def grid_shape(n: int) -> tuple[int, int]:
    """Rows and columns for ``n`` panels, as square as possible."""
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


# ---------------------------------------------------------------------------- feature vis


def feature_vis(run: Run, targets: Sequence[Union[str, Objective]]) -> list[np.ndarray]:
    """Feature visualizations (display form: ``[H, W, 3]`` or ``[H, W]`` in ``[0, 1]``), in order,
    rendered with the config's ``render:`` settings (the keyword arguments of
    :func:`circuits.featurevis.render`; cached by content when ``cache`` is set).

    ``render.steps: 0`` skips optimisation (returns the random starting images, for tests).
    """
    if not targets:
        return []
    result = render(run.model, list(targets), **run.render_settings())
    return [result.image(i) for i in range(len(result))]


def add_caption(result: Any, lines: Sequence[str], fontsize: float = 7.0, title: Optional[str] = None) -> None:
    """Write ``lines`` (the figure's claims and controls) below everything already drawn (tick
    labels included), wrapped to the figure's width; ``title``, if given, above everything."""
    fig = getattr(result, "figure", result)
    if not hasattr(fig.canvas, "get_renderer"):
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        FigureCanvasAgg(fig)
    box = fig.get_tightbbox(fig.canvas.get_renderer())  # inches
    h = fig.get_figheight()
    width = max(20, int(fig.get_figwidth() * 72 / (fontsize * 0.52)))
    text = "\n".join(textwrap.fill(line, width) for line in lines)
    fig.text(0.5, min(0.0, box.y0 / h) - 0.04 / h, text, ha="center", va="top", fontsize=fontsize)
    if title:
        fig.text(0.5, max(1.0, box.y1 / h) + 0.06 / h, title, ha="center", va="bottom", fontsize=9)


def centre_activation(model: nn.Module, images01: torch.Tensor, layer: str, channel: int) -> torch.Tensor:
    """``[B]`` activation of ``layer:channel`` at the centre for images in ``[0, 1]``."""
    from circuits.models import preprocess_input

    with torch.no_grad():
        a = run_until(model, preprocess_input(model, images01), [layer])[layer]
    if a.ndim == 4:
        return a[(slice(None), channel, *centre(a.shape[2], a.shape[3]))]
    return a[:, channel]


def sparse_images(run: Run, layer: str, channels: Sequence[int], n_total: int, extra: Sequence[str] = ()) -> tuple[list[Optional[np.ndarray]], list[np.ndarray]]:
    """Feature visualizations of ``layer``'s ``channels`` placed in a list of ``n_total``
    (``None`` elsewhere, for figures indexed by input channel), plus those of ``extra`` targets.
    One batched render for all of them."""
    targets = [f"{layer}:{c}" for c in channels] + list(extra)
    imgs = feature_vis(run, targets)
    full: list[Optional[np.ndarray]] = [None] * n_total
    for c, im in zip(channels, imgs):
        full[c] = im
    return full, imgs[len(channels):]


def connection_panel(in_image: Optional[np.ndarray], w2d: np.ndarray, out_image: Optional[np.ndarray], in_label: str, out_label: str, title: str):
    """Three panels: input neuron's variable name → its weight slice → output neuron's (article fig. 3)."""
    from matplotlib.figure import Figure

    from circuits.figures import DIVERGING, FigureResult, symmetric_limit

    fig = Figure(figsize=(6.0, 2.4))
    axes = fig.subplots(1, 3)
    m = symmetric_limit(w2d)
    for ax, im, lab in ((axes[0], in_image, in_label), (axes[2], out_image, out_label)):
        ax.set_xticks([]); ax.set_yticks([])
        if im is not None:
            ax.imshow(im, cmap="gray" if im.ndim == 2 else None, vmin=0, vmax=1)
        ax.set_title(lab, fontsize=8)
    h = axes[1].imshow(w2d, cmap=DIVERGING, vmin=-m, vmax=m, interpolation="nearest")
    axes[1].set_xticks([]); axes[1].set_yticks([])
    axes[1].set_title("weights", fontsize=8)
    fig.colorbar(h, ax=axes[1], shrink=0.7)
    fig.suptitle(title, fontsize=9)
    return FigureResult(fig, {"weights": w2d, "vmin": -m, "vmax": m})
