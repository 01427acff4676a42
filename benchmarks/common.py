"""Small shared helpers for the benchmarks: timing and a uniform result line."""

from __future__ import annotations

import gc
import platform
import statistics
import time
from typing import Callable

import torch


def timeit(fn: Callable[[], object], repeat: int = 3, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine() -> str:
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {torch.get_num_threads()} torch threads, {dev}, torch {torch.__version__}"


def report(name: str, peer_label: str, peer_s: float, ours_s: float, unit: str = "s", extra: str = "") -> dict:
    """Print one ratio line and return it as a dict (``speedup`` = peer time / our time)."""
    ratio = peer_s / ours_s if ours_s > 0 else float("inf")
    line = f"[{name}] {peer_label}: {peer_s:.4f} {unit} | circuits: {ours_s:.4f} {unit} | speedup x{ratio:.2f}"
    if extra:
        line += f" | {extra}"
    print(line, flush=True)
    return {"name": name, "peer": peer_label, "peer_s": peer_s, "ours_s": ours_s, "speedup": ratio}


def synchronize(device: "torch.device | str | None" = None) -> None:
    """Wait for queued GPU work on ``device`` (every CUDA device when ``None``) before reading a
    clock; nothing on the CPU."""
    dev = torch.device(device) if device is not None else None
    if (dev is None or dev.type == "cuda") and torch.cuda.is_available():
        torch.cuda.synchronize(dev)


def reset_peak_memory(device: "torch.device | str") -> None:
    """Start counting the peak GPU memory of ``device`` afresh, after handing the allocator's
    cached blocks back (so that code sizing its batches by the free memory sees all of it);
    nothing on the CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        gc.collect()
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def peak_memory_mib(device: "torch.device | str") -> "float | None":
    """``torch.cuda.max_memory_allocated`` in MiB since :func:`reset_peak_memory`; ``None`` on the CPU."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    torch.cuda.synchronize(dev)
    return torch.cuda.max_memory_allocated(dev) / 2**20
