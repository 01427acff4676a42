"""The atlas plan: every piece of work for every neuron of the chosen layers, as tasks.

:func:`make_plan` turns ``(model, layers, settings)`` into an :class:`AtlasPlan`, a plain,
JSON-serialisable list of :class:`AtlasTask` that any engine (:mod:`.local`, :mod:`.ray_engine`)
can run in any order:

- ``render`` tasks: one batch of feature visualizations each (targets of one layer, as many
  as the device's memory allows, see :func:`batch_size_for`). Their results are the
  featurevis cache files themselves (``<store>/<model hash>/<k[:2]>/<k>.npz``), so the plan
  knows in advance which file each target will produce and a task is done exactly when all
  of its files exist. Rendered are the chosen neurons and, by default, every channel of
  their upstream layers (the neurons the pages show as inputs), so that building the pages
  afterwards renders nothing.
- ``tables`` tasks: one per chosen layer: the direct/expanded weights from each upstream
  layer, the L2 ranking of the inputs (top-``k`` slices kept) and the NMF factors of each
  neuron's weights — the data of the pages' connection sections.
- ``examples`` tasks: one per chosen layer when a dataset is configured: the top dataset
  images of every neuron.

Every result file is written atomically, so an interrupted run leaves complete files or
none, and a restarted run skips every task whose files exist (:meth:`AtlasPlan.pending`).
:func:`circuits.atlas.estimate.estimate` times a short real run of each kind of task and
extrapolates the run (``circuits atlas --dry-run``).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .._io import PathLike, atomic_write_text, state_dict_hash
from ..datasets import resolve_dataset
from ..figures.pages import PageSettings, split_overrides
from ..layers import get_layer, layer_names, split_call
from ..models import device_and_dtype
from ..models import input_shape as model_input_shape
from ..wiring import NeuronSpec, channel_counts, default_upstream, interesting_layers, select_neurons
from .store import ResultStore

__all__ = [
    "AtlasTask",
    "AtlasPlan",
    "make_plan",
    "batch_size_for",
    "cache_requests",
    "cache_relpath",
]

TASK_KINDS = ("tables", "examples", "render")
_TABLES_VERSION = 1
_EXAMPLES_VERSION = 1

#: Memory budget heuristic of :func:`batch_size_for`.
CPU_BUDGET_BYTES = 2 * 1024**3
CPU_MAX_BATCH = 64
GPU_BUDGET_FRACTION = 0.5
GPU_MAX_BATCH = 256


@dataclass
class AtlasTask:
    """One unit of work.

    Attributes:
        id: unique, readable: ``"render-mixed3a-002"``, ``"tables-mixed3b"``.
        kind: ``"render"``, ``"tables"`` or ``"examples"``.
        layer: the layer it works on.
        targets: ``"layer:channel"`` strings (the batch of a render task; a layer's neurons otherwise).
        outputs: store-relative paths of the files the task writes; it is done when all exist.
    """

    id: str
    kind: str
    layer: str
    targets: list[str]
    outputs: list[str]

    @property
    def size(self) -> int:
        """Number of neurons the task handles."""
        return len(self.targets)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AtlasTask":
        return cls(str(d["id"]), str(d["kind"]), str(d["layer"]), list(d["targets"]), list(d["outputs"]))


@dataclass
class AtlasPlan:
    """Everything an engine needs to build an atlas (JSON round-trips with :meth:`to_json`).

    ``neurons`` are the chosen neurons (full pages) per layer; ``upstream`` the layers whose
    weights into each chosen layer are tabulated and shown; ``settings`` what the pages show
    (:class:`~circuits.figures.pages.PageSettings`, the same the neuron pages take);
    ``dataset`` the data set the examples come from (resolved: a name or ``None``);
    ``batch_sizes`` the render batch per layer.
    """

    model_hash: str
    model_class: str
    device: str
    layers: list[str]
    neurons: dict[str, list[int]]
    upstream: dict[str, list[str]]
    settings: PageSettings
    dataset: Optional[str]
    batch_sizes: dict[str, int]
    tasks: list[AtlasTask] = field(default_factory=list)

    @property
    def render(self) -> dict[str, Any]:
        """The feature-visualization settings (``settings.render``)."""
        return dict(self.settings.render)

    @property
    def top_k(self) -> int:
        return self.settings.top_k

    @property
    def n_factors(self) -> int:
        return self.settings.n_factors

    @property
    def factor_threshold(self) -> float:
        return self.settings.factor_threshold

    @property
    def dataset_size(self) -> int:
        return self.settings.dataset_size

    @property
    def n_examples(self) -> int:
        return self.settings.n_examples

    # -- views
    def tasks_of(self, kind: str) -> list[AtlasTask]:
        """The tasks of one kind, in plan order."""
        if kind not in TASK_KINDS:
            raise ValueError(f"task kind must be one of {TASK_KINDS}, got {kind!r}")
        return [t for t in self.tasks if t.kind == kind]

    @property
    def n_neurons(self) -> int:
        """Chosen neurons (each gets a full page)."""
        return sum(len(v) for v in self.neurons.values())

    @property
    def render_targets(self) -> list[str]:
        """Every target a render task renders (chosen neurons and upstream channels)."""
        return [t for task in self.tasks_of("render") for t in task.targets]

    def task(self, task_id: str) -> AtlasTask:
        for t in self.tasks:
            if t.id == task_id:
                return t
        raise KeyError(f"no task {task_id!r} in the plan")

    def pending(self, store: Union[ResultStore, str, PathLike]) -> list[AtlasTask]:
        """Tasks with at least one output missing from ``store`` (what a run still has to do)."""
        store = store if isinstance(store, ResultStore) else ResultStore(store)
        present = store.existing([o for t in self.tasks for o in t.outputs])
        return [t for t in self.tasks if not all(o in present for o in t.outputs)]

    def missing_outputs(self, store: Union[ResultStore, str, PathLike]) -> list[str]:
        """Output files not yet in ``store``."""
        store = store if isinstance(store, ResultStore) else ResultStore(store)
        outs = [o for t in self.tasks for o in t.outputs]
        present = store.existing(outs)
        return [o for o in outs if o not in present]

    def fingerprint(self) -> str:
        """SHA-256 (16 hex) of the plan: identical plans, identical fingerprints."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    # -- (de)serialisation
    def to_dict(self) -> dict:
        d = asdict(self)
        d["settings"] = self.settings.to_dict()
        d["tasks"] = [t.to_dict() for t in self.tasks]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=1)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AtlasPlan":
        d = dict(d)
        d["tasks"] = [AtlasTask.from_dict(t) for t in d.get("tasks", [])]
        d["neurons"] = {k: [int(c) for c in v] for k, v in d["neurons"].items()}
        d["settings"] = PageSettings.from_dict(d["settings"])
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "AtlasPlan":
        return cls.from_dict(json.loads(text))

    def save(self, path: PathLike) -> None:
        """Write the plan as JSON (atomically)."""
        atomic_write_text(path, self.to_json())

    def summary(self, store: Union[None, ResultStore, str, PathLike] = None) -> str:
        """A few lines for people: layers, neurons, tasks by kind, and what is already done."""
        lines = [
            f"atlas plan {self.fingerprint()} for {self.model_class} (weights {self.model_hash}) on {self.device}",
            "  layers: " + ", ".join(f"{l} ({len(self.neurons[l])})" for l in self.layers)
            + f" = {self.n_neurons} neurons",
            f"  feature visualizations: {len(self.render_targets)} images "
            f"({self.render.get('steps', 512)} steps, seed {self.render.get('seed', 0)}), batches "
            + ", ".join(f"{l}:{b}" for l, b in self.batch_sizes.items()),
            f"  dataset examples: {self.dataset or 'none'}"
            + (f" (first {self.dataset_size} images, top {self.n_examples})" if self.dataset else ""),
        ]
        pend = {t.id for t in self.pending(store)} if store is not None else None
        for kind in TASK_KINDS:
            ts = self.tasks_of(kind)
            if not ts:
                continue
            line = f"  {kind} tasks: {len(ts)}"
            if pend is not None:
                left = [t for t in ts if t.id in pend]
                line += f" ({len(left)} to do, {len(ts) - len(left)} done)"
            lines.append(line)
        return "\n".join(lines)


