"""The dry run's estimate: how long the run will take, from a short real run of each part.

:func:`estimate` runs, in a temporary folder that is deleted afterwards, a little of every
kind of work the run will do, with the run's settings and thread count, and scales each up:

- **renders**, per layer with pending renders: one task batch of the layer's real targets,
  rendered for 0 steps and for ``k = calibration_steps`` steps, with and without the
  redirected ReLU (into a throw-away cache, so the writes are timed too): the first 16 steps,
  which use the redirected ReLU, cost up to 1.5 times the others. A task of ``n`` images
  costs ``(t0 + redirected steps · a + other steps · b) · n / batch``; when ``steps <= k``
  the batch is simply rendered for ``steps`` steps.
- **tables**, per pending ``tables`` task: the real task on one neuron (twice: the first call
  on a layer costs more, and so does the run's) and on up to :data:`TABLES_NEURONS` neurons of
  the layer, fitted as ``a + b · neurons``.
- **examples**, per pending ``examples`` task: the real task on the layer's neurons over
  :data:`EXAMPLES_IMAGES` images of the data set; the scan scales with the number of images,
  the loading of the data set (timed apart) does not.
- **pages** (when the run will build them): the pages of a miniature atlas
  (:data:`PAGES_NEURONS` neurons per layer, 0-step renders), timed per file written; the run's
  files are counted from the plan and the miniature's tables (how many sections and inputs a
  neuron shows; the inputs of all pages as the union of top-``k`` picks).
- **start-up**: what the first call of each kind costs beyond the second (imports, kernels
  loaded on first use), which a fresh process pays once; **planning**: as measured.

The estimate is for this machine under its present load, one device (on Ray the tasks'
seconds divide among the workers). ``benchmarks/bench_atlas.py --estimate`` compares it with
real runs.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .._io import PathLike
from ..datasets import load_dataset
from ..figures.pages import neuron_index
from ..wiring import channel_counts
from .pages import build_atlas_pages
from .plan import TASK_KINDS, AtlasPlan, AtlasTask, make_plan
from .store import ResultStore
from .tasks import check_threads, read_tables, run_task, torch_threads

__all__ = ["PlanEstimate", "estimate", "TABLES_NEURONS", "EXAMPLES_IMAGES", "PAGES_NEURONS"]

#: Neurons of a layer the tables calibration computes (the second point of the fit).
TABLES_NEURONS = 32
#: Data set images the examples calibration scans.
EXAMPLES_IMAGES = 256
#: Neurons per layer of the miniature atlas whose pages are timed.
PAGES_NEURONS = 6

PHASES = ("plan", "start-up", "tables", "examples", "render", "pages")


@dataclass
class PlanEstimate:
    """What ``--dry-run`` prints.

    Attributes:
        tasks: number of tasks per kind; ``pending``: still to do per kind.
        renders_pending: images still to render.
        seconds: estimated seconds per phase of the run (:data:`PHASES`: planning, start-up,
            tables, examples, render, pages), on one device with ``threads`` torch threads.
        seconds_per_step: calibrated seconds of one optimisation step of one full task batch, per
            layer (the mean over the run's steps).
        calibration_seconds: wall time the calibration took.
        threads: torch threads the calibration (and so the estimate) used.
        pages_files: files the pages are estimated to have (0 when no pages will be built).
    """

    tasks: dict[str, int]
    pending: dict[str, int]
    renders_pending: int
    seconds: dict[str, float]
    seconds_per_step: dict[str, float]
    calibration_seconds: float
    threads: int = 1
    pages_files: int = 0

    @property
    def render_seconds(self) -> float:
        """Estimated seconds of the pending render tasks."""
        return self.seconds.get("render", 0.0)

    @property
    def task_seconds(self) -> float:
        """Estimated seconds of the pending tasks (what Ray divides among its workers)."""
        return sum(self.seconds.get(k, 0.0) for k in TASK_KINDS)

    @property
    def total_seconds(self) -> float:
        """Estimated wall time of the whole run (planning, start-up, tasks, pages) on one device."""
        return sum(self.seconds.values())

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["total_seconds"] = self.total_seconds
        return d

    def __str__(self) -> str:
        lines = ["tasks: " + ", ".join(f"{k} {v} ({self.pending.get(k, 0)} to do)" for k, v in self.tasks.items())]
        lines.append(f"images to render: {self.renders_pending}")
        for layer, s in self.seconds_per_step.items():
            lines.append(f"  {layer}: {s * 1e3:.1f} ms per step per batch")
        parts = ", ".join(f"{k} {_hms(v)}" for k, v in self.seconds.items() if v > 0 or k in TASK_KINDS)
        lines.append(f"estimated run time: {_hms(self.total_seconds)} on one device with {self.threads} torch "
                     f"thread(s) ({parts})")
        lines.append(f"(calibrated on a short real run of each part, which took {self.calibration_seconds:.1f} s; "
                     f"on Ray the tasks' {_hms(self.task_seconds)} divide among the workers)")
        return "\n".join(lines)


def _hms(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    s = int(round(seconds))
    return f"{s // 3600}h{(s % 3600) // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class _Clock:
    """Times calls with the run's thread count in force (set again each time: libraries change it)."""

    def __init__(self, threads: int, cuda: bool):
        self.threads, self.cuda = threads, cuda
        self.startup = 0.0

    def __call__(self, fn: Callable[[], Any]) -> float:
        torch.set_num_threads(self.threads)
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def warm(self, fn: Callable[[], Any]) -> float:
        """Time ``fn`` twice; the excess of the first call counts as start-up; returns the second."""
        cold = self(fn)
        again = self(fn)
        self.startup += max(0.0, cold - again)
        return again


def _spread(channels: list[int], k: int) -> list[int]:
    """``k`` of ``channels``, evenly spaced (every branch of a mixed block is visited)."""
    k = min(k, len(channels))
    return sorted({channels[min(len(channels) - 1, int((i + 0.5) * len(channels) / k))] for i in range(k)})


def _subplan(plan: AtlasPlan, layer: str, channels: list[int], **settings: Any) -> AtlasPlan:
    return dataclasses.replace(plan, neurons=dict(plan.neurons, **{layer: channels}),
                               settings=plan.settings.replace(**settings) if settings else plan.settings, tasks=[])


def _subtask(task: AtlasTask, layer: str, channels: list[int], tag: str) -> AtlasTask:
    return AtlasTask(f"{task.id}-{tag}", task.kind, layer, [f"{layer}:{c}" for c in channels],
                     [f"calibration/{task.kind}-{tag}-{layer}.npz"])


def _render_seconds(plan: AtlasPlan, model: nn.Module, pending: list[AtlasTask], clock: _Clock, tmp: Path,
                    calibration_steps: int, max_batch: Optional[int], progress: bool
                    ) -> tuple[float, dict[str, float]]:
    from ..featurevis import FeatureVisCache, render
    from ..featurevis.rendering import REDIRECT_STEPS

    opts = {k: v for k, v in plan.render.items() if k != "steps"}
    steps = int(plan.render.get("steps", 512))
    relu = opts.get("redirected_relu", True)
    redirect = REDIRECT_STEPS if relu is True else (0 if relu is False else int(relu))
    layers = list(dict.fromkeys(t.layer for t in pending))
    if not layers:
        return 0.0, {}
    folders = iter(range(1 << 30))
    k = calibration_steps

    def run(targets: list[str], n_steps: int, **changes: Any) -> Callable[[], Any]:
        kw = dict(opts, **changes)
        return lambda: render(model, targets, steps=n_steps, cache=FeatureVisCache(tmp / f"render-{next(folders)}"),
                              batch_size=len(targets), progress=False, **kw)

    clock.warm(run(pending[0].targets[:1], 0))
    total, per_step = 0.0, {}
    for layer in tqdm(layers, desc="calibrating renders", unit="layer", disable=not progress, leave=False):
        tasks = [t for t in pending if t.layer == layer]
        full = plan.batch_sizes[layer]
        nb = full if max_batch is None else min(full, max_batch)
        targets = (tasks[0].targets * math.ceil(nb / len(tasks[0].targets)))[:nb]
        if steps <= k:  # a short run: time the real thing
            t_task = clock(run(targets, steps))
            per_step[layer] = t_task / (steps + 1) * full / nb
        else:
            # steps with the redirected ReLU (the first ``redirect``) cost more than the others
            t0 = clock(run(targets, 0))
            plain = redirected = 0.0
            if steps > redirect:
                plain = max(clock(run(targets, k, redirected_relu=False)) - t0, 0.0) / k
            if redirect:
                t_r = clock(run(targets, k))
                redirected = max(t_r - t0 - max(0, k - redirect) * plain, 0.0) / min(k, redirect)
            t_task = t0 + min(steps, redirect) * redirected + max(0, steps - redirect) * plain
            per_step[layer] = (t_task - t0) / steps * full / nb
        total += sum(t_task * t.size / nb for t in tasks)
    return total, per_step


def _tables_seconds(plan: AtlasPlan, model: nn.Module, pending: list[AtlasTask], clock: _Clock, store: ResultStore) -> float:
    total = 0.0
    for i, task in enumerate(pending):
        channels = plan.neurons[task.layer]
        small, big = _spread(channels, 1), _spread(channels, TABLES_NEURONS)

        def run(chs: list[int], tag: str) -> Callable[[], Any]:
            return lambda: run_task(model, _subplan(plan, task.layer, chs), _subtask(task, task.layer, chs, tag), store)

        # the first call on a layer costs more (the layer's wiring and weights are prepared once):
        # the run pays that too, once per layer; the very first call also loads what a process loads once
        cold = clock(run(small, "one"))
        t1 = clock(run(small, "one"))
        first_on_layer = max(0.0, cold - t1)
        if i == 0:
            clock.startup += first_on_layer
            first_on_layer = 0.0
        tb = clock(run(big, "some"))
        if len(big) == len(channels):
            total += first_on_layer + tb
            continue
        per_neuron = (tb - t1) / (len(big) - 1) if tb > t1 else tb / len(big)
        total += first_on_layer + t1 + per_neuron * (len(channels) - 1)
    return total


def _examples_seconds(plan: AtlasPlan, model: nn.Module, pending: list[AtlasTask], clock: _Clock, store: ResultStore) -> float:
    if not pending or plan.dataset is None:
        return 0.0
    size = plan.dataset_size
    sample = min(size, EXAMPLES_IMAGES)
    load = clock.warm(lambda: load_dataset(plan.dataset, size))  # type: ignore[arg-type]
    total = 0.0
    for i, task in enumerate(pending):
        sub = _subplan(plan, task.layer, plan.neurons[task.layer], dataset_size=sample)
        fn = lambda: run_task(model, sub, _subtask(task, task.layer, plan.neurons[task.layer], "sample"), store)  # noqa: E731
        t = clock.warm(fn) if i == 0 else clock(fn)
        total += load + max(0.0, t - load) * size / sample
    return total


def _page_files(plan: AtlasPlan, model: nn.Module, mini: AtlasPlan, mini_store: ResultStore) -> tuple[int, int, int]:
    """``(files, input neurons, input neurons not rendered by the tasks)`` of the run's pages.

    Per chosen neuron: a page, its image, its examples strip and its sections' images (as many
    as the miniature's neurons of that layer show on average). Per input neuron shown (the
    union of the chosen neurons' top-``k`` picks, counted as if the picks were random): a page
    and its image. Plus the colour bar and the indexes."""
    counts = channel_counts(model)
    planned = {}
    for target in plan.render_targets:
        planned.setdefault(_layer_of(target), set()).add(int(target.rsplit(":", 1)[1]))
    per_neuron: dict[str, float] = {}
    shows: dict[tuple[str, str], tuple[float, float]] = {}  # (layer, upstream) -> (share of neurons, inputs shown)
    for layer in mini.layers:
        tables = read_tables(mini_store, mini, layer)
        n = max(1, len(tables))
        images = sum(len(s.channels) + (s.rgb is not None) for secs in tables.values() for s in secs)
        per_neuron[layer] = 2 + (plan.dataset is not None) + images / n
        for up in plan.upstream[layer]:
            secs = [s for secs in tables.values() for s in secs if s.upstream == up]
            if secs:
                shows[(layer, up)] = (len(secs) / n, sum(len(s.channels) for s in secs) / len(secs))
    chosen = sum(per_neuron[layer] * len(chs) for layer, chs in plan.neurons.items())
    inputs = unplanned = 0.0
    shown_layers = set(plan.neurons)
    for up in {u for us in plan.upstream.values() for u in us}:
        missed = 1.0
        for layer, chs in plan.neurons.items():
            if (layer, up) in shows:
                share, k = shows[(layer, up)]
                missed *= (1 - min(1.0, k / counts[up])) ** (share * len(chs))
        if missed < 1.0:
            shown_layers.add(up)
            others = counts[up] - len(set(plan.neurons.get(up, [])))
            inputs += others * (1 - missed)
            rendered = len(planned.get(up, set()) - set(plan.neurons.get(up, [])))
            unplanned += (others - rendered) * (1 - missed)
    return int(round(chosen + 2 * inputs + 2 + len(shown_layers))), int(round(inputs)), int(round(unplanned))


def _pages_seconds(plan: AtlasPlan, model: nn.Module, clock: _Clock, tmp: Path, calibration_steps: int) -> tuple[float, int]:
    """Time the pages of a miniature atlas and scale them to the run's (see :func:`_page_files`).

    Besides writing files, the pages load the data set once, render the input neurons the
    tasks did not (``upstream_renders="none"``) and scan the data set for the input neurons'
    examples (the tasks scan only for the chosen ones): these are timed apart and scaled by
    their own counts."""
    from ..featurevis import FeatureVisCache, dataset_examples, render

    sample = min(plan.dataset_size, EXAMPLES_IMAGES)
    steps = int(plan.render.get("steps", 512))
    mini = make_plan(model, plan.layers, plan.settings.replace(render=dict(plan.render, steps=0), dataset_size=sample),
                     neurons={layer: _spread(chs, PAGES_NEURONS) for layer, chs in plan.neurons.items()},
                     upstream=plan.upstream, upstream_renders="none", device=plan.device,
                     batch_size=max(plan.batch_sizes.values(), default=1))
    store = ResultStore(tmp / "mini-store")
    for task in mini.tasks:
        torch.set_num_threads(clock.threads)
        run_task(model, mini, task, store)
    sections = {(layer, c): secs for layer in mini.layers for c, secs in read_tables(store, mini, layer).items()}
    known, _ = neuron_index(mini.neurons, sections)
    inputs = [f"{layer}:{c}" for layer, chs in known.items() for c in sorted(chs) if c not in mini.neurons.get(layer, [])]
    files, n_inputs, unplanned = _page_files(plan, model, mini, store)
    opts = {k: v for k, v in plan.render.items() if k != "steps"}
    # the inputs' images at the miniature's 0 steps, so that its pages render nothing; timed for the run's
    t0 = clock(lambda: render(model, inputs, steps=0, cache=FeatureVisCache(store.local_root), progress=False, **opts))
    renders = 0.0
    if unplanned and inputs:
        n_steps = min(steps, calibration_steps)
        tk = clock(lambda: render(model, inputs, steps=n_steps, cache=FeatureVisCache(tmp / "mini-inputs"),
                                  progress=False, **opts)) if n_steps else t0
        step = (tk - t0) / n_steps if n_steps and tk > t0 else 0.0
        renders = (t0 + steps * step) * unplanned / len(inputs)
    outs = iter([tmp / "mini-pages-cold", tmp / "mini-pages"])
    seconds = clock.warm(lambda: build_atlas_pages(mini, model, store, next(outs), progress=False))
    written = max(1, sum(1 for p in (tmp / "mini-pages").rglob("*") if p.is_file()))
    load = scan = mini_scan = 0.0
    if plan.dataset is not None:
        load = clock(lambda: load_dataset(plan.dataset, plan.dataset_size))  # type: ignore[arg-type]
        if inputs:
            data = load_dataset(plan.dataset, sample)
            mini_scan = clock(lambda: dataset_examples(model, inputs, data, k=plan.n_examples, progress=False))
            scan = mini_scan * plan.dataset_size / sample if n_inputs else 0.0
    per_file = max(0.0, seconds - load - mini_scan) / written
    return load + scan + renders + per_file * files, files


def _layer_of(target: str) -> str:
    return target.rsplit(":", 1)[0]


def estimate(
    plan: AtlasPlan,
    model: nn.Module,
    store: Union[None, ResultStore, str, PathLike] = None,
    calibration_steps: int = 3,
    max_calibration_batch: Optional[int] = None,
    progress: bool = False,
    *,
    pages: bool = True,
    threads: Optional[int] = None,
    plan_seconds: float = 0.0,
) -> PlanEstimate:
    """Estimate the run of ``plan``'s pending tasks (and its pages) from a short real run of each part.

    Args:
        plan: the plan; ``model``: its model (moved to the plan's device).
        store: what is done already (default: nothing).
        calibration_steps: optimisation steps of the timed calibration renders.
        max_calibration_batch: cap on the calibration render batch (default: the task batch;
            smaller batches are scaled linearly, which overestimates on the CPU).
        progress: a progress bar over the calibration.
        pages: whether the run will build the pages.
        threads: torch threads of the run (default: the number in force).
        plan_seconds: the measured time of making the plan (added as "plan").

    Nothing is written to ``store``; the calibration's files go to a temporary folder.
    """
    if not isinstance(calibration_steps, int) or isinstance(calibration_steps, bool) or calibration_steps < 1:
        raise ValueError(f"calibration_steps must be a positive integer, got {calibration_steps!r}")
    if max_calibration_batch is not None and (not isinstance(max_calibration_batch, int) or max_calibration_batch < 1):
        raise ValueError(f"max_calibration_batch must be a positive integer or None, got {max_calibration_batch!r}")
    check_threads(threads)
    is_cuda = torch.device(plan.device).type == "cuda"
    if is_cuda and not torch.cuda.is_available():
        raise ValueError(f"the plan renders on {plan.device}, which this machine does not have: the calibration "
                         "must run on the device it times (run the dry run on a GPU machine)")
    pending = plan.pending(store) if store is not None else list(plan.tasks)
    pend_ids = {t.id for t in pending}
    tasks = {k: len(plan.tasks_of(k)) for k in TASK_KINDS if plan.tasks_of(k)}
    pend = {k: sum(1 for t in plan.tasks_of(k) if t.id in pend_ids) for k in tasks}
    of_kind = {k: [t for t in pending if t.kind == k] for k in TASK_KINDS}
    t_start = time.perf_counter()
    model = model.to(plan.device).eval()
    seconds = dict.fromkeys(PHASES, 0.0)
    seconds["plan"] = float(plan_seconds)
    files = 0
    with torch_threads(threads), tempfile.TemporaryDirectory(prefix="circuits-atlas-estimate-") as tmp_name:
        tmp = Path(tmp_name)
        clock = _Clock(torch.get_num_threads(), is_cuda)
        scratch = ResultStore(tmp / "tasks")
        seconds["tables"] = _tables_seconds(plan, model, of_kind["tables"], clock, scratch)
        seconds["examples"] = _examples_seconds(plan, model, of_kind["examples"], clock, scratch)
        seconds["render"], per_step = _render_seconds(plan, model, of_kind["render"], clock, tmp, calibration_steps,
                                                      None if is_cuda else max_calibration_batch, progress)
        if pages:
            seconds["pages"], files = _pages_seconds(plan, model, clock, tmp, calibration_steps)
        seconds["start-up"] = clock.startup
        threads_used = clock.threads
    return PlanEstimate(tasks, pend, sum(t.size for t in of_kind["render"]), seconds, per_step,
                        time.perf_counter() - t_start, threads_used, files)
