"""Colour conventions shared by every figure and page.

Weights are drawn on a diverging red/blue palette that is symmetric around zero: positive
weights (excitation) are red, negative weights (inhibition) blue, zero is white. A figure
uses **one** scale for all of its cells: ``vmin = -m``, ``vmax = +m`` with ``m`` the largest
absolute weight anywhere in the figure, so colours are comparable across cells.

Everything here works on plain NumPy arrays; no model is involved.
"""

from __future__ import annotations

from typing import Iterable, Union

import numpy as np
from matplotlib.colors import LinearSegmentedColormap

__all__ = [
    "DIVERGING",
    "symmetric_limit",
    "diverging_rgb",
    "to_hwc",
    "to_uint8",
]

# Red for positive, blue for negative, white at zero (ColorBrewer RdBu, reversed).
_RDBU = [
    "#053061", "#2166ac", "#4393c3", "#92c5de", "#d1e5f0", "#f7f7f7",
    "#fddbc7", "#f4a582", "#d6604d", "#b2182b", "#67001f",
]
DIVERGING = LinearSegmentedColormap.from_list("circuits_diverging", _RDBU, N=256)
"""The diverging colormap (blue negative → white zero → red positive)."""

ArrayLike = Union[np.ndarray, "object"]


def _as_numpy(x: object) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()  # type: ignore[union-attr]
    return np.asarray(x, dtype=np.float64)


def symmetric_limit(arrays: Union[object, Iterable[object]]) -> float:
    """Largest absolute finite value over one array or several: the colour scale's ``m``.

    Returns ``1.0`` when every value is zero (or there are none), so that ``[-m, m]`` is a
    valid, non-empty range.
    """
    if hasattr(arrays, "shape") or isinstance(arrays, (int, float)):
        arrays = [arrays]
    m = 0.0
    for a in arrays:  # type: ignore[union-attr]
        a = _as_numpy(a)
        a = a[np.isfinite(a)]
        if a.size:
            m = max(m, float(np.abs(a).max()))
    return m if m > 0 else 1.0


def diverging_rgb(weights: object, limit: float | None = None) -> np.ndarray:
    """Map weights of any shape ``[...]`` to ``uint8`` RGB ``[..., 3]`` on :data:`DIVERGING`.

    ``limit`` is ``m`` of the symmetric scale ``[-m, m]`` (default: ``max |weights|``).
    Values beyond the scale are clipped.
    """
    w = _as_numpy(weights)
    m = symmetric_limit(w) if limit is None else float(limit)
    if not m > 0:
        raise ValueError(f"the colour scale limit must be > 0, got {limit!r}")
    t = np.clip((w / m + 1.0) / 2.0, 0.0, 1.0)
    t = np.nan_to_num(t, nan=0.5)
    rgba = DIVERGING(t)
    return (rgba[..., :3] * 255 + 0.5).astype(np.uint8)


def to_hwc(image: object) -> np.ndarray:
    """An image as ``[H, W]`` (grey) or ``[H, W, 3]`` float in ``[0, 1]``.

    Accepts ``[C, H, W]`` or ``[H, W, C]`` with ``C`` in {1, 3}, or ``[H, W]``
    (torch tensors too). Values are clipped to ``[0, 1]``.
    """
    a = _as_numpy(image)
    if a.ndim == 2:
        out = a
    elif a.ndim == 3:
        if a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
            a = np.moveaxis(a, 0, -1)
        elif a.shape[0] in (1, 3) and a.shape[-1] in (1, 3) and a.shape[0] != a.shape[-1]:
            # ambiguous only for 1x?x3 or 3x?x1; prefer channels-first (the torch convention)
            a = np.moveaxis(a, 0, -1)
        if a.shape[-1] == 1:
            out = a[..., 0]
        elif a.shape[-1] == 3:
            out = a
        else:
            raise ValueError(f"an image needs 1 or 3 channels; got shape {tuple(a.shape)}")
    else:
        raise ValueError(f"an image is [H, W], [C, H, W] or [H, W, C]; got shape {tuple(a.shape)}")
    return np.clip(np.nan_to_num(out, nan=0.0), 0.0, 1.0)


def to_uint8(image: object) -> np.ndarray:
    """:func:`to_hwc` scaled to ``uint8`` (``[H, W]`` or ``[H, W, 3]``)."""
    return (to_hwc(image) * 255 + 0.5).astype(np.uint8)
