"""Loading and saving weights: local ``.pth``/``.pt``, ``.safetensors``, or a URL with a sha256.

Every failure is a :class:`WeightsError` whose message says what is wrong and what to do.
``torch.load`` always runs with ``weights_only=True``: a checkpoint that needs arbitrary
unpickling is refused.
"""

from __future__ import annotations

import os
import pickle
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
from torch import nn

from .._io import PathLike, atomic_path, sha256_file

__all__ = [
    "WeightsError",
    "cache_dir",
    "fetch_url",
    "load_state_dict_file",
    "load_weights",
    "save_state_dict",
    "check_state_dict",
]


#: File name endings read as weights files (everything else given as ``--model`` is a model name).
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


class WeightsError(RuntimeError):
    """Weights could not be loaded; the message says why and what to do about it."""


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
    """Read a state dict from a local path (``.pth``, ``.pt``, ``.bin``, ``.safetensors``) or a URL.

    For a local file, ``sha256`` is optional and checked when given. Checkpoints that wrap
    the weights (``{"state_dict": ...}`` or ``{"model": ...}``) are unwrapped.
    """
    source = str(source)
    if _is_url(source):
        path = fetch_url(source, sha256)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise WeightsError(f"weights file not found: {path}")
        if path.is_dir():
            raise WeightsError(f"weights path is a folder, not a file: {path}")
        if sha256 and sha256_file(path) != sha256.lower():
            raise WeightsError(f"checksum mismatch for {path}: expected sha256 {sha256.lower()}, got {sha256_file(path)}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsError(f"{path} is not a valid safetensors file: {exc}") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise WeightsError(
                f"{path} needs arbitrary code to unpickle (it stores more than tensors), so it is "
                "refused for safety. If you trust it, re-save just its state dict: "
                "torch.save(torch.load(path, weights_only=False).state_dict(), 'clean.pth')"
            ) from exc
        raise WeightsError(f"{path} is not a readable PyTorch checkpoint: {exc}") from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise WeightsError(f"{path} is not a readable PyTorch checkpoint (corrupted or truncated?): {exc}") from exc
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{path}: entries that are not tensors: {', '.join(map(str, bad[:10]))}")
    return dict(obj)


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
