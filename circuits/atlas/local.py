"""The local engine (the default): every pending task of a plan, one after another, in this process.

Batches are the plan's (sized to the device's memory by
:func:`~circuits.atlas.plan.batch_size_for`); a tqdm bar counts tasks and shows the ETA and the
number of images rendered. Every task runs with the same number of torch threads (``threads``,
else the number in force when the run starts; set again before each task, as a library may
change it). A task that fails stops the run with :class:`AtlasTaskError`; what finished
before is in the store, so running again continues where it stopped. A store that refuses
writes stops it with :class:`~circuits.atlas.store.StoreNotWritableError` instead (running
again would fail the same way).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ._testing import active_spec, maybe_fail
from .plan import AtlasPlan
from .store import ResultStore, StoreNotWritableError, is_write_refusal
from .tasks import check_threads, run_task, torch_threads

__all__ = ["run_local", "RunReport", "AtlasTaskError", "task_error"]


class AtlasTaskError(RuntimeError):
    """A task failed (after its retries, on Ray). ``task_id`` names it; finished tasks are kept."""

    def __init__(self, task_id: str, message: str):
        super().__init__(f"atlas task {task_id} failed: {message}")
        self.task_id = task_id


@dataclass
class RunReport:
    """What a run did.

    Attributes:
        engine: ``"local"`` or ``"ray"``.
        tasks_total: tasks in the plan; ``tasks_skipped``: already done before the run;
            ``tasks_run``: done by this run.
        rendered: images optimised by this run (cached images are not counted).
        seconds: wall time of the run.
        threads: torch threads per task (per worker on Ray; ``None``: each worker's default).
        completed: every task of the plan is done.
        results: one dict per task run (:func:`circuits.atlas.tasks.run_task`).
    """

    engine: str
    tasks_total: int
    tasks_skipped: int
    tasks_run: int = 0
    rendered: int = 0
    seconds: float = 0.0
    threads: Optional[int] = None
    completed: bool = False
    results: list[dict[str, Any]] = field(default_factory=list)

    def add(self, result: dict[str, Any]) -> None:
        """Count one finished task (a :func:`~circuits.atlas.tasks.run_task` result)."""
        self.results.append(result)
        self.tasks_run += 1
        self.rendered += int(result["rendered"])

    @property
    def images_per_second(self) -> float:
        return self.rendered / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        state = "complete" if self.completed else "incomplete"
        threads = f" ({self.threads} torch thread(s) per task)" if self.threads else ""
        return (f"{self.engine}: {self.tasks_run} task(s) run, {self.tasks_skipped} already done, "
                f"{self.rendered} image(s) rendered in {self.seconds:.1f} s{threads}; atlas {state}")


def run_local(
    plan: AtlasPlan,
    model: nn.Module,
    store: ResultStore,
    *,
    progress: bool = True,
    max_tasks: Optional[int] = None,
    threads: Optional[int] = None,
) -> RunReport:
    """Run the plan's pending tasks in this process with ``model`` (on the plan's device).

    Args:
        plan: the plan.
        model: the model the plan was made for (moved to ``plan.device``).
        store: where results go (and what is already done).
        progress: tqdm bar over the pending tasks with an ETA.
        max_tasks: stop after this many tasks (the run is then incomplete; run again to go on).
        threads: torch threads for the tasks (default: the number in force now); torch's
            setting is restored when the run ends.
    """
    if max_tasks is not None and (not isinstance(max_tasks, int) or max_tasks < 0):
        raise ValueError(f"max_tasks must be a non-negative integer, got {max_tasks!r}")
    threads = check_threads(threads) or torch.get_num_threads()
    t0 = time.perf_counter()
    pending = plan.pending(store)
    report = RunReport("local", len(plan.tasks), len(plan.tasks) - len(pending), threads=threads)
    todo = pending if max_tasks is None else pending[:max_tasks]
    model = model.to(plan.device).eval()
    injected = active_spec()
    bar = tqdm(total=len(todo), desc="atlas", unit="task", disable=not progress)
    try:
        with torch_threads(threads):
            for task in todo:
                bar.set_postfix_str(f"{task.id}, {report.rendered} rendered", refresh=False)
                torch.set_num_threads(threads)
                try:
                    maybe_fail(task.id, injected)
                    result = run_task(model, plan, task, store)
                except Exception as exc:
                    raise task_error(store, task.id, exc, str(exc)) from exc
                report.add(result)
                bar.update(1)
    finally:
        bar.close()
        report.seconds = time.perf_counter() - t0
    report.completed = len(todo) == len(pending)
    return report


def task_error(store: ResultStore, task_id: str, exc: BaseException, detail: str) -> Exception:
    """The error that stops a run whose task ``task_id`` raised ``exc``: :class:`AtlasTaskError`
    (run again to continue), or :class:`StoreNotWritableError` when the store refused the
    results (read-only, permissions, full: running again fails the same way)."""
    if not is_write_refusal(exc):
        return AtlasTaskError(task_id, f"{type(exc).__name__}: {detail}")
    text = str(exc).strip()
    reason = getattr(exc, "strerror", None) or (text.splitlines()[-1] if text else type(exc).__name__)
    return StoreNotWritableError(
        f"cannot write to the atlas result store {store.location}: {reason} (task {task_id}; finished tasks "
        f"are kept); running again fails the same way until you choose another store with --cache "
        f"(cache= in Python) or make this one writable"
    )
