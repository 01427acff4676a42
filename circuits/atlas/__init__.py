"""Whole-model atlas: every neuron's page, on one machine or a Ray cluster.

::

    from circuits.atlas import build_atlas
    result = build_atlas(model, ["mixed3a", "mixed3b", "mixed4a"], "atlas/", steps=512)
    result.index                      # atlas/pages/index.html
    build_atlas(model, out_dir="atlas/", dry_run=True).estimate    # tasks + calibrated device time
    build_atlas(model, out_dir="atlas/", engine="ray", address="auto", cache="s3://bucket/atlas")

``circuits atlas --model fashion-inception --out atlas/ [--engine ray] [--dry-run]`` is the same
from the command line. Modules: :mod:`.plan` (tasks, batch sizes, cache keys, dry-run
estimate), :mod:`.store` (local folder / fsspec URL, atomic writes), :mod:`.tasks` (one task;
the fail-once test hook), :mod:`.local` and :mod:`.ray_engine` (engines), :mod:`.run`
(:func:`build_atlas`), :mod:`.cli`.
"""

from .local import AtlasTaskError, RunReport, run_local
from .plan import AtlasPlan, AtlasTask, PlanEstimate, batch_size_for, cache_relpath, cache_requests, estimate, make_plan
from .run import AtlasResult, build_atlas, build_atlas_pages
from .store import ResultStore
from .tasks import FAIL_ONCE_ENV, InjectedFailure, read_examples, read_tables, run_task


def run_ray(*args, **kwargs):  # noqa: D401 - lazy: ray is optional
    """Run a plan on Ray; see :func:`circuits.atlas.ray_engine.run_ray`."""
    from .ray_engine import run_ray as _run_ray

    return _run_ray(*args, **kwargs)


def add_atlas_subcommand(subparsers):  # noqa: D401 - lazy wrapper
    """Add ``atlas`` to a CLI's subparsers; see :func:`circuits.atlas.cli.add_atlas_subcommand`."""
    from .cli import add_atlas_subcommand as _add

    return _add(subparsers)


def run_atlas_command(args) -> int:  # noqa: D401 - lazy wrapper
    """Run ``circuits atlas``; see :func:`circuits.atlas.cli.run_atlas_command`."""
    from .cli import run_atlas_command as _run

    return _run(args)


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
    "InjectedFailure",
    "FAIL_ONCE_ENV",
    "read_tables",
    "read_examples",
    "add_atlas_subcommand",
    "run_atlas_command",
]