# ----------------------------------------------------------------------------- featurevis cache keys


def cache_requests(model: nn.Module, targets: Sequence[str], render: Mapping[str, Any], device_type: str = "cpu") -> list[dict]:
    """The featurevis cache request of each target (what :func:`~circuits.featurevis.render`
    with the plan's ``render`` settings on a ``device_type`` device stores); see
    :func:`circuits.featurevis.rendering.cache_requests`."""
    from ..featurevis import cache_requests as featurevis_requests

    return featurevis_requests(model, list(targets), device=device_type, **dict(render))


def cache_relpath(request: Mapping[str, Any]) -> str:
    """Store-relative path of a featurevis cache request (the :class:`FeatureVisCache` layout)."""
    from ..featurevis import FeatureVisCache

    return FeatureVisCache.relpath(dict(request))


def _task_relpath(kind: str, request: Mapping[str, Any]) -> str:
    k = hashlib.sha256(json.dumps(request, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()
    return f"atlas-tasks/{kind}/{k[:2]}/{k}.npz"


# ----------------------------------------------------------------------------- batch sizes


def _floats_per_image(model: nn.Module, layer: str, out_size: tuple[int, int]) -> int:
    """Activation floats one image produces up to ``layer`` (every named layer's output + the input)."""
    from ..featurevis import activation_floats_per_image

    return activation_floats_per_image(model, [layer], out_size)


def batch_size_for(model: nn.Module, layer: str, device: Union[str, torch.device, None] = None,
                   render: Optional[Mapping[str, Any]] = None, free_bytes: Optional[int] = None) -> int:
    """Render batch for ``layer`` from a simple memory heuristic.

    One image costs ``floats × 4 bytes × 3`` (activations kept for the backward pass, their
    gradients, workspace), where ``floats`` counts every named activation up to ``layer`` at
    the model's input size (plus the image). The budget is :data:`GPU_BUDGET_FRACTION` of the
    free GPU memory (capped at :data:`GPU_MAX_BATCH` images), or :data:`CPU_BUDGET_BYTES` on
    the CPU (capped at :data:`CPU_MAX_BATCH`; bigger CPU batches are not faster per image).
    ``free_bytes`` overrides the measured free memory (e.g. a cluster's GPUs seen from a
    driver without one).
    """
    render = dict(render or {})
    _c, in_h, in_w = model_input_shape(model)
    rt = render.get("resize_to")
    out_size = (int(rt), int(rt)) if isinstance(rt, int) else (tuple(rt) if rt else (in_h, in_w))  # type: ignore[arg-type]
    floats = _floats_per_image(model, layer, out_size)  # type: ignore[arg-type]
    per_image = floats * 4 * 3
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        if free_bytes is None:
            free_bytes, _ = torch.cuda.mem_get_info(dev)
        budget, cap = free_bytes * GPU_BUDGET_FRACTION, GPU_MAX_BATCH
    else:
        budget, cap = (free_bytes if free_bytes is not None else CPU_BUDGET_BYTES), CPU_MAX_BATCH
    return int(max(1, min(cap, budget // max(per_image, 1))))


# ----------------------------------------------------------------------------- the plan


def make_plan(
    model: nn.Module,
    layers: Optional[Sequence[str]] = None,
    settings: Optional[PageSettings] = None,
    *,
    neurons: NeuronSpec = None,
    upstream: Optional[Mapping[str, Sequence[str]]] = None,
    upstream_renders: str = "all",
    batch_size: Optional[int] = None,
    device: Union[str, torch.device, None] = None,
    device_free_bytes: Optional[int] = None,
    **overrides: Any,
) -> AtlasPlan:
    """Plan the atlas of ``layers`` (default: the layers the pages use, e.g.
    ``mixed3a, mixed3b, mixed4a``; every channel unless ``neurons`` picks some).

    Args:
        model: the model (its weights' hash keys every result).
        layers: layers whose neurons get full pages.
        settings: what the pages show (:class:`~circuits.figures.pages.PageSettings`);
            keyword ``overrides`` replace single fields (``top_k=2``) or render settings
            (``steps=512``, ``seed=0``, ``size=...``), as for :func:`~circuits.figures.pages.build_pages`.
        neurons: a subset, as :func:`circuits.wiring.select_neurons` takes it.
        upstream: ``{layer: [upstream layers]}`` (default :func:`circuits.wiring.default_upstream`).
        upstream_renders: ``"all"``: render every channel of every upstream layer too (the
            pages then render nothing); ``"none"``: only the chosen neurons.
        batch_size: images per render task (default: :func:`batch_size_for` per layer).
        device: the device the tasks render on (default: the model's).
        device_free_bytes: memory to plan batches for, instead of measuring it here.
    """
    settings = split_overrides(settings, overrides)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if upstream_renders not in ("all", "none"):
        raise ValueError(f"upstream_renders must be 'all' or 'none', got {upstream_renders!r}")
    render_opts = dict(settings.render)

    layers = list(layers) if layers else interesting_layers(model)
    for layer in layers:
        get_layer(model, layer)  # UnknownLayerError with close matches
    counts = channel_counts(model)
    chosen = select_neurons(counts if all(l in counts for l in layers) else model, layers, neurons)
    layers = list(chosen)
    ups = {l: list(upstream[l]) if upstream and l in upstream else default_upstream(model, l) for l in layers}
    for us in ups.values():
        for u in us:
            get_layer(model, u)
            if u not in counts:
                raise ValueError(f"upstream layer {u!r} has no channel axis")

    mdev, _ = device_and_dtype(model)
    dev = torch.device(device) if device is not None else mdev
    dataset_name = resolve_dataset(model_input_shape(model), settings.dataset)
    mhash = state_dict_hash(model)

    # what to render, per layer (chosen layers first, then upstream ones in model order)
    render_sets: dict[str, set[int]] = {l: set(chs) for l, chs in chosen.items()}
    if upstream_renders == "all":
        for us in ups.values():
            for u in us:
                render_sets.setdefault(u, set()).update(range(counts[u]))
    rank = {n: i for i, n in enumerate(layer_names(model))}
    order = sorted(render_sets, key=lambda n: (rank.get(split_call(n)[0], len(rank)), n))

    batch_sizes: dict[str, int] = {}
    for l in order:
        if batch_size is not None:
            batch_sizes[l] = batch_size
        elif dev.type == "cuda" and device_free_bytes is None and not torch.cuda.is_available():
            batch_sizes[l] = CPU_MAX_BATCH  # planning for GPUs this machine does not have
        else:
            batch_sizes[l] = batch_size_for(model, l, dev, render_opts, device_free_bytes)

    tasks: list[AtlasTask] = []
    base_req = {"model": mhash, "model_class": type(model).__name__}
    for l in layers:
        req = dict(base_req, kind="tables", version=_TABLES_VERSION, layer=l, channels=chosen[l], upstream=ups[l],
                   top_k=settings.top_k, n_factors=settings.n_factors)
        tasks.append(AtlasTask(f"tables-{l}", "tables", l, [f"{l}:{c}" for c in chosen[l]], [_task_relpath("tables", req)]))
    if dataset_name is not None:
        for l in layers:
            req = dict(base_req, kind="examples", version=_EXAMPLES_VERSION, layer=l, channels=chosen[l],
                       dataset=dataset_name, dataset_size=settings.dataset_size, k=settings.n_examples)
            tasks.append(AtlasTask(f"examples-{l}", "examples", l, [f"{l}:{c}" for c in chosen[l]],
                                   [_task_relpath("examples", req)]))
    all_targets = [f"{l}:{c}" for l in order for c in sorted(render_sets[l])]
    all_paths = dict(zip(all_targets, (cache_relpath(r) for r in cache_requests(model, all_targets, render_opts, dev.type))))
    for l in order:
        targets = [f"{l}:{c}" for c in sorted(render_sets[l])]
        paths = [all_paths[t] for t in targets]
        bs = batch_sizes[l]
        width = max(3, len(str(max(0, math.ceil(len(targets) / bs) - 1))))
        for j in range(0, len(targets), bs):
            tasks.append(AtlasTask(f"render-{l}-{j // bs:0{width}d}", "render", l, targets[j:j + bs], paths[j:j + bs]))

    return AtlasPlan(
        model_hash=mhash, model_class=type(model).__name__, device=str(dev), layers=layers,
        neurons={l: list(chs) for l, chs in chosen.items()}, upstream=ups, settings=settings,
        dataset=dataset_name, batch_sizes=batch_sizes, tasks=tasks,
    )
