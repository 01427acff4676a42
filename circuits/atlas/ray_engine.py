"""The Ray engine (``--engine ray``; install with ``pip install circuits[ray]``).

The plan's pending tasks become Ray tasks — one batched render (or one layer's tables /
dataset examples) each — that ask for one GPU when the plan's device is one, and one CPU slot
(``threads`` slots with ``threads=N``; a task runs as many torch threads as it holds slots).
The model and the plan go to the object store once. Ray schedules, retries a task whose
worker died or that raised (``max_retries``, ``retry_exceptions=True``) and a task is
idempotent (it renders only what is missing), so a retry never redoes finished images.
Every result is written by the worker to the shared store (a folder every worker sees, or
an fsspec URL); nothing but small reports travels back to the driver.

``ray.init()`` starts a local cluster (a laptop; ``num_cpus`` caps its CPU slots) unless Ray
is already initialised; ``address="ray://head:10001"`` or ``"auto"`` joins an existing one.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Optional

from torch import nn
from tqdm.auto import tqdm

from ._testing import active_spec
from .local import RunReport, task_error
from .plan import AtlasPlan, AtlasTask
from .store import ResultStore
from .tasks import check_threads

__all__ = ["run_ray", "require_ray"]


def require_ray() -> Any:
    """Import ray, or raise ``ImportError`` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ImportError("the Ray engine needs ray: pip install 'circuits[ray]' (or pip install ray)") from None
    return ray


def _ray_task(model: nn.Module, plan_dict: dict, task_dict: dict, location: str, storage_options: dict,
              injected: Optional[str], threads: int) -> dict:
    """Body of one Ray task (runs on a worker; arguments that were object refs arrive resolved)."""
    import torch

    from ._testing import maybe_fail
    from .tasks import run_task

    torch.set_num_threads(threads)  # each task as many as the CPU slots it holds (a library may have changed it)
    maybe_fail(str(task_dict["id"]), injected)
    plan = AtlasPlan.from_dict(plan_dict)
    if torch.device(plan.device).type == "cuda":
        plan.device = "cuda"  # Ray sets CUDA_VISIBLE_DEVICES to this task's GPU
    model = model.to(plan.device).eval()
    store = ResultStore(location, storage_options)
    return run_task(model, plan, AtlasTask.from_dict(task_dict), store)


def run_ray(
    plan: AtlasPlan,
    model: nn.Module,
    store: ResultStore,
    *,
    address: Optional[str] = None,
    num_cpus: Optional[int] = None,
    max_retries: int = 3,
    progress: bool = True,
    init_kwargs: Optional[dict] = None,
    threads: Optional[int] = None,
) -> RunReport:
    """Run the plan's pending tasks as Ray tasks; returns when all are done.

    Args:
        plan, model, store: as :func:`circuits.atlas.local.run_local`. The store must be
            reachable from every worker (a shared folder or an fsspec URL).
        address: an existing cluster (``"auto"``, ``"ray://host:10001"``); ``None`` starts a
            local one unless Ray is initialised already (then that one is used).
        num_cpus: CPU slots of a local cluster started here (default: all cores).
        max_retries: retries per task, after a worker died or the task raised.
        init_kwargs: more ``ray.init`` arguments (``runtime_env``, ...).
        threads: torch threads per task; each task reserves that many CPU slots (default: one
            slot and one thread, Ray's default for a task).
    """
    ray = require_ray()
    if not isinstance(max_retries, int) or max_retries < 0:
        raise ValueError(f"max_retries must be a non-negative integer, got {max_retries!r}")
    threads = check_threads(threads) or 1
    t0 = time.perf_counter()
    pending = plan.pending(store)
    report = RunReport("ray", len(plan.tasks), len(plan.tasks) - len(pending), threads=threads)
    if not pending:
        report.completed = True
        report.seconds = time.perf_counter() - t0
        return report

    started = False
    if not ray.is_initialized():
        kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        kw.update(init_kwargs or {})
        if address is None:
            if num_cpus is not None:
                kw["num_cpus"] = num_cpus
            ray.init(**kw)
        else:
            ray.init(address=address, **kw)
        started = True
    try:
        import torch

        gpu = torch.device(plan.device).type == "cuda"
        cpus = ray.cluster_resources().get("CPU", 0)
        if threads > cpus:
            raise ValueError(f"threads={threads} CPU slots per task, but the Ray cluster has {cpus:g}: no task could "
                             "start; use fewer threads or a bigger cluster (num_cpus)")
        remote = ray.remote(_ray_task).options(
            num_gpus=1 if gpu else 0, num_cpus=threads, max_retries=max_retries, retry_exceptions=True,
            name="circuits-atlas-task",
        )
        cpu_model = copy.deepcopy(model).to("cpu") if any(p.device.type != "cpu" for p in model.parameters()) else model
        model_ref = ray.put(cpu_model)
        injected = active_spec()
        plan_ref = ray.put(plan.to_dict())
        refs = {
            remote.remote(model_ref, plan_ref, t.to_dict(), store.location, store.storage_options, injected, threads): t
            for t in pending
        }
        bar = tqdm(total=len(refs), desc="atlas (ray)", unit="task", disable=not progress)
        try:
            waiting = list(refs)
            while waiting:
                done, waiting = ray.wait(waiting, num_returns=1)
                for ref in done:
                    task = refs[ref]
                    try:
                        result = ray.get(ref)
                    except Exception as exc:  # RayTaskError after the retries, or a lost worker
                        for r in waiting:
                            ray.cancel(r)
                        raise task_error(store, task.id, exc, str(exc).strip().splitlines()[-1]) from exc
                    report.add(result)
                    bar.set_postfix_str(f"{report.rendered} rendered", refresh=False)
                    bar.update(1)
        finally:
            bar.close()
    finally:
        if started:
            ray.shutdown()
        report.seconds = time.perf_counter() - t0
    report.completed = not plan.pending(store)
    return report
