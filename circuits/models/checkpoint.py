"""The one checkpoint reader: every entry point (``load_weights``, ``--model FILE``, ``inspect``,
``diff``) reads weight files through :class:`CheckpointReader`.

What it reads (the format is sniffed from the bytes, never trusted from the suffix):

- ``torch.save`` zip files (``.pth``/``.pt``/``.bin``/``.ckpt``): memory-mapped
  (``torch.load(mmap=True, weights_only=True)``); a tensor's pages are handed back to the
  kernel once the caller is done with it (``madvise(DONTNEED)``, Linux), so resident memory
  holds about one tensor at a time.
- legacy (pre-1.6, non-zip) ``torch.save`` files: loaded whole (the format cannot be mapped).
- ``.safetensors``: the header is parsed here and each tensor (or a block of its rows) is
  read with ordinary file reads into a fresh buffer.
- a folder of shards with an ``*.index.json`` (``{"weight_map": {name: shard file}}``), or
  that index file itself: each shard is opened when first needed, one at a time.

What it accepts inside: a flat state dict, a state dict wrapped once or several times
(``{"state_dict": ...}``, ``{"model": {"state_dict": ...}, "epoch": 3}``), and nested
mappings, flattened with dotted prefixes (``{"encoder": ..., "decoder": ...}`` gives
``encoder.*`` and ``decoder.*``). Wrappers that hold all the tensors are removed; optimizer
state (a mapping with ``state`` and ``param_groups``) and entries that are not tensors
(``epoch``, ``config`` ...) are skipped and listed in :attr:`CheckpointReader.notes`.

Safety: a pickle may name any Python callable to rebuild an object, so loading one can run
code. Before ``torch.load`` ever sees a file, the pickle's imports are read from its opcodes
(nothing is executed) and anything beyond tensors and plain containers is refused with
:class:`UnsafeCheckpointError`; ``torch.load`` then runs with ``weights_only=True`` as a
second line. The message never suggests turning the safety off.

Every bad file is a :class:`WeightsError` (a :class:`CheckpointFormatError` or an
:class:`UnsafeCheckpointError`) whose one line says what the file is and what was expected.

Example:
    >>> with CheckpointReader("model.safetensors") as ckpt:      # doctest: +SKIP
    ...     for name, tensor in ckpt:
    ...         print(name, tuple(tensor.shape))
    >>> state = read_checkpoint("ckpt.pth")                       # doctest: +SKIP
"""

from __future__ import annotations

import _compat_pickle
import ctypes
import io
import json
import math
import os
import pickle
import pickletools
import re
import struct
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

import torch

from .._io import PathLike

__all__ = [
    "WeightsError",
    "CheckpointFormatError",
    "UnsafeCheckpointError",
    "CheckpointReader",
    "CHECKPOINT_SUFFIXES",
    "EXPECTED_CHECKPOINT",
    "flatten_state_dict",
    "iter_checkpoint",
    "read_checkpoint",
    "read_safetensors_header",
    "sniff_checkpoint",
]

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
EXPECTED_CHECKPOINT = ("expected a checkpoint: a torch.save file (.pth/.pt/.bin), a .safetensors file, "
                       "or a folder of shards with an *.index.json")


class WeightsError(RuntimeError):
    """Weights could not be loaded; the message says why and what to do about it."""


class CheckpointFormatError(WeightsError):
    """The file is not a checkpoint this reader understands, or it is damaged."""


class UnsafeCheckpointError(WeightsError):
    """The file is a pickle that would import more than tensors and containers: refused."""


