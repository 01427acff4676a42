"""Disk cache of rendered images: the same request is never optimised twice.

One file per image, ``<root>/<model hash>/<k[:2]>/<k>.npz`` where ``k`` is the SHA-256 of the
full request (model weights' hash, objective, parameterization, transforms, steps, size,
seed, learning rate, ...) as canonical JSON. Each file holds the image ``[C, H, W]``
(float32 in ``[0, 1]``), the final objective value and the request itself, and is written
atomically (temporary file + rename). A file that cannot be read, or whose stored request
differs from the one asked for, is treated as missing; the next render replaces it.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .._io import PathLike, atomic_path
from ..models import cache_dir

__all__ = ["FeatureVisCache", "as_cache", "default_cache_dir"]


def default_cache_dir() -> Path:
    """``circuits.models.cache_dir() / "featurevis"``."""
    return cache_dir() / "featurevis"


def _canonical(request: dict) -> str:
    return json.dumps(request, sort_keys=True, separators=(",", ":"), default=str)


class FeatureVisCache:
    """A folder of rendered feature visualizations keyed by request.

    Example:
        >>> cache = FeatureVisCache("/tmp/fv")                      # doctest: +SKIP
        >>> render(model, ["mixed4a:1"], cache=cache)                # doctest: +SKIP
    """

    def __init__(self, root: Optional[PathLike] = None):
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        self.hits = 0
        self.misses = 0

    def __repr__(self) -> str:
        return f"FeatureVisCache({str(self.root)!r})"

    @staticmethod
    def key(request: dict) -> str:
        """SHA-256 of the canonical JSON of ``request``."""
        return hashlib.sha256(_canonical(request).encode()).hexdigest()

    @classmethod
    def relpath(cls, request: dict) -> str:
        """Where ``request``'s image lies relative to the cache folder: ``<model hash>/<k[:2]>/<k>.npz``."""
        k = cls.key(request)
        model = str(request.get("model", "model"))[:16] or "model"
        return f"{model}/{k[:2]}/{k}.npz"

    def path(self, request: dict) -> Path:
        """The file of ``request``'s image: ``root / relpath(request)``."""
        return self.root / self.relpath(request)

    def get(self, request: dict) -> Optional[tuple[np.ndarray, float]]:
        """``(image [C, H, W] float32, objective value)`` or ``None`` (missing or unreadable)."""
        path = self.path(request)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            with np.load(path, allow_pickle=False) as f:
                stored = str(f["request"])
                image = np.asarray(f["image"], dtype=np.float32)
                value = float(f["value"])
            if stored != _canonical(request) or image.ndim != 3 or not np.isfinite(image).all():
                raise ValueError("stored request or image does not match")
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            self.misses += 1
            try:
                path.unlink()  # corrupt or half-written: drop it; the render writes a new one
            except OSError:
                pass
            return None
        self.hits += 1
        return image, value

    def put(self, request: dict, image: np.ndarray, value: float) -> Path:
        """Store one image ``[C, H, W]`` atomically; returns its path."""
        path = self.path(request)
        buf = io.BytesIO()
        np.savez(buf, image=np.asarray(image, dtype=np.float32), value=np.float64(value),
                 request=np.array(_canonical(request)))
        with atomic_path(path) as tmp:
            tmp.write_bytes(buf.getvalue())
        return path

    def __contains__(self, request: dict) -> bool:
        return self.path(request).is_file()

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("*/*/*.npz")) if self.root.is_dir() else 0


def as_cache(cache: Union[None, bool, str, PathLike, FeatureVisCache]) -> Optional[FeatureVisCache]:
    """``None``/``False`` → no cache; ``True``/``"default"`` → the default folder; a path → that folder."""
    if cache is None or cache is False:
        return None
    if isinstance(cache, FeatureVisCache):
        return cache
    if cache is True or cache == "default":
        return FeatureVisCache()
    if isinstance(cache, (str, Path)) or hasattr(cache, "__fspath__"):
        return FeatureVisCache(cache)
    raise TypeError(f"cache must be None, True, a folder path or a FeatureVisCache; got {type(cache).__name__}")
