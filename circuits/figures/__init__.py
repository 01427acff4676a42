"""Figures and pages: weights in context.

- :mod:`.palette` — the diverging red/blue palette, symmetric scales, image conversion.
- :mod:`.smallmultiples` — matplotlib figures from plain arrays (small multiples, family
  grids, spatial-position grids, factor-ordered multiples, NMF RGB pictures, heatmaps); each
  returns a :class:`FigureResult` (figure + the arrays drawn).
- :mod:`.raster` — small PNGs straight from arrays (used by the pages and the CLI).
- :mod:`.pages` — static, self-contained HTML neuron pages (:func:`build_pages`).
"""

from .palette import DIVERGING, diverging_rgb, symmetric_limit, to_hwc
from .raster import save_heatmap_png, save_image_png, save_rgb_png
from .smallmultiples import (
    FigureResult,
    factor_order,
    factor_ordered_multiples,
    family_grid,
    nmf_rgb_figure,
    rank_inputs,
    save_figure,
    small_multiples,
    spatial_directions,
    spatial_position_grid,
    weight_heatmap,
)


def build_pages(*args, **kwargs):  # noqa: D401 - thin lazy wrapper, documented in .pages
    """Build static neuron pages; see :func:`circuits.figures.pages.build_pages`."""
    from .pages import build_pages as _build_pages

    return _build_pages(*args, **kwargs)


__all__ = [
    "DIVERGING",
    "diverging_rgb",
    "symmetric_limit",
    "to_hwc",
    "save_heatmap_png",
    "save_image_png",
    "save_rgb_png",
    "FigureResult",
    "factor_order",
    "factor_ordered_multiples",
    "family_grid",
    "nmf_rgb_figure",
    "rank_inputs",
    "save_figure",
    "small_multiples",
    "spatial_directions",
    "spatial_position_grid",
    "weight_heatmap",
    "build_pages",
]
