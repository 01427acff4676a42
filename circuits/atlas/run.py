"""``build_atlas``: plan → run (local or Ray) → neuron pages, resumable at every step.

Layout of ``out_dir``::

    plan.json            the plan of the last run (what ``--dry-run`` prints, as data)
    cache/               the default store: feature visualizations + per-task results
    pages/index.html     the neuron pages (circuits.figures.pages), built when every task is done
    atlas.json           written last: the plan's fingerprint and the run's figures

Run it again after an interruption and it continues: finished tasks are skipped (their files
are in the store), a render task renders only its missing images, and the pages are rebuilt
only when ``atlas.json`` is missing or belongs to another plan.

One run at a time: a run holds the lock of ``out_dir`` and of a local store
(:class:`~circuits.atlas.lock.FolderLock`); a second run refuses with the holder's pid, host
and time, or waits (``wait``). Once it holds them, a run removes the temporary files that an
interrupted run left there (:func:`~circuits.atlas.lock.clean_leftovers`) and takes over the
lock of a run that was killed; ``AtlasResult.notes`` says so.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

from torch import nn

from .._io import PathLike, atomic_write_text, check_writable
from .estimate import PlanEstimate, estimate
from .local import RunReport, run_local
from .lock import TMP_GRACE_SECONDS, AtlasLockedError, FolderLock, clean_leftovers
from .pages import build_atlas_pages
from .plan import AtlasPlan, make_plan
from .store import ResultStore, is_write_refusal
from .tasks import check_threads, torch_threads

__all__ = ["build_atlas", "AtlasResult", "ENGINES"]

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
        notes: what a person should know about the run (a stale lock taken over, leftovers removed).
        seconds: wall time of the call; ``plan_seconds``: of making the plan.
    """

    plan: AtlasPlan
    store: ResultStore
    out_dir: Path
    report: Optional[RunReport] = None
    estimate: Optional[PlanEstimate] = None
    index: Optional[Path] = None
    pages_rendered: int = 0
    pages_built: bool = False
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    plan_seconds: float = 0.0

    @property
    def completed(self) -> bool:
        return self.report is not None and self.report.completed and self.index is not None


@contextlib.contextmanager
def _locked(out: Path, store: ResultStore, wait: Union[bool, float], on_wait: Optional[Callable[[str], None]]
            ) -> Iterator[list[FolderLock]]:
    """Hold the locks of ``out`` and of a local store (``wait`` is the budget for both).

    A store that refuses writes gets no lock (no run can change it); running tasks into it
    fails with what to do (:meth:`ResultStore.check_writable`)."""
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        locks = [stack.enter_context(FolderLock(out, wait=wait, on_wait=on_wait))]
        if store.local_root is not None and store.local_root != out.resolve():
            budget = wait if isinstance(wait, bool) else max(0.0, float(wait) - (time.monotonic() - t0))
            try:
                locks.append(stack.enter_context(FolderLock(store.local_root, wait=budget, on_wait=on_wait)))
            except OSError as exc:
                if isinstance(exc, AtlasLockedError) or not is_write_refusal(exc):
                    raise
        yield locks


