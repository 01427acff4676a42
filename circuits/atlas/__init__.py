"""Whole-model atlas: every neuron's page, on one machine or a Ray cluster.

::

    from circuits.atlas import build_atlas
    result = build_atlas(model, ["mixed3a", "mixed3b", "mixed4a"], "atlas/", steps=512)
    result.index                      # atlas/pages/index.html
    build_atlas(model, out_dir="atlas/", dry_run=True).estimate    # tasks + calibrated run time
    build_atlas(model, out_dir="atlas/", engine="ray", address="auto", cache="s3://bucket/atlas")

``circuits atlas --model fashion-inception --out atlas/ [--engine ray] [--dry-run]`` is the same
from the command line. Modules: :mod:`.plan` (tasks, batch sizes, cache keys), :mod:`.store` (local folder / fsspec URL, atomic writes), :mod:`.tasks` (one task),
:mod:`.local` and :mod:`.ray_engine` (engines; Ray is imported only when used), :mod:`.estimate`
(the dry run's estimate, from a short real run of each part), :mod:`.lock` (one run per
folder; leftovers of killed runs), :mod:`.pages` (the pages from stored results), :mod:`.run`
(:func:`build_atlas`). The pages are the neuron pages of :mod:`circuits.figures.pages`, with
the same :class:`~circuits.figures.pages.PageSettings`.
"""

from .estimate import PlanEstimate, estimate
from .local import AtlasTaskError, RunReport, run_local
from .lock import AtlasLockedError, FolderLock, LockHolder, clean_leftovers
from .pages import build_atlas_pages
from .plan import AtlasPlan, AtlasTask, batch_size_for, cache_relpath, cache_requests, make_plan
from .ray_engine import run_ray
from .run import AtlasResult, build_atlas
from .store import ResultStore, StoreNotWritableError
from .tasks import read_examples, read_tables, run_task

__all__ = [
    "build_atlas",
    "build_atlas_pages",
    "AtlasResult",
    "make_plan",
    "AtlasPlan",
    "AtlasTask",
    "PlanEstimate",
    "estimate",
    "batch_size_for",
    "cache_requests",
    "cache_relpath",
    "ResultStore",
    "run_local",
    "run_ray",
    "run_task",
    "RunReport",
    "AtlasTaskError",
    "AtlasLockedError",
    "StoreNotWritableError",
    "FolderLock",
    "LockHolder",
    "clean_leftovers",
    "read_tables",
    "read_examples",
]
