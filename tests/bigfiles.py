"""Helpers for the large-file tests: sparse safetensors files and peak memory of a child process."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable, Optional

import numpy as np


def write_sparse_safetensors(path: Path, n_tensors: int, rows: int, cols: int,
                             live: Callable[[int], np.ndarray]) -> None:
    """A float32 safetensors file of ``n_tensors`` ``[rows, cols]`` tensors written without
    holding it in memory: per tensor, ``live(i)`` (its first rows), then a hole (zeros)."""
    nbytes = rows * cols * 4
    header = {f"layer{i}.weight": {"dtype": "F32", "shape": [rows, cols], "data_offsets": [i * nbytes, (i + 1) * nbytes]}
              for i in range(n_tensors)}
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    start = 8 + len(h)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for i in range(n_tensors):
            f.seek(start + i * nbytes)
            f.write(np.ascontiguousarray(live(i), dtype=np.float32).tobytes())
        f.truncate(start + n_tensors * nbytes)


_PRELUDE = textwrap.dedent("""
    import json, resource, sys
    import torch

    def hwm_kib():
        # VmHWM: peak resident set of *this* process image (ru_maxrss would include the
        # parent's RSS at fork time, which Linux carries over exec)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    torch.set_num_threads(1)  # the test machine is shared and oversubscribed
""")


def run_measured(body: str, *args: str, timeout: Optional[float] = 900) -> dict:
    """Run ``body`` in a fresh interpreter after imports; it sets ``result`` (JSON-able) after
    ``base = hwm_kib()`` was taken. Returns ``{"base", "peak", "result"}`` (KiB)."""
    code = _PRELUDE + "base = hwm_kib()\n" + textwrap.dedent(body) + \
        '\nprint(json.dumps({"base": base, "peak": hwm_kib(), "result": result}))\n'
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
