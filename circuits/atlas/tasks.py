"""Running one atlas task: the function every engine calls (in-process or on a Ray worker).

:func:`run_task` does one :class:`~circuits.atlas.plan.AtlasTask` and writes its results to
the store atomically; it is idempotent (a render task renders only the images that are not
in the store yet), so a retried or restarted task never redoes finished work.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch import nn

from ..datasets import load_dataset
from .plan import AtlasPlan, AtlasTask
from .store import ResultStore

__all__ = ["run_task", "read_tables", "read_examples", "torch_threads", "check_threads"]


def check_threads(threads: Optional[int]) -> Optional[int]:
    """``threads`` if it is ``None`` or a positive integer, else ``ValueError``."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    return threads


@contextlib.contextmanager
def torch_threads(threads: Optional[int]) -> Iterator[None]:
    """Inside the block torch uses ``threads`` CPU threads (``None``: unchanged); the number in
    force before is restored after."""
    before = torch.get_num_threads()
    if check_threads(threads) is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _npz_bytes(**arrays: Any) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _load_npz(store: ResultStore, rel: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(store.read_bytes(rel)), allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


# ----------------------------------------------------------------------------- render


def _render_task(model: nn.Module, plan: AtlasPlan, task: AtlasTask, store: ResultStore) -> int:
    from ..featurevis import FeatureVisCache, render

    opts = dict(plan.render)
    if store.is_local:
        res = render(model, task.targets, cache=FeatureVisCache(store.local_root), batch_size=len(task.targets),
                     progress=False, **opts)
        rendered = sum(1 for f in res.from_cache if not f)
    else:
        with tempfile.TemporaryDirectory(prefix="circuits-atlas-") as tmp:
            present = store.existing(task.outputs)
            for rel in present:  # finished images of a retried task are not rendered again
                store.download(rel, Path(tmp) / rel)
            res = render(model, task.targets, cache=FeatureVisCache(tmp), batch_size=len(task.targets),
                         progress=False, **opts)
            rendered = sum(1 for f in res.from_cache if not f)
            for rel in task.outputs:
                if rel not in present:
                    if not (Path(tmp) / rel).is_file():
                        raise RuntimeError(_LAYOUT_ERROR.format(rel=rel))
                    store.upload_file(Path(tmp) / rel, rel)
    missing = [rel for rel in task.outputs if not store.exists(rel)]
    if missing:
        raise RuntimeError(_LAYOUT_ERROR.format(rel=missing[0]))
    return rendered


_LAYOUT_ERROR = (
    "the render did not write the predicted cache file {rel}: circuits.featurevis changed its cache "
    "request format without circuits.featurevis.rendering.cache_requests following it"
)


# ----------------------------------------------------------------------------- tables


def _tables_task(model: nn.Module, plan: AtlasPlan, task: AtlasTask, store: ResultStore) -> None:
    from ..figures.sections import layer_sections

    channels = plan.neurons[task.layer]
    sections = layer_sections(model, task.layer, channels, plan.upstream[task.layer], top_k=plan.top_k,
                              factor_threshold=plan.factor_threshold, n_factors=plan.n_factors)
    meta, arrays = [], {}
    i = 0
    for c in channels:
        for sec in sections.get(c, []):
            meta.append({
                "channel": int(c), "upstream": sec.upstream, "kind": sec.kind, "n_inputs": int(sec.n_inputs),
                "limit": float(sec.limit), "explained": None if sec.explained is None else float(sec.explained),
                "by_factor": bool(sec.by_factor), "note": sec.note, "has_rgb": sec.rgb is not None,
                "has_factors": sec.factors is not None,
            })
            arrays[f"{i}.channels"] = np.asarray(sec.channels, dtype=np.int64)
            arrays[f"{i}.slices"] = np.asarray(sec.slices, dtype=np.float32)
            arrays[f"{i}.norms"] = np.asarray(sec.norms, dtype=np.float32)
            if sec.rgb is not None:
                arrays[f"{i}.rgb"] = np.asarray(sec.rgb, dtype=np.float32)
            if sec.factors is not None:
                arrays[f"{i}.factors"] = np.asarray(sec.factors, dtype=np.int64)
            i += 1
    store.write_bytes(task.outputs[0], _npz_bytes(meta=np.array(json.dumps(meta)), layer=np.array(task.layer), **arrays))


def read_tables(store: ResultStore, plan: AtlasPlan, layer: str) -> dict[int, list[Any]]:
    """``{channel: [NeuronConnections, ...]}`` of a finished ``tables`` task: for each chosen
    neuron of ``layer`` and each upstream layer that reaches it, the top-``k`` inputs by L2
    (display order), their weight slices ``[k, kh, kw]``, norms, NMF factors and how much of
    the weights the factors explain (see :class:`circuits.figures.sections.NeuronConnections`)."""
    from ..figures.sections import NeuronConnections

    task = plan.task(f"tables-{layer}")
    data = _load_npz(store, task.outputs[0])
    out: dict[int, list[NeuronConnections]] = {c: [] for c in plan.neurons[layer]}
    for i, m in enumerate(json.loads(str(data["meta"]))):
        sec = NeuronConnections(
            upstream=m["upstream"], kind=m["kind"], n_inputs=m["n_inputs"],
            channels=[int(x) for x in data[f"{i}.channels"]], slices=data[f"{i}.slices"].astype(np.float64),
            norms=data[f"{i}.norms"].astype(np.float64), limit=m["limit"],
            factors=[int(x) for x in data[f"{i}.factors"]] if m["has_factors"] else None,
            explained=m["explained"], by_factor=m["by_factor"],
            rgb=data[f"{i}.rgb"] if m["has_rgb"] else None, note=m["note"],
        )
        out.setdefault(int(m["channel"]), []).append(sec)
    return out


# ----------------------------------------------------------------------------- examples


def _examples_task(model: nn.Module, plan: AtlasPlan, task: AtlasTask, store: ResultStore) -> None:
    from ..featurevis import dataset_examples

    if plan.dataset is None:
        raise ValueError("the plan has no dataset; examples tasks need one")
    data = load_dataset(plan.dataset, plan.dataset_size)
    found = dataset_examples(model, task.targets, data, k=plan.n_examples, progress=False)
    idx = np.stack([found[t].indices.cpu().numpy() for t in task.targets]).astype(np.int64)
    vals = np.stack([found[t].values.cpu().numpy() for t in task.targets]).astype(np.float32)
    store.write_bytes(task.outputs[0], _npz_bytes(targets=np.array(task.targets), indices=idx, values=vals))


def read_examples(store: ResultStore, plan: AtlasPlan, layer: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{target: (indices [k], values [k])}``: the top dataset images of ``layer``'s chosen neurons."""
    task = plan.task(f"examples-{layer}")
    data = _load_npz(store, task.outputs[0])
    return {str(t): (data["indices"][i], data["values"][i]) for i, t in enumerate(data["targets"])}


# ----------------------------------------------------------------------------- dispatch


def run_task(model: nn.Module, plan: AtlasPlan, task: AtlasTask, store: ResultStore) -> dict[str, Any]:
    """Do ``task`` with ``model`` (already on its device) and write its results to ``store``.

    Returns ``{"id", "kind", "rendered" (images optimised, 0 for other kinds), "seconds", "pid",
    "threads" (torch threads when the task started)}``.
    """
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    rendered = 0
    if task.kind == "render":
        rendered = _render_task(model, plan, task, store)
    elif task.kind == "tables":
        _tables_task(model, plan, task, store)
    elif task.kind == "examples":
        _examples_task(model, plan, task, store)
    else:
        raise ValueError(f"unknown task kind {task.kind!r}")
    return {"id": task.id, "kind": task.kind, "rendered": rendered, "seconds": time.perf_counter() - t0,
            "pid": os.getpid(), "threads": threads}

