"""Figures and pages: weights in context.

- :mod:`.palette` — the diverging red/blue palette, symmetric scales, image conversion.
- :mod:`.smallmultiples` — matplotlib figures from plain arrays (small multiples, family
  grids, spatial-position grids, factor-ordered multiples, NMF RGB pictures, heatmaps); each
  returns a :class:`FigureResult` (figure + the arrays drawn).
- :mod:`.raster` — small PNGs straight from arrays (used by the pages and the CLI).
- :mod:`.sections` — the connection sections of a neuron page, computed from a model.
- :mod:`.neuron` — one-call figures of a neuron's connections (:func:`neuron_figure`, :func:`nmf_figures`)
  and a neuron's card (:func:`neuron_card` → :class:`NeuronCard`, shown as HTML in a notebook).
- :mod:`.pages` — static, self-contained HTML neuron pages (:func:`build_pages` = :func:`compute_pages`
  + :func:`write_pages`, with :class:`PageSettings`).
"""

from .palette import DIVERGING, diverging_rgb, symmetric_limit, to_hwc
from .raster import save_heatmap_png, save_image_png, save_rgb_png
from .smallmultiples import (
    FigureResult,
    factor_order,
    factor_ordered_multiples,
    family_grid,
    nmf_rgb_figure,
    rank_family_inputs,
    rank_inputs,
    save_figure,
    small_multiples,
    spatial_directions,
    spatial_position_grid,
    weight_heatmap,
)
from .neuron import FIGURE_KINDS, NeuronCard, neuron_card, neuron_figure, nmf_figures
from .pages import PageData, PageSettings, build_pages, compute_pages, write_pages
from .sections import NeuronConnections, connections_to, layer_sections


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
    "rank_family_inputs",
    "save_figure",
    "small_multiples",
    "spatial_directions",
    "spatial_position_grid",
    "weight_heatmap",
    "build_pages",
    "compute_pages",
    "write_pages",
    "PageData",
    "PageSettings",
    "NeuronConnections",
    "connections_to",
    "layer_sections",
    "neuron_figure",
    "nmf_figures",
    "NeuronCard",
    "neuron_card",
    "FIGURE_KINDS",
]
