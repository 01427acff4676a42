"""Every GPU goal in one command: ``python -m benchmarks --gpu-suite`` (at most 8 minutes on an H100/H200).

Parts (each calls its benchmark module's ``run``-style function, the peer and ours in the same run):

========== ===================================================================== ======================
part       what is timed                                                          goal (on a GPU)
========== ===================================================================== ======================
nmf        :func:`benchmarks.bench_nmf.run`, preset ``gpu``: ``circuits.nmf.nmf``  ratio >= 50
           on the GPU vs the scikit-learn loop (CPU; timed on 64 neurons per
           shape and scaled); the worst shape with >= 64 neurons
expanded   :func:`benchmarks.bench_expanded.run`: InceptionV1 ``mixed3a→mixed3b``, ratio >= 10 (issue 4's
           480 channels vs the per-channel backward loop, both on the GPU         goal; no GPU-specific one)
featurevis :func:`benchmarks.bench_featurevis.equal_steps`: 128 ``mixed4a``       ratio >= 5
           channels of random-init InceptionV1, 512 steps, vs Lucent batched
           (B = 128), both on the GPU
mixed3b    :func:`benchmarks.bench_featurevis.layer_render_time`: all 480         under 20 s (ratio =
           ``mixed3b`` channels at 512 steps, library defaults                    20 s ÷ ours >= 1)
atlas      :func:`benchmarks.bench_atlas.projection`: the dry run's estimate of   estimate ÷ measured
           every channel of ``mixed3a``–``mixed4e`` at 128 px / 512 steps,        within 0.7–1.3
           projected to 1–8 GPUs, checked on one real render task
========== ===================================================================== ======================

``--preset tiny`` (the default without CUDA) runs the same code at tiny sizes in about half a
minute on a CPU; the tests run it so that the suite cannot rot. Verdicts are ``pass`` /
``FAIL`` on CUDA with the ``gpu`` preset only, else ``not measured on CPU`` (or ``not measured
at tiny sizes`` on a GPU). Each part has a time budget; on Linux a part still running at its
budget is stopped (``timed out``) and the next part runs. A part that raises is recorded as
``error`` with the message, and the command exits with status 1.

On CUDA, every clock reading follows ``torch.cuda.synchronize()``, every timed call has a
warm-up call first, and the peak of ``torch.cuda.max_memory_allocated`` during the part (ours
only, for featurevis) is reported. Lucent renders on ``cuda:0`` whenever CUDA is available, so
the suite runs on ``cuda:0`` (choose the GPU with ``CUDA_VISIBLE_DEVICES``).

The table is printed and, unless ``--no-write``, appended to ``--results`` (default
``benchmarks/RESULTS.md``) as a dated section with the machine, written atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch

from circuits._io import atomic_write_text

from .common import machine, peak_memory_mib, reset_peak_memory

RESULTS = Path(__file__).parent / "RESULTS.md"
PRESETS = ("gpu", "tiny")
#: Whole-suite budget on a GPU (the issue's "at most 8 minutes").
SUITE_BUDGET_S = 480.0


@dataclass(frozen=True)
class Goal:
    """``ratio >= low`` (and ``<= high`` when set); ``text`` is what the table shows."""

    text: str
    low: float
    high: float = math.inf

    def met(self, ratio: float) -> bool:
        return self.low <= ratio <= self.high


@dataclass
class Measured:
    """What a part measured: seconds of ours and of the peer (``None``: no peer, the ratio is
    against the goal), the ratio, labels, peak GPU MiB (``None``: the suite's own reading)."""

    ours_s: float
    peer_s: Optional[float]
    ratio: float
    ours: str
    peer: str
    notes: str = ""
    peak_mib: Optional[float] = None


@dataclass
class Row:
    """One line of the table."""

    part: str
    goal: str
    verdict: str
    ratio: float = math.nan
    ours_s: float = math.nan
    peer_s: Optional[float] = None
    ours: str = ""
    peer: str = ""
    notes: str = ""
    peak_mib: Optional[float] = None
    seconds: float = 0.0
    budget_s: float = 0.0

    def cells(self) -> list[str]:
        ratio = f"x{self.ratio:.2f}" if math.isfinite(self.ratio) else "—"
        ours = f"{self.ours_s:.3f} s" if math.isfinite(self.ours_s) else "—"
        peer = f"{self.peer_s:.3f} s" if self.peer_s is not None and math.isfinite(self.peer_s) else "—"
        peak = f"{self.peak_mib:.0f} MiB" if self.peak_mib is not None else "—"
        return [self.part, ours, peer, ratio, self.goal, self.verdict, peak, f"{self.seconds:.1f} / {self.budget_s:.0f} s"]


HEADER = ["part", "ours", "peer", "ratio", "goal", "verdict", "peak GPU memory", "time / budget"]


@dataclass
class Part:
    name: str
    goal: Goal
    budget_s: dict[str, float]  # per preset
    measure: Callable[[str, torch.device], Measured]


# --- the parts ------------------------------------------------------------------------------------


def _nmf(preset: str, dev: torch.device) -> Measured:
    from . import bench_nmf

    threads = torch.get_num_threads()
    gpu = preset == "gpu"
    peer_threads = sorted({1, min(4, os.cpu_count() or 1)}) if gpu else [threads]
    out = bench_nmf.run(dev, "gpu" if gpu else "tiny", threads=(threads,), peer_threads=peer_threads,
                        backends=None, repeat=3 if gpu else 1, peer_neurons=64 if gpu else 4)
    key = next(iter(out["min_speedup"]))  # the device's default backend
    big = [r for r in out["rows"] if r["neurons"] >= 64] or out["rows"]  # as bench_nmf.run's min_speedup
    worst = min(big, key=lambda r: r["speedup"][key])
    shape = f"{worst['neurons']} x [{worst['positions']}, {worst['features']}] k={worst['k']}"
    notes = (f"worst shape {shape} (backend/threads {key}); per shape: "
             + ", ".join(f"{r['neurons']}x[{r['positions']},{r['features']}] x{r['speedup'][key]:.1f}" for r in out["rows"])
             + f"; worst per-neuron error ours/sklearn {out['worst_err_ratio']:.4f}; sklearn loop on the CPU, "
             f"timed on {out['rows'][0]['peer_neurons']} neurons per shape and scaled, best of {peer_threads} BLAS threads")
    return Measured(worst["ours_s"][key], worst["sklearn_s"], out["min_speedup"][key],
                    f"circuits.nmf.nmf ({key})", "sklearn NMF loop", notes)


def _expanded(preset: str, dev: torch.device) -> Measured:
    from . import bench_expanded

    gpu = preset == "gpu"
    out = bench_expanded.run("inceptionv1", "mixed3a", "mixed3b", peer_channels=48 if gpu else 2,
                             references=4 if gpu else 1, repeat=3 if gpu else 1, device=dev)
    notes = (f"{out['channels']} channels; peer timed on {out['peer_channels']} and extrapolated; ours cold (geometry "
             f"search included), warm {out['warm_s']:.3f} s; CPU-time ratio x{out['peer_cpu_s'] / out['ours_cpu_s']:.1f}; "
             f"max |ours - peer| {out['max_abs_diff']:.1e}")
    return Measured(out["ours_s"], out["peer_s"], out["speedup"], "expanded_weights", "per-channel backward loop", notes)


def _featurevis(preset: str, dev: torch.device) -> Measured:
    from . import bench_featurevis

    gpu = preset == "gpu"
    ts = bench_featurevis.inceptionv1_set(128, device=dev) if gpu else \
        bench_featurevis.inceptionv1_set(4, size=32, resize_to=32, device=dev)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lucent: layers past the target cannot run on tiny images
        out = bench_featurevis.equal_steps(ts, steps=512 if gpu else 8)
    n = out["batch"]
    worse = out["ours_median"] < out["lucent_median"]
    notes = (f"{n} x mixed4a, {ts.size} px -> {ts.resize} px, {out['steps']} steps; Lucent {out['peer_s'] / n:.3f} s "
             f"per neuron; median objective ours {out['ours_median']:.3f} vs Lucent {out['lucent_median']:.3f}"
             + (" (**ours lower**)" if worse else ""))
    return Measured(out["ours_s"], out["peer_s"], out["speedup"], "render (defaults)", f"lucent render_vis batched (B={n})",
                    notes, out["ours_peak_mib"])


MIXED3B_GOAL_S = 20.0


def _mixed3b(preset: str, dev: torch.device) -> Measured:
    from circuits.models import InceptionV1

    from . import bench_featurevis

    gpu = preset == "gpu"
    torch.manual_seed(0)
    model = InceptionV1().eval().to(dev)
    out = bench_featurevis.layer_render_time(model, "mixed3b", range(480 if gpu else 8), steps=512 if gpu else 8,
                                             size=None if gpu else 32, resize_to=None if gpu else 32)
    notes = (f"{out['neurons']} x mixed3b, {out['steps']} steps, {out['neurons'] / out['seconds']:.1f} neurons/s; "
             f"median objective {out['median']:.3f}; ratio = {MIXED3B_GOAL_S:.0f} s ÷ ours")
    return Measured(out["seconds"], None, MIXED3B_GOAL_S / out["seconds"], "render (defaults)", "—", notes,
                    out["peak_mib"])


def _seconds(s: float) -> str:
    return f"{s:.0f} s" if s >= 100 else f"{s:.3g} s"


def _atlas(preset: str, dev: torch.device) -> Measured:
    from . import bench_atlas

    if preset == "gpu":
        out = bench_atlas.projection(dev)
    else:
        out = bench_atlas.projection(dev, ["mixed3a"], steps=4, size=32, resize_to=32, neurons=8, batch=4)
    notes = (f"{out['neurons']} neurons of {out['layers'][0]}–{out['layers'][-1]} at {out['size']} px / {out['steps']} "
             f"steps, {out['tasks']} render tasks: projected "
             + ", ".join(f"{n} device{'s' if n > 1 else ''} {_seconds(s)}" for n, s in out["by_devices"].items())
             + f"; checked on {out['task_id']} ({out['task_neurons']} neurons); calibration {out['calibration_s']:.1f} s")
    return Measured(out["task_estimate_s"], out["task_measured_s"], out["ratio"], "dry-run estimate of one task",
                    "the task, run", notes, out["peak_mib"])


PARTS: tuple[Part, ...] = (
    Part("nmf", Goal("≥ 50x", 50.0), {"gpu": 100, "tiny": 30}, _nmf),
    Part("expanded", Goal("≥ 10x", 10.0), {"gpu": 45, "tiny": 30}, _expanded),
    Part("featurevis", Goal("≥ 5x", 5.0), {"gpu": 130, "tiny": 30}, _featurevis),
    Part("mixed3b", Goal("< 20 s (≥ 1x)", 1.0), {"gpu": 60, "tiny": 30}, _mixed3b),
    Part("atlas", Goal("0.7–1.3", 0.7, 1.3), {"gpu": 110, "tiny": 30}, _atlas),
)
PART_NAMES = tuple(p.name for p in PARTS)


# --- running --------------------------------------------------------------------------------------


class PartTimeout(Exception):
    """A part ran past its time budget."""


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Raise :class:`PartTimeout` in this thread after ``seconds`` (Linux/macOS main thread only;
    elsewhere the budget is only reported)."""
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def expire(signum, frame):  # noqa: ARG001
        raise PartTimeout(f"ran past its budget of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def verdict(goal: Goal, ratio: float, preset: str, dev: torch.device) -> str:
    """``pass`` / ``FAIL`` for a GPU run at the ``gpu`` preset; otherwise what was not measured."""
    if dev.type != "cuda":
        return "not measured on CPU"
    if preset != "gpu":
        return "not measured at tiny sizes"
    return "pass" if goal.met(ratio) else "FAIL"


def run_part(part: Part, preset: str, dev: torch.device) -> Row:
    """Run one part within its budget; never raises (an error or a timeout becomes the verdict)."""
    budget = float(part.budget_s[preset])
    row = Row(part.name, part.goal.text, "", budget_s=budget)
    print(f"== gpu suite: {part.name} (budget {budget:.0f} s) ==", flush=True)
    reset_peak_memory(dev)
    t0 = time.perf_counter()
    try:
        with _deadline(budget):
            m = part.measure(preset, dev)
    except PartTimeout as e:
        row.verdict, row.notes = "timed out", str(e)
    except Exception as e:  # recorded in the table; the suite goes on and exits with status 1
        traceback.print_exc()
        row.verdict, row.notes = "error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    else:
        if not (math.isfinite(m.ratio) and math.isfinite(m.ours_s)):
            row.verdict = "error"
            row.notes = f"non-finite result (ours {m.ours_s}, ratio {m.ratio}); {m.notes}"
        else:
            row.verdict = verdict(part.goal, m.ratio, preset, dev)
            row.notes = m.notes
        row.ratio, row.ours_s, row.peer_s, row.ours, row.peer = m.ratio, m.ours_s, m.peer_s, m.ours, m.peer
        row.peak_mib = m.peak_mib if m.peak_mib is not None else peak_memory_mib(dev)
    row.seconds = time.perf_counter() - t0
    if row.seconds > budget and row.verdict != "timed out":
        row.notes += f" (over its budget of {budget:.0f} s)"
    return row


@dataclass
class SuiteResult:
    preset: str
    device: str
    machine: str
    started: datetime.datetime
    seconds: float
    rows: list[Row] = field(default_factory=list)
    parts: tuple[str, ...] = PART_NAMES

    @property
    def ok(self) -> bool:
        """No part raised or timed out (a missed goal is still ``ok``: it is a measurement)."""
        return all(r.verdict not in ("error", "timed out") for r in self.rows)


def device_info(dev: torch.device) -> str:
    """:func:`benchmarks.common.machine`, with the CPU count and, on CUDA, the GPU's memory,
    compute capability and the CUDA version torch was built with."""
    info = f"{machine()}, {os.cpu_count()} CPUs"
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info += (f", {props.total_memory / 2**30:.0f} GiB GPU memory, compute capability {props.major}.{props.minor}, "
                 f"CUDA {torch.version.cuda}")
    return info


def run_suite(preset: Optional[str] = None, device: Optional[str] = None, parts: Optional[Sequence[str]] = None) -> SuiteResult:
    """Run the chosen ``parts`` (default all) at ``preset`` sizes on ``device``.

    Defaults: ``cuda:0`` and the ``gpu`` preset when CUDA is available, else ``cpu`` and ``tiny``.
    The ``gpu`` preset on a CPU is refused (it would take hours).
    """
    dev = torch.device(device if device is not None else ("cuda:0" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda:0")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {dev} requested but CUDA is not available here; use --device cpu (tiny sizes)")
    preset = preset or ("gpu" if dev.type == "cuda" else "tiny")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {list(PRESETS)}, got {preset!r}")
    if preset == "gpu" and dev.type != "cuda":
        raise ValueError("the gpu preset needs a CUDA device (it takes hours on a CPU); use --preset tiny")
    chosen = list(parts or PART_NAMES)
    unknown = [p for p in chosen if p not in PART_NAMES]
    if unknown:
        raise ValueError(f"unknown part(s) {unknown}; parts: {list(PART_NAMES)}")
    started = datetime.datetime.now(datetime.timezone.utc)
    result = SuiteResult(preset, str(dev), device_info(dev), started, 0.0, parts=tuple(p for p in PART_NAMES if p in chosen))
    print(f"gpu suite: preset {preset} on {dev}; machine: {result.machine}", flush=True)
    t0 = time.perf_counter()
    for part in PARTS:
        if part.name in chosen:
            result.rows.append(run_part(part, preset, dev))
    result.seconds = time.perf_counter() - t0
    return result


def table(result: SuiteResult) -> str:
    """The markdown table of ``result`` (one row per part), then a note per part."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in result.rows]
    lines.append("")
    lines += [f"- **{r.part}** ({r.ours or '—'} vs {r.peer or '—'}): {r.notes}" for r in result.rows]
    return "\n".join(lines)


def section(result: SuiteResult) -> str:
    """A dated RESULTS.md section for ``result``."""
    stamp = result.started.strftime("%Y-%m-%d %H:%M UTC")
    gpu_time = "" if result.preset != "gpu" else (
        f" (goal: at most {SUITE_BUDGET_S / 60:.0f} minutes: {'met' if result.seconds <= SUITE_BUDGET_S else 'missed'})")
    parts = "" if result.parts == PART_NAMES else f" --parts {','.join(result.parts)}"
    return (f"\n## GPU suite — {stamp}, preset `{result.preset}` on `{result.device}`\n\n"
            f"`python -m benchmarks --gpu-suite --preset {result.preset}{parts}`; machine: {result.machine}; "
            f"whole suite {result.seconds:.0f} s{gpu_time}.\n\n{table(result)}\n")


def append_results(result: SuiteResult, path: Path) -> None:
    """Append :func:`section` to ``path`` (created with a title if missing), atomically."""
    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    atomic_write_text(path, old.rstrip("\n") + "\n" + section(result))


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks --gpu-suite", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=PRESETS, default=None,
                   help="problem sizes (default: gpu with CUDA, tiny without)")
    p.add_argument("--device", default=None, help="cuda:0 (default with CUDA) or cpu")
    p.add_argument("--parts", default=None, help=f"comma-separated subset of {','.join(PART_NAMES)}")
    p.add_argument("--results", type=Path, default=RESULTS, help="markdown file the dated section is appended to")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    args = p.parse_args(argv)
    try:
        result = run_suite(args.preset, args.device, args.parts.split(",") if args.parts else None)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\ngpu suite done in {result.seconds:.1f} s ({result.preset} preset on {result.device})\n")
    print(table(result), flush=True)
    if not args.no_write:
        append_results(result, args.results)
        print(f"\nappended to {args.results}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
