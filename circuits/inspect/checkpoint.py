"""Read a checkpoint tensor by tensor, without the model's code and without loading it whole.

- ``.safetensors``: the header (8-byte little-endian length + JSON) is parsed here and each
  tensor's bytes are read with ordinary file reads into one fresh buffer, one tensor at a
  time, in file order. (``safetensors.safe_open`` memory-maps the whole file; every page it
  touches then counts in the process's resident memory until the file is closed, which is
  what a checkpoint larger than memory cannot afford.)
- ``.pth`` / ``.pt`` / ``.bin`` (``torch.save`` zip format): ``torch.load(mmap=True,
  weights_only=True)``; each tensor is used in place from the memory map and, once the
  caller is done with it, its pages are handed back to the kernel (``madvise(DONTNEED)``
  on the map's own range, Linux), so resident memory holds about one tensor at a time.
  Legacy (non-zip) files are loaded whole. Unsafe pickles are refused.

Every problem is a :class:`circuits.models.WeightsError` with a one-line reason.

Example:
    >>> with CheckpointReader("model.safetensors") as ckpt:      # doctest: +SKIP
    ...     for name, tensor in ckpt:
    ...         print(name, tensor.shape)
    >>> checkpoint_stats("model.pth").to_text()                  # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import pickle
import struct
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

import torch

from .._io import PathLike
from ..models.loading import WeightsError
from .stats import StatsConfig, StatsTable, stats_from_items

__all__ = ["CheckpointReader", "iter_checkpoint", "checkpoint_stats", "read_safetensors_header", "CHECKPOINT_SUFFIXES"]

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")

_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _ST_DTYPES[_name] = getattr(torch, _attr)
_MAX_HEADER = 100 * 1024 * 1024


def read_safetensors_header(path: PathLike) -> tuple[int, dict[str, dict[str, Any]]]:
    """Parse a safetensors header → ``(data_start, {name: {"dtype", "shape", "data_offsets"}})``.

    Raises :class:`WeightsError` when the file is not a valid safetensors file.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise WeightsError(f"{path} is not a valid safetensors file: only {size} bytes")
        (n,) = struct.unpack("<Q", raw)
        if n == 0 or n > min(_MAX_HEADER, size - 8):
            raise WeightsError(f"{path} is not a valid safetensors file: header length {n} does not fit a {size}-byte file")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise WeightsError(f"{path} is not a valid safetensors file: unreadable header ({exc})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path} is not a valid safetensors file: header is not a JSON object")
    header.pop("__metadata__", None)
    start = 8 + n
    for name, info in header.items():
        try:
            dtype, shape, (b, e) = info["dtype"], [int(s) for s in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{path} is not a valid safetensors file: bad header entry for {name!r}") from None
        if dtype not in _ST_DTYPES:
            raise WeightsError(f"{path}: tensor {name!r} has dtype {dtype}, which this reader does not support")
        nbytes = math.prod(shape) * torch.empty((), dtype=_ST_DTYPES[dtype]).element_size()
        if not (0 <= b <= e and e - b == nbytes and start + e <= size):
            raise WeightsError(f"{path} is not a valid safetensors file (truncated?): tensor {name!r} "
                               f"needs bytes {b}..{e} of the data section, {size - start} present")
    return start, header


class _Madvise:
    """``madvise(MADV_DONTNEED)`` restricted to the file's own mappings (Linux only)."""

    def __init__(self, path: Path):
        self.ranges: list[tuple[int, int]] = []
        self.fn = None
        if not sys.platform.startswith("linux"):
            return
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            self.fn = libc.madvise
            self.fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            real = os.path.realpath(path)
            with open("/proc/self/maps") as f:
                for line in f:
                    parts = line.split(None, 5)
                    if len(parts) == 6 and parts[5].strip() == real:
                        lo, hi = (int(x, 16) for x in parts[0].split("-"))
                        self.ranges.append((lo, hi))
        except (OSError, AttributeError, ValueError):
            self.fn = None
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def release(self, t: torch.Tensor) -> None:
        if self.fn is None or not self.ranges:
            return
        storage = t.untyped_storage()
        lo, hi = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        for a, b in self.ranges:
            s, e = max(lo, a), min(hi, b)
            if s < e:  # only pages that belong to the read-only file map
                s -= s % self.page
                self.fn(ctypes.c_void_p(s), ctypes.c_size_t(e - s), 4)  # MADV_DONTNEED


def _unwrap(obj: Any, path: Path) -> Mapping[str, Any]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    return obj


class CheckpointReader:
    """A checkpoint file opened for one-tensor-at-a-time access.

    ``keys()`` lists tensor names (file order), ``get(name)`` reads one tensor, iteration
    yields ``(name, tensor)`` pairs. Use as a context manager (or call :meth:`close`).
    A tensor yielded by iteration is valid until the next one is requested (for ``.pth`` its
    memory is handed back to the kernel then): copy it (``.clone()``) to keep it.
    """

    def __init__(self, path: PathLike):
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise WeightsError(f"checkpoint not found: {self.path}")
        if self.path.is_dir():
            raise WeightsError(f"checkpoint path is a folder, not a file: {self.path}")
        self._file = None
        self._state: Optional[Mapping[str, Any]] = None
        self._madvise: Optional[_Madvise] = None
        if self._is_safetensors():
            self.format = "safetensors"
            self._start, self._header = read_safetensors_header(self.path)
            self._names = sorted(self._header, key=lambda k: self._header[k]["data_offsets"][0])
            self._file = open(self.path, "rb")
        else:
            self.format = "pytorch"
            self._state = self._load_torch()
            self._names = [str(k) for k in self._state]
        if not self._names:
            raise WeightsError(f"{self.path} holds no tensors (empty state dict)")

    def _is_safetensors(self) -> bool:
        if self.path.suffix == ".safetensors":
            return True
        if self.path.suffix in CHECKPOINT_SUFFIXES:
            return False
        with open(self.path, "rb") as f:  # unknown suffix: sniff the header
            head = f.read(9)
        return len(head) == 9 and head[8:9] == b"{"

    def _load_torch(self) -> Mapping[str, Any]:
        path = self.path
        with open(path, "rb") as f:
            head = f.read(4)
        is_zip = head == b"PK\x03\x04"
        if not is_zip and head[:1] != b"\x80":  # neither a torch.save zip nor a (legacy) pickle
            raise WeightsError(f"{path} is not a readable checkpoint (expected a torch.save .pth/.pt file or a "
                               ".safetensors file)")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
        except pickle.UnpicklingError as exc:
            if "Unsupported global" in str(exc):
                raise WeightsError(
                    f"{path} needs arbitrary code to unpickle (it stores more than tensors), so it is refused "
                    "for safety; if you trust it, re-save its state dict: torch.save(torch.load(path, "
                    "weights_only=False).state_dict(), 'clean.pth')") from None
            raise WeightsError(f"{path} is not a readable PyTorch checkpoint: {str(exc).splitlines()[0]}") from None
        except (RuntimeError, EOFError, OSError, ValueError, struct.error, AttributeError, KeyError, IndexError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise WeightsError(f"{path} is not a readable checkpoint (expected a torch.save .pth/.pt file or a "
                              f".safetensors file; corrupted or truncated?): {first}") from None
        state = _unwrap(obj, path)
        bad = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise WeightsError(f"{path}: entries that are not tensors: {', '.join(bad[:10])}"
                               + (" ..." if len(bad) > 10 else "") + " (expected a state dict of tensors)")
        if is_zip:
            self._madvise = _Madvise(path)
        return state

    def keys(self) -> list[str]:
        return list(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in set(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        if self._state is not None:
            return tuple(self._state[name].shape)
        return tuple(int(s) for s in self._header[name]["shape"])

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (a fresh buffer for safetensors; a memory-mapped view for .pth)."""
        if name not in self._names:
            raise KeyError(f"{name!r} is not in {self.path}")
        if self._state is not None:
            return self._state[name]
        info = self._header[name]
        dtype = _ST_DTYPES[info["dtype"]]
        b, e = info["data_offsets"]
        buf = torch.empty(e - b, dtype=torch.uint8)
        assert self._file is not None
        self._file.seek(self._start + b)
        if e > b:
            got = self._file.readinto(memoryview(buf.numpy()))
            if got != e - b:
                raise WeightsError(f"{self.path} is truncated: tensor {name!r} is short of {e - b - (got or 0)} bytes")
        if sys.byteorder != "little" and dtype.itemsize > 1:  # pragma: no cover
            buf = buf.view(-1, dtype.itemsize).flip(1).reshape(-1)
        return buf.view(dtype).reshape([int(s) for s in info["shape"]])

    def release(self, tensor: torch.Tensor) -> None:
        """Give a memory-mapped tensor's pages back to the kernel (no-op for safetensors)."""
        if self._madvise is not None:
            self._madvise.release(tensor)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._names:
            t = self.get(name)
            yield name, t
            self.release(t)
            del t

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._state = None

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def iter_checkpoint(path: PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` from a checkpoint file, one tensor resident at a time."""
    with CheckpointReader(path) as reader:
        yield from reader


def checkpoint_stats(path: PathLike, config: Optional[StatsConfig] = None, progress: bool = False, **kwargs: Any) -> StatsTable:
    """The :func:`~circuits.inspect.stats.weight_stats` table of a checkpoint file, streamed.

    Needs no model code: every floating-point tensor in the state dict is a row (buffers such
    as BatchNorm running statistics included; integer tensors are listed as skipped).
    """
    with CheckpointReader(path) as reader:
        return stats_from_items(iter(reader), config, progress=progress, total=len(reader), **kwargs)


def _is_checkpoint_path(source: Union[str, os.PathLike]) -> bool:
    s = str(source)
    return Path(s).suffix.lower() in CHECKPOINT_SUFFIXES or os.path.sep in s or os.path.exists(s)
