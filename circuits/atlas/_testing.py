"""Failure injection for testing the atlas engines (internal; not part of the public API).

Tests prove retries and resumption by making chosen tasks fail on their first attempt::

    from circuits.atlas._testing import fail_once
    with fail_once(f"{marker_dir}::render-mixed3a-002,tables-*"):
        build_atlas(model, ...)

``spec`` is ``"DIR"``, ``"DIR::GLOB[,GLOB...]"`` or ``"DIR::GLOB::exit"``; the environment
variable ``CIRCUITS_ATLAS_FAIL_ONCE`` sets it too (e.g. for a command-line run). The first
attempt of each task whose id matches a glob (default all) creates ``DIR/<task id>.failed``
and then raises :class:`InjectedFailure` (or, with ``exit``, kills its process as a crashed
worker would); later attempts find the marker and run normally. The engines read the spec
once per run and hand it to their workers with each task.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import time
from pathlib import Path
from typing import Iterator, Optional

FAIL_ONCE_ENV = "CIRCUITS_ATLAS_FAIL_ONCE"
_active: list[str] = []


class InjectedFailure(RuntimeError):
    """Raised by the failure injection on a task's first attempt."""


@contextlib.contextmanager
def fail_once(spec: str) -> Iterator[None]:
    """Inside the block, atlas runs inject first-attempt failures as ``spec`` says."""
    _active.append(spec)
    try:
        yield
    finally:
        _active.pop()


def active_spec() -> Optional[str]:
    """The failure-injection spec in force (the innermost :func:`fail_once`, else the env var)."""
    return _active[-1] if _active else (os.environ.get(FAIL_ONCE_ENV) or None)


def maybe_fail(task_id: str, spec: Optional[str]) -> None:
    """Fail the first attempt of ``task_id`` when ``spec`` selects it."""
    if not spec:
        return
    parts = spec.split("::")
    folder = Path(parts[0])
    globs = parts[1].split(",") if len(parts) > 1 and parts[1] else ["*"]
    mode = parts[2] if len(parts) > 2 else "raise"
    if not any(fnmatch.fnmatchcase(task_id, g) for g in globs):
        return
    folder.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(folder / f"{task_id}.failed", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return  # already failed once: run normally
    os.write(fd, f"{os.getpid()} {time.time()}\n".encode())
    os.close(fd)
    if mode == "exit":
        os._exit(1)  # a crashed worker
    raise InjectedFailure(f"injected failure of task {task_id} ({FAIL_ONCE_ENV})")
