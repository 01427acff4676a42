"""Cold start of the command line: ``circuits --help`` in a new process (goal: under 1.5 s).

The peer is importing Lucent's rendering module (``lucent.optvis.render``), which is where a
Lucent user starts; ``import torch`` alone is printed as the floor. Each is timed as a fresh
interpreter (``python -c ...``), fastest of ``--repeat`` runs (first run discarded: it reads
the files into the page cache)."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from .common import report

GOAL_S = 1.5


def _cold(code: list[str], repeat: int) -> float:
    times = []
    for i in range(repeat + 1):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, *code], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if i:
            times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--no-peer", action="store_true", help="time only circuits (the smoke test)")
    args = p.parse_args(argv)
    floor = float("nan") if args.no_peer else _cold(["-c", "import torch"], args.repeat)
    peer = float("nan") if args.no_peer else _cold(["-W", "ignore", "-c", "import lucent.optvis.render"], args.repeat)
    ours = _cold(["-m", "circuits", "--help"], args.repeat)
    verdict = "meets" if ours < GOAL_S else "MISSES"
    return report("cold start: circuits --help", "import lucent.optvis.render", peer, ours,
                  extra=f"import torch alone {floor:.2f} s; goal < {GOAL_S} s: {verdict}")


if __name__ == "__main__":
    main()
