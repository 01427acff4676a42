"""``build_atlas``: plan → run (local or Ray) → neuron pages, resumable at every step.

Layout of ``out_dir``::

    plan.json            the plan of the last run (what ``--dry-run`` prints, as data)
    cache/               the default store: feature visualizations + per-task results
    pages/index.html     the neuron pages (circuits.figures.pages), built when every task is done
    atlas.json           written last: the plan's fingerprint and the run's figures

Run it again after an interruption and it continues: finished tasks are skipped (their files
are in the store), a render task renders only its missing images, and the pages are rebuilt
only when ``atlas.json`` is missing or belongs to another plan.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from torch import nn

from .._io import PathLike, atomic_write_text, check_writable
from ..datasets import DATASET_TITLES, load_dataset
from ..figures.pages import PageData, neuron_index, write_pages
from .local import RunReport, run_local
from .plan import AtlasPlan, PlanEstimate, cache_requests, estimate, make_plan
from .store import ResultStore
from .tasks import read_examples, read_tables

__all__ = ["build_atlas", "AtlasResult", "build_atlas_pages", "ENGINES"]

ENGINES = ("local", "ray")


@dataclass
class AtlasResult:
    """What :func:`build_atlas` did.

    Attributes:
        plan: the plan; ``store``: where results are; ``out_dir``: the output folder.
        report: the engine's :class:`~circuits.atlas.local.RunReport` (``None`` for a dry run).
        estimate: the dry run's :class:`~circuits.atlas.plan.PlanEstimate` (``None`` otherwise).
        index: ``pages/index.html`` when the pages exist.
        pages_rendered: images the page builder had to render (0: the plan covered them all).
        pages_built: whether this call (re)built the pages.
    """

    plan: AtlasPlan
    store: ResultStore
    out_dir: Path
    report: Optional[RunReport] = None
    estimate: Optional[PlanEstimate] = None
    index: Optional[Path] = None
    pages_rendered: int = 0
    pages_built: bool = False

    @property
    def completed(self) -> bool:
        return self.report is not None and self.report.completed and self.index is not None


def _local_cache(plan: AtlasPlan, store: ResultStore, out: Path, progress: bool) -> Path:
    """A local folder with every rendered image: the store itself, or a mirror of a URL store."""
    if store.local_root is not None:
        return store.local_root
    from tqdm.auto import tqdm

    mirror = out / "cache-mirror"
    rels = [o for t in plan.tasks_of("render") for o in t.outputs]
    for rel in tqdm(rels, desc="fetching images", disable=not progress, leave=False):
        if not (mirror / rel).is_file():
            store.download(rel, mirror / rel)
    return mirror


def build_atlas_pages(plan: AtlasPlan, model: nn.Module, store: ResultStore, out_dir: PathLike,
                      progress: bool = True, title: Optional[str] = None) -> tuple[Path, int]:
    """Build the neuron pages of a finished plan into ``out_dir/pages``.

    The weights/NMF sections come from the ``tables`` tasks, the feature visualizations from
    the store and the dataset examples from the ``examples`` tasks. Neurons the plan did not
    render or scan (inputs shown on the pages when the plan was made with
    ``upstream_renders="none"``) are rendered and scanned here. Returns ``(index.html, images
    rendered while building)``.
    """
    from ..featurevis import FeatureVisCache, dataset_examples, render, variable_names

    out = Path(out_dir)
    device = plan.device
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():  # a driver without the cluster's GPUs: forward passes only
            device = "cpu"
    model = model.to(device).eval()
    cache = FeatureVisCache(_local_cache(plan, store, out, progress))
    sections = {(layer, c): secs for layer in plan.layers for c, secs in read_tables(store, plan, layer).items()}
    known, _ = neuron_index(plan.neurons, sections)
    targets = [f"{layer}:{c}" for layer, chs in known.items() for c in sorted(chs)]
    requests = cache_requests(model, targets, plan.render, plan.device.split(":")[0])
    unplanned = [t for t, r in zip(targets, requests) if r not in cache]
    if unplanned:
        render(model, unplanned, cache=cache, progress=progress, **plan.render)
    images = variable_names(model, targets, cache=cache, progress=False, **plan.render)
    data, examples, name = None, {}, ""
    if plan.dataset:
        data, name = load_dataset(plan.dataset, plan.dataset_size), DATASET_TITLES.get(plan.dataset, plan.dataset)
        for layer in plan.layers:
            examples.update(read_examples(store, plan, layer))
        rest = [t for t in targets if t not in examples]
        if rest:
            found = dataset_examples(model, rest, data, k=plan.n_examples, progress=progress)
            examples.update({t: (ex.indices.cpu().numpy(), ex.values.cpu().numpy()) for t, ex in found.items()})
    settings = plan.settings.replace(title=title or plan.settings.title or f"{plan.model_class} atlas")
    page = PageData.build(model, plan.neurons, plan.upstream, sections, settings, images=images,
                          examples=examples, example_images=data, dataset_name=name)
    return write_pages(page, out / "pages", progress=progress), len(unplanned)


def build_atlas(
    model: nn.Module,
    layers: Optional[Sequence[str]] = None,
    out_dir: PathLike = "circuits-atlas",
    *,
    engine: str = "local",
    cache: Union[None, str, PathLike] = None,
    storage_options: Optional[dict] = None,
    dry_run: bool = False,
    pages: bool = True,
    progress: bool = True,
    max_tasks: Optional[int] = None,
    address: Optional[str] = None,
    num_cpus: Optional[int] = None,
    max_retries: int = 3,
    ray_init_kwargs: Optional[dict] = None,
    calibration_steps: int = 3,
    **plan_kwargs: Any,
) -> AtlasResult:
    """Plan, run and page the atlas of ``layers`` (every channel; see :func:`make_plan`).

    Args:
        model: the model (moved to the plan's device).
        layers: layers whose neurons get full pages (default: the pages' interesting layers,
            ``mixed3a, mixed3b, mixed4a`` for InceptionV1-style models).
        out_dir: output folder (``plan.json``, ``pages/``, ``atlas.json``; ``cache/`` by default).
        engine: ``"local"`` (one process) or ``"ray"``.
        cache: the result store: a folder or an fsspec URL (default ``out_dir/cache``). With
            Ray on several machines it must be shared (network folder, ``s3://``...).
        storage_options: fsspec options for a URL store.
        dry_run: plan and calibrate only (``result.estimate``); nothing is rendered.
        pages: build the neuron pages once every task is done.
        progress: progress bars.
        max_tasks: local engine: stop after this many tasks (resume later).
        address, num_cpus, max_retries, ray_init_kwargs: Ray engine settings (:func:`run_ray`).
        calibration_steps: steps of the dry run's timed calibration render per layer.
        **plan_kwargs: :func:`make_plan` arguments (``settings``, ``neurons``, ``upstream``,
            ``batch_size``, ``device``...) and settings overrides (``steps``, ``seed``, ``top_k``,
            ``dataset``, ``render``...).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "ray" and max_tasks is not None:
        raise ValueError("max_tasks is a local-engine option (Ray runs every pending task)")
    out = check_writable(out_dir)
    plan = make_plan(model, layers, **plan_kwargs)
    store = ResultStore(cache if cache is not None else out / "cache", storage_options)
    plan.save(out / "plan.json")
    result = AtlasResult(plan, store, out)
    if dry_run:
        result.estimate = estimate(plan, model, store, calibration_steps=calibration_steps, progress=progress)
        return result
    if engine == "local":
        report = run_local(plan, model, store, progress=progress, max_tasks=max_tasks)
    else:
        from .ray_engine import run_ray

        report = run_ray(plan, model, store, address=address, num_cpus=num_cpus, max_retries=max_retries,
                         progress=progress, init_kwargs=ray_init_kwargs)
    result.report = report
    if not report.completed or not pages:
        return result

    marker = out / "atlas.json"
    index = out / "pages" / "index.html"
    fp = plan.fingerprint()
    try:
        done = json.loads(marker.read_text()).get("plan") == fp and index.is_file()
    except (OSError, ValueError):
        done = False
    if not done:
        index, rendered = build_atlas_pages(plan, model, store, out, progress=progress)
        result.pages_rendered, result.pages_built = rendered, True
        atomic_write_text(marker, json.dumps({
            "plan": fp, "model": plan.model_hash, "store": store.location, "neurons": plan.n_neurons,
            "images": len(plan.render_targets), "pages_rendered": rendered, "index": "pages/index.html",
        }, indent=1))
    result.index = index
    return result
