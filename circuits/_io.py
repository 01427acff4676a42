"""File utilities shared by every module that reads or writes disk: atomic writes, content
hashes, an output-folder check and YAML reading with one-line errors."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Union

if TYPE_CHECKING:
    import torch

PathLike = Union[str, os.PathLike]


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message is one line that says why."""


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``.

    A crash or exception leaves ``path`` as it was (absent or the previous version) and
    removes the temporary file, so readers never see a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; results should be readable like any file
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def state_dict_hash(module_or_state: Union["torch.nn.Module", dict]) -> str:
    """A short content hash of a model's parameters and buffers (names, shapes, dtypes, values).

    0-dim tensors (e.g. batch norm's ``num_batches_tracked``) and empty tensors hash too.
    """
    import torch

    state = module_or_state.state_dict() if isinstance(module_or_state, torch.nn.Module) else module_or_state
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def check_writable(out_dir: PathLike, what: str = "output folder", hint: str = "choose another with --out") -> Path:
    """Create ``out_dir`` if needed and prove a file can be written there.

    Raises ``PermissionError`` / ``NotADirectoryError`` with a message that names the folder
    (as ``what``) and says what to do (``hint``), before any expensive work starts and without
    leaving anything behind.
    """
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{what} {out} exists and is a file, not a folder; {hint}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except PermissionError:
        raise PermissionError(f"cannot write to {what} {out}: permission denied; {hint}") from None
    except OSError as exc:
        raise PermissionError(f"cannot write to {what} {out}: {exc.strerror or exc}; {hint}") from None
    return out


def read_yaml(path: PathLike, what: str = "config file") -> Any:
    """The YAML document in ``path``; :class:`ConfigError` (one line) for a missing file or bad YAML."""
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{what} not found: {p}")
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p} is not valid YAML: {str(exc).splitlines()[0]}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p} is not a text (UTF-8) file, so not a YAML {what}") from None