def _clean(out: Path, store: ResultStore) -> list[str]:
    """Remove what interrupted runs left in the folders this run holds; a note when there was any."""
    held = [out] + ([store.local_root] if store.local_root is not None else [])
    removed = clean_leftovers(out, held=held)
    if store.local_root is not None and not store.local_root.is_relative_to(out.resolve()):
        # a store outside out_dir may be a featurevis cache other programs write to: spare young files
        removed += clean_leftovers(store.local_root, min_age=TMP_GRACE_SECONDS, held=held)
    if not removed:
        return []
    shown = ", ".join(str(p) for p in removed[:3]) + (", ..." if len(removed) > 3 else "")
    return [f"removed {len(removed)} unfinished temporary file(s) that an interrupted run left behind ({shown})"]


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
    threads: Optional[int] = None,
    wait: Union[bool, float] = False,
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
        dry_run: plan and estimate only (``result.estimate``: a short real run of each kind
            of task, in a temporary folder); nothing is rendered into the store.
        pages: build the neuron pages once every task is done.
        progress: progress bars.
        max_tasks: local engine: stop after this many tasks (resume later).
        threads: torch CPU threads: of this process for planning, the local engine, the dry
            run and the pages (restored afterwards), of each task on Ray (which reserves that
            many CPU slots). Default: the number in force here; one per task on Ray.
        wait: when another run holds ``out_dir`` or the store: ``False`` raise
            :class:`~circuits.atlas.lock.AtlasLockedError` at once, ``True`` wait for it, a
            number wait at most that many seconds.
        address, num_cpus, max_retries, ray_init_kwargs: Ray engine settings (:func:`run_ray`).
        calibration_steps: steps of the dry run's timed calibration render per layer.
        **plan_kwargs: :func:`make_plan` arguments (``settings``, ``neurons``, ``upstream``,
            ``batch_size``, ``device``...) and settings overrides (``steps``, ``seed``, ``top_k``,
            ``dataset``, ``render``...).
    """
    t_start = time.perf_counter()
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "ray" and max_tasks is not None:
        raise ValueError("max_tasks is a local-engine option (Ray runs every pending task)")
    check_threads(threads)
    out = check_writable(out_dir)
    store = ResultStore(cache if cache is not None else out / "cache", storage_options)
    on_wait = (lambda message: print(message, file=sys.stderr, flush=True)) if progress else None
    with _locked(out, store, wait, on_wait) as locks, torch_threads(threads):
        notes = [n for lock in locks for n in lock.notes] + _clean(out, store)
        t0 = time.perf_counter()
        plan = make_plan(model, layers, **plan_kwargs)
        plan_seconds = time.perf_counter() - t0
        plan.save(out / "plan.json")
        result = AtlasResult(plan, store, out, notes=notes, plan_seconds=plan_seconds)
        marker = out / "atlas.json"
        index = out / "pages" / "index.html"
        fp = plan.fingerprint()
        try:
            pages_done = json.loads(marker.read_text()).get("plan") == fp and index.is_file()
        except (OSError, ValueError):
            pages_done = False
        if dry_run:
            result.estimate = estimate(plan, model, store, calibration_steps=calibration_steps, progress=progress,
                                       pages=pages and not pages_done, threads=threads, plan_seconds=plan_seconds)
        else:
            _run(result, model, engine, pages, pages_done, progress, max_tasks, threads, address, num_cpus,
                 max_retries, ray_init_kwargs)
    result.seconds = time.perf_counter() - t_start
    return result


def _run(result: AtlasResult, model: nn.Module, engine: str, pages: bool, pages_done: bool, progress: bool,
         max_tasks: Optional[int], threads: Optional[int], address: Optional[str], num_cpus: Optional[int],
         max_retries: int, ray_init_kwargs: Optional[dict]) -> None:
    plan, store, out = result.plan, result.store, result.out_dir
    if plan.pending(store):
        store.check_writable()  # a read-only store fails here, with what to do, before any work
    if engine == "local":
        report = run_local(plan, model, store, progress=progress, max_tasks=max_tasks, threads=threads)
    else:
        from .ray_engine import run_ray

        report = run_ray(plan, model, store, address=address, num_cpus=num_cpus, max_retries=max_retries,
                         progress=progress, init_kwargs=ray_init_kwargs, threads=threads)
    result.report = report
    if not report.completed or not pages:
        return
    index = out / "pages" / "index.html"
    if not pages_done:
        index, rendered = build_atlas_pages(plan, model, store, out, progress=progress)
        result.pages_rendered, result.pages_built = rendered, True
        atomic_write_text(out / "atlas.json", json.dumps({
            "plan": plan.fingerprint(), "model": plan.model_hash, "store": store.location, "neurons": plan.n_neurons,
            "images": len(plan.render_targets), "pages_rendered": rendered, "index": "pages/index.html",
        }, indent=1))
    result.index = index
