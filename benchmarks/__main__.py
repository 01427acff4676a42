"""Run benchmarks: ``python -m benchmarks`` (all) or ``python -m benchmarks truncated nmf``.

Options after the names (``--threads 1``, ``--steps 32``...) are passed to every chosen
benchmark: ``python -m benchmarks expanded --threads 1``.

``python -m benchmarks --gpu-suite [--preset gpu|tiny] [--results PATH | --no-write]`` runs
every GPU goal in one go (:mod:`benchmarks.gpu_suite`) and appends the table to RESULTS.md."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

from .common import machine


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--gpu-suite" in argv:
        from . import gpu_suite

        argv.remove("--gpu-suite")
        return gpu_suite.main(argv)
    first_option = next((i for i, a in enumerate(argv) if a.startswith("-")), len(argv))
    argv, options = argv[:first_option], argv[first_option:]
    here = Path(__file__).parent
    available = sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_"))
    chosen = argv or available
    unknown = [n for n in chosen if n not in available]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; available: {available}", file=sys.stderr)
        return 2
    print(f"machine: {machine()}")
    for name in chosen:
        print(f"== {name} ==", flush=True)
        importlib.import_module(f"benchmarks.bench_{name}").main(options)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
