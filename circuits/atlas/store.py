"""Where an atlas keeps its results: a local folder or an fsspec URL, written atomically.

One store holds both kinds of results, side by side::

    <root>/<model hash>/<k[:2]>/<k>.npz              feature visualizations (the featurevis cache layout)
    <root>/atlas-tasks/<kind>/<k[:2]>/<k>.npz        per-task results (weights/NMF tables, dataset examples)

A local folder is used directly (the featurevis cache reads and writes it; every file is
written to a temporary name and renamed). Any other location is an fsspec URL
(``s3://bucket/atlas``, ``gs://...``, ``file:///shared/atlas``): files are written to a
temporary name next to the final one and moved into place (a single PUT on object stores,
where an object is never visible half-written). A Ray cluster's workers all write to the
same store; the driver reads from it.
"""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path
from typing import Optional, Union
from urllib.parse import urlparse

from .._io import PathLike, atomic_write_bytes, check_writable

__all__ = ["ResultStore", "is_url", "StoreNotWritableError", "is_write_refusal"]

#: What to do about a store that cannot be written.
STORE_HINT = "choose another store with --cache (cache= in Python) or make this one writable (permissions, mount, space)"

#: errno values that mean "this location refuses writes" (not a passing failure: a rerun fails the same way).
_REFUSALS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


class StoreNotWritableError(PermissionError):
    """The result store refuses writes (read-only, permissions, full): running again will not help
    until the store is changed. Exit status 2 on the command line."""


def is_write_refusal(exc: BaseException) -> bool:
    """Whether ``exc`` says a location refuses writes (permission, read-only file system, no space)."""
    return isinstance(exc, PermissionError) or (isinstance(exc, OSError) and exc.errno in _REFUSALS)


def is_url(location: Union[str, PathLike]) -> bool:
    """``True`` for ``scheme://...`` locations (fsspec); ``False`` for local paths (Windows drives too)."""
    text = os.fspath(location)
    scheme = urlparse(text).scheme
    return "://" in text and len(scheme) > 1


class ResultStore:
    """Read and write result files by relative path (``"ab/abcd.npz"``) under a root.

    Args:
        location: a local folder (created when needed) or an fsspec URL. ``file://`` URLs go
            through fsspec too, which is how the remote code path is tested without a cloud.
        storage_options: passed to ``fsspec.core.url_to_fs`` for URLs (credentials, endpoint).
    """

    def __init__(self, location: Union[str, PathLike], storage_options: Optional[dict] = None):
        if isinstance(location, ResultStore):
            location = location.location
        text = os.fspath(location)
        if not text:
            raise ValueError("the result store location is empty; give a folder or an fsspec URL")
        self.storage_options = dict(storage_options or {})
        if is_url(text):
            try:
                import fsspec  # noqa: F401
            except ImportError:  # pragma: no cover - fsspec ships with the test environment
                raise ImportError(f"the store {text!r} is a URL; install fsspec (pip install fsspec) to use it") from None
            from fsspec.core import url_to_fs

            self.fs, self._root = url_to_fs(text, **self.storage_options)
            self._root = self._root.rstrip("/")
            self.location = text.rstrip("/")
            self.local_root: Optional[Path] = None
        else:
            self.fs = None
            self.local_root = Path(text).expanduser().resolve()
            self._root = str(self.local_root)
            self.location = str(self.local_root)

    def __repr__(self) -> str:
        return f"ResultStore({self.location!r})"

    def __reduce__(self):  # picklable for Ray: rebuilt from its location on the worker
        return (ResultStore, (self.location, self.storage_options))

    @property
    def is_local(self) -> bool:
        """Whether the store is a plain local folder (``local_root`` is set)."""
        return self.local_root is not None

    def check_writable(self) -> None:
        """Prove a file can be written to the store (and removed), before any work starts.

        Raises :class:`StoreNotWritableError` naming the store, the reason and what to do.
        """
        what = "the atlas result store"
        if self.fs is None:
            try:
                check_writable(self.local_root, what=what, hint=STORE_HINT)  # type: ignore[arg-type]
            except PermissionError as exc:
                raise StoreNotWritableError(str(exc)) from None
            return
        probe = f"{self._root}/.write-test-{uuid.uuid4().hex[:8]}"
        try:
            try:
                self.fs.makedirs(self._root, exist_ok=True)
            except (OSError, NotImplementedError):  # object stores have no folders
                pass
            with self.fs.open(probe, "wb") as f:
                f.write(b"")
            self.fs.rm(probe)
        except (OSError, NotImplementedError) as exc:
            reason = "permission denied" if isinstance(exc, PermissionError) else (
                getattr(exc, "strerror", None) or f"{type(exc).__name__}: {exc}".strip().splitlines()[0])
            raise StoreNotWritableError(f"cannot write to {what} {self.location}: {reason}; {STORE_HINT}") from None

    def _full(self, rel: str) -> str:
        rel = rel.lstrip("/")
        if self.local_root is not None:
            return str(self.local_root / rel)
        return f"{self._root}/{rel}"

    def exists(self, rel: str) -> bool:
        """Whether the file ``rel`` is in the store."""
        if self.fs is None:
            return os.path.isfile(self._full(rel))
        return bool(self.fs.exists(self._full(rel)))

    def existing(self, rels: list[str]) -> set[str]:
        """The subset of ``rels`` present in the store (one listing per folder on URLs)."""
        if self.fs is None:
            return {r for r in rels if os.path.isfile(self._full(r))}
        found: set[str] = set()
        by_dir: dict[str, list[str]] = {}
        for r in rels:
            by_dir.setdefault(r.rsplit("/", 1)[0] if "/" in r else "", []).append(r)
        for d, items in by_dir.items():
            try:
                names = {p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._full(d), detail=False)}
            except (FileNotFoundError, OSError):
                continue
            found.update(r for r in items if r.rsplit("/", 1)[-1] in names)
        return found

    def read_bytes(self, rel: str) -> bytes:
        """The bytes of ``rel``; ``FileNotFoundError`` when it is missing."""
        if self.fs is None:
            return Path(self._full(rel)).read_bytes()
        with self.fs.open(self._full(rel), "rb") as f:
            return f.read()

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``rel`` atomically: readers see the old file, or none, or all of the new one."""
        if self.fs is None:
            atomic_write_bytes(self._full(rel), data)
            return
        full = self._full(rel)
        parent = full.rsplit("/", 1)[0]
        tmp = f"{parent}/.{full.rsplit('/', 1)[-1]}.{uuid.uuid4().hex}.tmp"
        try:
            self.fs.makedirs(parent, exist_ok=True)
        except (OSError, NotImplementedError):  # object stores have no folders
            pass
        try:
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
            self.fs.mv(tmp, full)
        finally:
            try:
                if self.fs.exists(tmp):
                    self.fs.rm(tmp)
            except OSError:  # pragma: no cover - best effort clean-up
                pass

    def upload_file(self, local: PathLike, rel: str) -> None:
        """Copy a local file into the store at ``rel`` (atomically)."""
        self.write_bytes(rel, Path(local).read_bytes())

    def download(self, rel: str, local: PathLike) -> None:
        """Copy ``rel`` to the local path ``local`` (atomically)."""
        atomic_write_bytes(local, self.read_bytes(rel))
