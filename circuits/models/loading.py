"""Loading and saving weights: local ``.pth``/``.pt``, ``.safetensors``, or a URL with a sha256.

Every failure is a :class:`WeightsError` whose message says what is wrong and what to do.
Files are read by :mod:`circuits.models.checkpoint`, the one checkpoint reader (format
sniffing, unwrapping, pickle safety).
"""

from __future__ import annotations

import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
from torch import nn

from .._io import PathLike, atomic_path, sha256_file
from .checkpoint import CHECKPOINT_SUFFIXES, CheckpointFormatError, WeightsError, read_checkpoint

__all__ = [
    "WeightsError",
    "cache_dir",
    "fetch_url",
    "load_state_dict_file",
    "load_weights",
    "save_state_dict",
    "check_state_dict",
    "check_device",
    "DeviceError",
]


#: File name endings read as weights files (everything else given as ``--model`` is a model name).
WEIGHT_SUFFIXES = CHECKPOINT_SUFFIXES


class DeviceError(ValueError):
    """A device that does not exist here (no GPU, a GPU index out of range, a typo)."""


def check_device(device: Union[str, torch.device]) -> torch.device:
    """``device`` as a :class:`torch.device`, or a :class:`DeviceError` saying why it cannot be used here.

    Example:
        >>> check_device("cpu")
        device(type='cpu')
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU or driver was found"
            raise DeviceError(f"device {str(device)!r} is not available: {why}; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {str(device)!r} is not available: there are {torch.cuda.device_count()} CUDA "
                              f"device(s), cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise DeviceError(f"device {str(device)!r} is not available: no Apple MPS device here; use --device cpu")
    return dev


def cache_dir() -> Path:
    """Where downloads and caches live: ``$CIRCUITS_CACHE``, else ``$XDG_CACHE_HOME/circuits``
    (``~/.cache/circuits``)."""
    env = os.environ.get("CIRCUITS_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "circuits"


def _is_url(source: str) -> bool:
    return urllib.parse.urlparse(source).scheme in ("http", "https", "ftp", "file")


def fetch_url(url: str, sha256: Optional[str], cache: Optional[PathLike] = None) -> Path:
    """Download ``url`` into the cache (atomically) unless a verified copy is already there.

    ``sha256`` is required: a download whose digest differs is deleted and refused.
    """
    if not sha256:
        raise WeightsError(
            f"a sha256 is required to load weights from a URL ({url}); pass sha256=... "
            "(the CLI's --sha256) so that a corrupted or substituted file is never used"
        )
    sha256 = sha256.lower()
    folder = Path(cache) if cache is not None else cache_dir() / "weights"
    name = Path(urllib.parse.urlparse(url).path).name or "weights"
    target = folder / f"{sha256[:16]}-{name}"
    if target.is_file():
        if sha256_file(target) == sha256:
            return target
        target.unlink()  # a corrupted cache entry: fetch it again
    try:
        with atomic_path(target) as tmp:
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
                while block := response.read(1 << 20):
                    f.write(block)
            got = sha256_file(tmp)
            if got != sha256:
                raise WeightsError(f"checksum mismatch for {url}: expected sha256 {sha256}, got {got}; the file was discarded")
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        if isinstance(exc, WeightsError):
            raise
        raise WeightsError(
            f"could not download {url}: {exc}. There may be no network here; download the file "
            "elsewhere and pass its local path instead"
        ) from exc
    return target


def load_state_dict_file(source: Union[str, PathLike], sha256: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Read a flat state dict from a checkpoint (file, shard folder or index) or a URL.

    The file goes through :class:`~circuits.models.checkpoint.CheckpointReader` (the format
    is sniffed; wrapped and nested checkpoints are unwrapped; optimizer state and entries that
    are not tensors are skipped; unsafe pickles are refused). For a local file ``sha256`` is
    optional and checked when given. Every problem is a :class:`WeightsError`.
    """
    source = str(source)
    if _is_url(source):
        path = fetch_url(source, sha256)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise CheckpointFormatError(f"weights file not found: {path}")
        if sha256:
            if path.is_dir():
                raise WeightsError(f"--sha256 checks one file, but {path} is a folder; give the file's path")
            got = sha256_file(path)
            if got != sha256.lower():
                raise WeightsError(f"checksum mismatch for {path}: expected sha256 {sha256.lower()}, got {got}")
    return read_checkpoint(path)


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise :class:`WeightsError` naming every missing/unexpected key and every shape mismatch."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}" + (" ..." if len(unexpected) > 20 else ""))
    if shapes:
        problems.append("shape mismatches: " + "; ".join(shapes[:20]))
    if missing:
        prefixes = sorted({k[: -len(missing[0]) - 1] for k in state if k.endswith("." + missing[0])})
        if prefixes:  # e.g. {"model": ..., "ema": ...} flattened, or DataParallel's "module."
            problems.append(f"the checkpoint holds {missing[0]} under {', '.join(p + '.' for p in prefixes)}: pass "
                            "the weights under one prefix, e.g. {k.removeprefix('" + prefixes[0] + ".'): v for k, v in "
                            "state.items()}")
    if problems:
        raise WeightsError(f"{source} does not fit {type(model).__name__}: " + " | ".join(problems))


def load_weights(model: nn.Module, source: Union[str, PathLike, Mapping[str, torch.Tensor]], sha256: Optional[str] = None) -> nn.Module:
    """Load weights into ``model`` strictly (every key, every shape) and return it."""
    if isinstance(source, Mapping):
        state, name = dict(source), "state dict"
    else:
        state, name = load_state_dict_file(source, sha256), str(source)
    check_state_dict(model, state, name)
    model.load_state_dict(state, strict=True)
    return model


def save_state_dict(state: Mapping[str, torch.Tensor], path: PathLike) -> Path:
    """Write a state dict atomically, as safetensors when the name ends in ``.safetensors``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp))
        else:
            torch.save(dict(state), tmp)
    return path