# ----------------------------------------------------------------------------- sniffing

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
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_MAGIC = (  # first bytes -> what the file is
    (b"\x1f\x8b", "gzip-compressed data (decompress it first)"),
    (b"\x93NUMPY", "a NumPy .npy array"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file (a Keras .h5 model?)"),
    (b"GGUF", "a GGUF model file (llama.cpp)"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"%PDF", "a PDF document"),
    (b"BZh", "bzip2-compressed data (decompress it first)"),
    (b"\xfd7zXZ\x00", "xz-compressed data (decompress it first)"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed data (decompress it first)"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (b"\x7fELF", "an executable (ELF)"),
)


def _describe_bytes(head: bytes, size: int) -> str:
    """What a file that is not a checkpoint looks like, in a few words."""
    if size == 0:
        return "an empty file (0 bytes)"
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "a tar archive (extract it first)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:  # a multi-byte character cut at the end of the head is still text
        text = head[: exc.start].decode("utf-8") if exc.start > len(head) - 4 else ""
    if text and sum(c.isprintable() or c in "\r\n\t" for c in text) >= 0.95 * len(text):
        stripped = text.lstrip()
        kind = "a JSON file" if stripped[:1] in ("{", "[") else "a text file"
        first = stripped.splitlines()[0] if stripped else ""
        first = first[:40] + ("..." if len(first) > 40 else "")
        return f"{kind} (starting {first!r})" if first else kind
    return f"binary data of an unknown format (first bytes {head[:8].hex(' ')})"


def _head(path: Path, n: int = 512) -> tuple[bytes, int]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        return f.read(n), size


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 0 < n <= size - 8 and head[8:9] == b"{"


def sniff_checkpoint(path: PathLike) -> str:
    """The checkpoint format of ``path``: ``"safetensors"``, ``"torch-zip"``,
    ``"torch-legacy"`` or ``"sharded"`` (a folder or an ``*.index.json``).

    Raises :class:`CheckpointFormatError` saying what the file is when it is none of these.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointFormatError(f"checkpoint not found: {path}")
    if path.is_dir():
        return "sharded"
    head, size = _head(path)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "torch-zip"
    if _looks_like_safetensors(head, size):
        return "safetensors"
    if head[:1] == b"\x80" and len(head) >= 2 and 2 <= head[1] <= 5:
        return "torch-legacy"
    if path.suffix == ".safetensors" and len(head) >= 8:
        return "safetensors"  # read_safetensors_header says precisely what is wrong
    if head.lstrip()[:1] == b"{" and path.name.endswith(".json"):
        return "sharded"  # an index file; _Sharded checks that it is one
    raise CheckpointFormatError(f"{path} is {_describe_bytes(head, size)}; {EXPECTED_CHECKPOINT}")


# ----------------------------------------------------------------------------- safetensors


def read_safetensors_header(path: PathLike) -> tuple[int, dict[str, dict[str, Any]]]:
    """Parse a safetensors header → ``(data_start, {name: {"dtype", "shape", "data_offsets"}})``.

    Raises :class:`CheckpointFormatError` when the file is not a valid safetensors file.
    """
    path = Path(path)
    size = path.stat().st_size
    bad = f"{path} is not a valid safetensors file"
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointFormatError(f"{bad}: only {size} bytes (a header needs at least 8)")
        (n,) = struct.unpack("<Q", raw)
        if n == 0 or n > min(_MAX_HEADER, size - 8):
            raise CheckpointFormatError(f"{bad}: header length {n} does not fit a {size}-byte file")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointFormatError(f"{bad}: unreadable JSON header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{bad}: the header is not a JSON object")
    header.pop("__metadata__", None)
    start = 8 + n
    for name, info in header.items():
        try:
            dtype, shape, (b, e) = info["dtype"], [int(s) for s in info["shape"]], info["data_offsets"]
            b, e = int(b), int(e)
        except (KeyError, TypeError, ValueError):
            raise CheckpointFormatError(f"{bad}: bad header entry for {name!r}") from None
        if dtype not in _ST_DTYPES:
            raise CheckpointFormatError(f"{path}: tensor {name!r} has dtype {dtype}, which this reader does not support")
        if any(s < 0 for s in shape):
            raise CheckpointFormatError(f"{bad}: tensor {name!r} has a negative dimension {shape}")
        nbytes = math.prod(shape) * torch.empty((), dtype=_ST_DTYPES[dtype]).element_size()
        if not (0 <= b <= e and e - b == nbytes and start + e <= size):
            raise CheckpointFormatError(f"{bad} (truncated?): tensor {name!r} needs bytes {b}..{e} of the data "
                                        f"section, {size - start} present")
    return start, header


# ----------------------------------------------------------------------------- pickle safety

# what a weights-only checkpoint may import: torch's tensor machinery and plain containers.
# Other torch.* names are left to torch's own weights_only unpickler (the second line).
_SAFE_GLOBALS = {"collections.OrderedDict", "collections.Counter", "_codecs.encode", "builtins.set",
                 "builtins.bytearray", "builtins.complex"}
_PUSH_STR = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_MEMO_PUT = {"MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"}
_MEMO_GET = {"GET", "BINGET", "LONG_BINGET"}


def _py3_name(module: str, name: str) -> str:
    """The name Python 3 imports for a protocol-2 pickle's ``module name`` (``__builtin__`` → ``builtins``)."""
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"


def _pickle_imports(stream: Any) -> list[str]:
    """The ``module.name`` globals one pickle imports, read from its opcodes (nothing runs).

    A ``STACK_GLOBAL`` whose two strings cannot be followed, and an extension-registry import
    (``EXT1/2/4``), are reported as ``"<hidden>"`` (and so refused).
    Raises ``ValueError`` (from :mod:`pickletools`) when the bytes are not a valid pickle.
    """
    found: list[str] = []
    memo: dict[Any, Optional[str]] = {}
    recent: list[Optional[str]] = []  # values pushed since the last non-push opcode
    for op, arg, _ in pickletools.genops(stream):
        name = op.name
        if name in ("GLOBAL", "INST"):
            found.append(_py3_name(*str(arg).split(" ", 1)) if " " in str(arg) else str(arg))
            recent = []
        elif name == "STACK_GLOBAL":
            found.append(_py3_name(*recent[-2:]) if len(recent) >= 2 and None not in recent[-2:] else "<hidden>")  # type: ignore[misc]
            recent = []
        elif name in ("EXT1", "EXT2", "EXT4"):
            found.append("<hidden>")
            recent = []
        elif name in _PUSH_STR:
            recent.append(str(arg))
        elif name in _MEMO_GET:
            recent.append(memo.get(arg))
        elif name == "FRAME":
            continue
        elif name in _MEMO_PUT:
            memo[len(memo) if name == "MEMOIZE" else arg] = recent[-1] if recent else None
        else:
            recent = []
    return found


def _unsafe(path: Path, names: list[str]) -> UnsafeCheckpointError:
    shown = ", ".join(dict.fromkeys(names[:5]))
    return UnsafeCheckpointError(
        f"{path} is a pickle that imports {shown} to rebuild its contents; refused, because unpickling "
        "anything beyond tensors and plain containers can run arbitrary code. Ask for the weights as a "
        ".safetensors file or a plain state dict of tensors")


def _check_imports(path: Path, names: list[str]) -> None:
    bad = [n for n in names if not (n in _SAFE_GLOBALS or n.startswith("torch."))]
    if bad:
        raise _unsafe(path, bad)


def _scan_zip(path: Path) -> int:
    """Check a torch.save zip: a readable archive with a ``data.pkl`` whose imports are safe.

    Returns the pickle protocol of ``data.pkl``.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
            if not pkl:
                shown = ", ".join(names[:4]) + (" ..." if len(names) > 4 else "")
                hint = " (a NumPy .npz?)" if names and all(n.endswith(".npy") for n in names) else ""
                raise CheckpointFormatError(f"{path} is a zip archive but not a torch.save checkpoint{hint}: it has "
                                            f"no data.pkl (it holds {shown or 'nothing'}); {EXPECTED_CHECKPOINT}")
            with zf.open(pkl[0]) as f:
                data = f.read()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError, ValueError, struct.error,
            zlib.error) as exc:
        raise CheckpointFormatError(f"{path} is a damaged or truncated zip archive ({exc}); {EXPECTED_CHECKPOINT}") from None
    try:
        _check_imports(path, _pickle_imports(io.BytesIO(data)))
    except ValueError:
        raise CheckpointFormatError(f"{path} is a torch.save zip whose data.pkl is not a valid pickle (damaged?)") from None
    return data[1] if len(data) > 1 and data[0] == 0x80 else 0


def _scan_legacy(path: Path) -> int:
    """Check a legacy torch.save file: torch's magic number first, safe imports in its pickles."""
    with open(path, "rb") as f:
        head = f.read(14)
        f.seek(0)
        is_torch = head[:4] == b"\x80\x02\x8a\x0a" and int.from_bytes(head[4:14], "little") == _TORCH_LEGACY_MAGIC
        n_pickles = 5 if is_torch else 1  # magic, protocol, sys info, the object, storage keys
        names: list[str] = []
        for i in range(n_pickles):
            try:
                names += _pickle_imports(f)
            except ValueError:
                if i == 0:
                    raise CheckpointFormatError(f"{path} starts like a pickle but is not a valid one (damaged or "
                                                f"random bytes); {EXPECTED_CHECKPOINT}") from None
                raise CheckpointFormatError(f"{path} is a legacy torch.save file whose pickle {i + 1} is damaged "
                                            "(truncated?)") from None
    _check_imports(path, names)
    if not is_torch:
        raise CheckpointFormatError(f"{path} is a Python pickle written by pickle.dump, not by torch.save; "
                                    f"{EXPECTED_CHECKPOINT}")
    return 2


_TORCH_ERRORS = (RuntimeError, EOFError, OSError, ValueError, struct.error, AttributeError, KeyError, IndexError,
                 TypeError, zipfile.BadZipFile, UnicodeDecodeError, OverflowError, MemoryError)


def _torch_load(path: Path, mmap: bool, protocol: int) -> Any:
    """``torch.load(weights_only=True)`` with every failure mapped to one line of ours."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        globs = re.findall(r"GLOBAL ([A-Za-z_][\w.]*)", text)
        if globs or "Unsupported global" in text or "Unsupported class" in text:
            raise _unsafe(path, globs or ["an object torch does not allow"]) from None
        if "Unsupported operand" in text and protocol > 2:
            raise CheckpointFormatError(
                f"{path} is a torch.save file written with pickle protocol {protocol}, which torch's weights-only "
                "(safe) loader cannot read; ask for a .safetensors file or one saved with torch.save's default "
                "protocol") from None
        raise CheckpointFormatError(f"{path} is a torch.save file whose pickle is damaged; {EXPECTED_CHECKPOINT}") from None
    except _TORCH_ERRORS as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in first or len(first) > 160:
            first = type(exc).__name__
        raise CheckpointFormatError(f"{path} is a damaged or truncated torch.save file ({first}); "
                                    f"{EXPECTED_CHECKPOINT}") from None


# ----------------------------------------------------------------------------- unwrapping


def _is_optimizer_state(node: Any) -> bool:
    return isinstance(node, Mapping) and "state" in node and "param_groups" in node


def _holds_tensor(node: Any, depth: int = 0) -> bool:
    if isinstance(node, torch.Tensor):
        return True
    if depth > 32 or _is_optimizer_state(node):
        return False
    if isinstance(node, Mapping):
        return any(_holds_tensor(v, depth + 1) for v in node.values())
    if isinstance(node, (list, tuple)):
        return any(_holds_tensor(v, depth + 1) for v in node)
    return False


def flatten_state_dict(obj: Any, source: str = "checkpoint") -> tuple[dict[str, torch.Tensor], list[str]]:
    """Tensors of a loaded checkpoint object as a flat ``{dotted.name: tensor}``, plus notes.

    Wrappers that hold every tensor (``{"state_dict": ...}``, ``{"model": {"state_dict": ...}}``,
    ``{"net": ..., "optim": ...}``) are removed; the remaining nesting becomes dotted
    prefixes (``{"encoder": {"w": t}}`` → ``encoder.w``; lists give ``.0``, ``.1``).
    Optimizer state and entries that are not tensors are skipped; each skip is a note.

    Raises :class:`CheckpointFormatError` when ``obj`` is not a mapping or holds no tensors.
    """
    if isinstance(obj, torch.Tensor):
        raise CheckpointFormatError(f"{source} holds a single tensor of shape {tuple(obj.shape)}, not a state dict "
                                    "(a mapping of names to tensors)")
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(f"{source} holds a {type(obj).__name__}, not a state dict (a mapping of names "
                                    "to tensors)")
    if _is_optimizer_state(obj):
        raise CheckpointFormatError(f"{source} holds optimizer state only (state, param_groups), no model weights")
    notes: list[str] = []
    prefix: list[str] = []
    node: Any = obj
    while isinstance(node, Mapping):  # strip wrappers: a level where one entry holds every tensor
        holders = [k for k, v in node.items() if _holds_tensor(v)]
        if len(holders) != 1 or isinstance(node[holders[0]], torch.Tensor) or not isinstance(node[holders[0]], Mapping):
            break
        _skipped_siblings(node, holders[0], prefix, notes)
        prefix.append(str(holders[0]))
        node = node[holders[0]]
    if prefix:
        notes.insert(0, f"weights read from {'.'.join(prefix)!r}")
    out: dict[str, torch.Tensor] = {}
    others: list[str] = []

    def walk(value: Any, path: list[str]) -> None:
        name = ".".join(path)
        if isinstance(value, torch.Tensor):
            if name in out:
                raise CheckpointFormatError(f"{source}: two entries flatten to the same name {name!r}")
            out[name] = value
        elif _is_optimizer_state(value):
            notes.append(f"skipped {name}: optimizer state")
        elif isinstance(value, Mapping) and _holds_tensor(value):
            for k, v in value.items():
                walk(v, path + [str(k)])
        elif isinstance(value, (list, tuple)) and _holds_tensor(value):
            for i, v in enumerate(value):
                walk(v, path + [str(i)])
        else:
            others.append(f"{name} ({type(value).__name__})")

    for k, v in node.items():
        walk(v, [str(k)])
    if others:
        shown = ", ".join(others[:8]) + (f" and {len(others) - 8} more" if len(others) > 8 else "")
        what = "entry that is not a tensor" if len(others) == 1 else "entries that are not tensors"
        notes.append(f"skipped {len(others)} {what}: {shown}")
    if not out:
        keys = ", ".join(map(str, list(obj)[:8])) if obj else "nothing"
        raise CheckpointFormatError(f"{source} holds no tensors (empty state dict; top-level keys: {keys})")
    return out, notes


def _skipped_siblings(node: Mapping, kept: Any, prefix: list[str], notes: list[str]) -> None:
    where = ".".join(prefix + [""]) if prefix else ""
    for k, v in node.items():
        if k == kept:
            continue
        what = "optimizer state" if _is_optimizer_state(v) else f"not a tensor ({type(v).__name__})"
        notes.append(f"skipped {where}{k}: {what}")


# ----------------------------------------------------------------------------- the reader


class _Madvise:
    """``madvise(MADV_DONTNEED)`` restricted to the file's own mappings (Linux only)."""

    def __init__(self, path: Path):
        self.ranges: list[tuple[int, int]] = []
        self.fn = None
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
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


class _SafetensorsFile:
    def __init__(self, path: Path):
        self.path = path
        self.start, self.header = read_safetensors_header(path)
        self.names = sorted(self.header, key=lambda k: self.header[k]["data_offsets"][0])
        self.file = open(path, "rb")
        self.notes: list[str] = []

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(s) for s in self.header[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return _ST_DTYPES[self.header[name]["dtype"]]

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        info = self.header[name]
        dtype, shape = _ST_DTYPES[info["dtype"]], [int(s) for s in info["shape"]]
        b, e = info["data_offsets"]
        if shape:
            row = (e - b) // shape[0] if shape[0] else 0
            b, e = b + start * row, b + stop * row
            shape = [stop - start] + shape[1:]
        buf = torch.empty(e - b, dtype=torch.uint8)
        self.file.seek(self.start + b)
        if e > b:
            got = self.file.readinto(memoryview(buf.numpy()))
            if got != e - b:
                raise CheckpointFormatError(f"{self.path} is truncated: tensor {name!r} is short of "
                                            f"{e - b - (got or 0)} bytes")
        if sys.byteorder != "little" and dtype.itemsize > 1:  # pragma: no cover
            buf = buf.view(-1, dtype.itemsize).flip(1).reshape(-1)
        return buf.view(dtype).reshape(shape)

    def get(self, name: str) -> torch.Tensor:
        shape = self.shape(name)
        return self.rows(name, 0, shape[0]) if shape else self.rows(name, 0, 0)

    def release(self, t: torch.Tensor) -> None:
        pass

    def close(self) -> None:
        self.file.close()


class _TensorState:
    """Tensors already in memory (or memory-mapped): a flattened state dict."""

    def __init__(self, obj: Any, source: str):
        self.state, self.notes = flatten_state_dict(obj, source)
        self.names = list(self.state)
        self.madvise: Optional[_Madvise] = None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.state[name].dtype

    def get(self, name: str) -> torch.Tensor:
        return self.state[name]

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        t = self.state[name]
        return t[start:stop] if t.dim() else t

    def release(self, t: torch.Tensor) -> None:
        if self.madvise is not None:
            self.madvise.release(t)

    def close(self) -> None:
        self.state = {}


class _TorchFile(_TensorState):
    def __init__(self, path: Path, fmt: str, mmap: bool):
        protocol = _scan_zip(path) if fmt == "torch-zip" else _scan_legacy(path)
        use_mmap = mmap and fmt == "torch-zip"
        super().__init__(_torch_load(path, use_mmap, protocol), str(path))
        self.madvise = _Madvise(path) if use_mmap else None


def _open_file(path: Path, mmap: bool) -> Union[_SafetensorsFile, _TorchFile]:
    fmt = sniff_checkpoint(path)
    if fmt == "safetensors":
        return _SafetensorsFile(path)
    if fmt == "sharded":
        raise CheckpointFormatError(f"{path} is an index or folder inside a sharded checkpoint; expected a shard file")
    return _TorchFile(path, fmt, mmap)


class _Sharded:
    """Shards listed by an ``*.index.json``; one shard open at a time."""

    def __init__(self, path: Path, mmap: bool):
        index = self._find_index(path) if path.is_dir() else path
        self.path, self.mmap = index, mmap
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointFormatError(f"{index} is not a valid shard index: unreadable JSON ({exc})") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointFormatError(f"{index} is a JSON file but not a shard index (expected a non-empty "
                                        "\"weight_map\": {tensor name: shard file}); " + EXPECTED_CHECKPOINT)
        folder = index.parent
        self.shard_of: dict[str, Path] = {}
        for name, shard in weight_map.items():
            p = (folder / shard).resolve()
            if folder.resolve() not in p.parents:
                raise CheckpointFormatError(f"{index} names a shard outside its folder: {shard!r}")
            self.shard_of[name] = p
        shards = list(dict.fromkeys(self.shard_of.values()))
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            raise CheckpointFormatError(f"{index} names shard {missing[0]}, which is missing from {folder} "
                                        f"({len(missing)} of {len(shards)} shards missing)")
        self.names = [n for s in shards for n in weight_map if self.shard_of[n] == s]
        self.notes: list[str] = [f"{len(shards)} shards listed by {index.name}"]
        self._open: Optional[tuple[Path, Union[_SafetensorsFile, _TorchFile], set[str]]] = None

    @staticmethod
    def _find_index(folder: Path) -> Path:
        indexes = sorted(folder.glob("*.index.json"), key=lambda p: (".safetensors." not in p.name, p.name))
        if indexes:
            return indexes[0]
        weights = sorted(p.name for p in folder.iterdir() if p.suffix in CHECKPOINT_SUFFIXES)
        found = f"it holds {len(weights)} weight file(s): {', '.join(weights[:4])}" if weights else "it holds no weight files"
        raise CheckpointFormatError(f"{folder} is a folder without a *.index.json ({found}); pass one file, or "
                                    f"{EXPECTED_CHECKPOINT}")

    def _shard(self, name: str) -> Union[_SafetensorsFile, _TorchFile]:
        path = self.shard_of[name]
        if self._open is None or self._open[0] != path:
            if self._open is not None:
                self._open[1].close()
            opened = _open_file(path, self.mmap)
            self._open = (path, opened, set(opened.names))
        shard, held = self._open[1], self._open[2]
        if name not in held:
            raise CheckpointFormatError(f"{self.path} lists {name!r} in {path.name}, but that shard does not hold it")
        return shard

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shard(name).shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self._shard(name).dtype(name)

    def get(self, name: str) -> torch.Tensor:
        return self._shard(name).get(name)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._shard(name).rows(name, start, stop)

    def release(self, t: torch.Tensor) -> None:
        if self._open is not None:
            self._open[1].release(t)

    def close(self) -> None:
        if self._open is not None:
            self._open[1].close()
            self._open = None


class CheckpointReader:
    """A checkpoint opened for one-tensor-at-a-time access (see the module docstring).

    Args:
        path: a checkpoint file, a shard index, or a folder with one.
        mmap: memory-map ``torch.save`` zip files (bounded memory); ``False`` reads them whole.

    ``keys()`` lists tensor names, ``get(name)`` reads one tensor, ``rows(name, a, b)`` reads
    rows ``a:b`` of its first dimension, iteration yields ``(name, tensor)`` pairs, ``notes``
    says what was unwrapped or skipped. A tensor yielded by iteration is valid until the next
    one is requested (its memory may be handed back then): ``.clone()`` it to keep it.
    """

    def __init__(self, path: PathLike, mmap: bool = True):
        self.path = Path(path).expanduser()
        self.format = sniff_checkpoint(self.path)
        if self.format == "sharded":
            impl: Union[_SafetensorsFile, _TensorState, _Sharded] = _Sharded(self.path, mmap)
        elif self.format == "safetensors":
            impl = _SafetensorsFile(self.path)
        else:
            impl = _TorchFile(self.path, self.format, mmap)
        self._attach(impl)

    def _attach(self, impl: Union[_SafetensorsFile, _TensorState, _Sharded]) -> None:
        self._impl = impl
        self.notes: list[str] = list(impl.notes)
        self._names = list(impl.names)
        self._name_set = set(self._names)
        if not self._names:
            self.close()
            raise CheckpointFormatError(f"{self.path} holds no tensors (empty state dict)")

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], label: str = "state dict") -> "CheckpointReader":
        """The same reader over an in-memory (possibly wrapped or nested) state dict."""
        reader = cls.__new__(cls)
        reader.path = Path(label)
        reader.format = "memory"
        reader._attach(_TensorState(state, label))
        return reader

    def keys(self) -> list[str]:
        return list(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._name_set

    def _check(self, name: str) -> None:
        if name not in self._name_set:
            import difflib

            close = difflib.get_close_matches(name, self._names, n=3)
            raise KeyError(f"{name!r} is not in {self.path}" + (f"; did you mean {', '.join(close)}?" if close else ""))

    def shape(self, name: str) -> tuple[int, ...]:
        self._check(name)
        return self._impl.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        self._check(name)
        return self._impl.dtype(name)

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (a fresh buffer for safetensors; a memory-mapped view for .pth)."""
        self._check(name)
        return self._impl.get(name)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor's first dimension (a 0-d tensor whole)."""
        self._check(name)
        shape = self._impl.shape(name)
        n = shape[0] if shape else 0
        start, stop = max(0, min(start, n)), max(0, min(stop, n))
        return self._impl.rows(name, start, max(start, stop))

    def release(self, tensor: torch.Tensor) -> None:
        """Give a memory-mapped tensor's pages back to the kernel (no-op for read buffers)."""
        self._impl.release(tensor)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._names:
            t = self.get(name)
            yield name, t
            self.release(t)
            del t

    def close(self) -> None:
        self._impl.close()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def iter_checkpoint(path: PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` from a checkpoint, one tensor resident at a time."""
    with CheckpointReader(path) as reader:
        yield from reader


def read_checkpoint(path: PathLike) -> dict[str, torch.Tensor]:
    """The whole checkpoint as a flat ``{name: tensor}`` in memory (no memory map)."""
    with CheckpointReader(path, mmap=False) as reader:
        return {name: reader.get(name) for name in reader.keys()}
