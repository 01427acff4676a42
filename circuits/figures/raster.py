"""Small PNG files straight from arrays (no matplotlib figure): feature visualizations,
weight-slice heatmaps and NMF RGB pictures, as the neuron pages and the CLI need them.

Every writer is atomic (:func:`circuits._io.atomic_path`) and upscales by an integer
factor with nearest-neighbour sampling, so one weight is one crisp square.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import base64
import io

import numpy as np
from PIL import Image

from .._io import PathLike, atomic_path
from .palette import diverging_rgb, to_uint8

__all__ = ["save_png", "save_image_png", "save_heatmap_png", "save_rgb_png", "tile_images", "colorbar_rgb",
           "png_bytes", "png_data_uri"]


def _upscale(a: np.ndarray, scale: int) -> np.ndarray:
    if scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    if scale == 1:
        return a
    return np.repeat(np.repeat(a, scale, axis=0), scale, axis=1)


def _image(pixels: np.ndarray, scale: int, what: str) -> Image.Image:
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8:
        raise TypeError(f"{what} expects uint8 pixels, got {pixels.dtype}")
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[-1] not in (3, 4)):
        raise ValueError(f"pixels must be [H, W], [H, W, 3] or [H, W, 4]; got {tuple(pixels.shape)}")
    return Image.fromarray(np.ascontiguousarray(_upscale(pixels, scale)))


def png_bytes(pixels: np.ndarray, scale: int = 1) -> bytes:
    """``uint8`` pixels ``[H, W]`` or ``[H, W, 3]`` encoded as PNG bytes."""
    buf = io.BytesIO()
    _image(pixels, scale, "png_bytes").save(buf, format="PNG")
    return buf.getvalue()


def png_data_uri(pixels: np.ndarray, scale: int = 1) -> str:
    """``uint8`` pixels as a ``data:image/png;base64,...`` URI, to inline a small picture in HTML."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(pixels, scale)).decode("ascii")


def save_png(pixels: np.ndarray, path: PathLike, scale: int = 1) -> Path:
    """Write ``uint8`` pixels ``[H, W]`` or ``[H, W, 3]`` as a PNG (atomically)."""
    path = Path(path)
    img = _image(pixels, scale, "save_png")
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path


def save_image_png(image: object, path: PathLike, scale: int = 1) -> Path:
    """Write an image in ``[0, 1]`` (``[C, H, W]``, ``[H, W, C]`` or ``[H, W]``) as a PNG."""
    return save_png(to_uint8(image), path, scale)


def save_heatmap_png(weights: object, path: PathLike, limit: float | None = None, scale: int = 12) -> Path:
    """Write a 2-D weight slice ``[kh, kw]`` on the diverging palette with scale ``[-limit, limit]``."""
    w = np.asarray(weights.detach().cpu().numpy() if hasattr(weights, "detach") else weights, dtype=np.float64)
    if w.ndim == 1:
        w = w[None, :]
    if w.ndim != 2:
        raise ValueError(f"a heatmap needs a 2-D weight slice [kh, kw]; got shape {tuple(w.shape)}")
    return save_png(diverging_rgb(w, limit), path, scale)


def save_rgb_png(rgb: object, path: PathLike, scale: int = 12) -> Path:
    """Write an RGB picture ``[H, W, 3]`` in ``[0, 1]`` (e.g. NMF factors as R, G, B)."""
    return save_png(to_uint8(rgb), path, scale)


def tile_images(images: Sequence[object], pad: int = 1, pad_value: float = 1.0) -> np.ndarray:
    """Tile images (each ``[C, H, W]``/``[H, W, C]``/``[H, W]`` in ``[0, 1]``, same size) in one
    row: returns ``uint8`` ``[H, n*W + (n-1)*pad]`` (or ``[..., 3]`` when any image is RGB)."""
    if not len(images):
        raise ValueError("tile_images needs at least one image")
    arrs = [to_uint8(im) for im in images]
    rgb = any(a.ndim == 3 for a in arrs)
    if rgb:
        arrs = [a if a.ndim == 3 else np.repeat(a[..., None], 3, axis=-1) for a in arrs]
    h = arrs[0].shape[0]
    if any(a.shape[:2] != arrs[0].shape[:2] for a in arrs):
        raise ValueError(f"tile_images needs images of one size; got {[a.shape[:2] for a in arrs]}")
    gap_shape = (h, pad) + ((3,) if rgb else ())
    gap = np.full(gap_shape, int(pad_value * 255), dtype=np.uint8)
    parts: list[np.ndarray] = []
    for i, a in enumerate(arrs):
        if i and pad:
            parts.append(gap)
        parts.append(a)
    return np.concatenate(parts, axis=1)


def colorbar_rgb(width: int = 160, height: int = 10) -> np.ndarray:
    """A horizontal colour bar of the diverging palette, ``uint8`` ``[height, width, 3]``."""
    ramp = np.linspace(-1.0, 1.0, width)[None, :].repeat(height, axis=0)
    return diverging_rgb(ramp, 1.0)
