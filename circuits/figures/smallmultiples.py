"""Matplotlib figures that put weights in context (Distill, "Visualizing Weights").

Every function takes plain arrays (weights, feature-visualization images, NMF loadings —
NumPy or torch) and returns a :class:`FigureResult`: the :class:`matplotlib.figure.Figure`
and the arrays it draws, so tests and callers can check the numbers. No model is touched.

Shapes:

- one neuron's input weights: ``[in, kh, kw]`` (a dense layer's ``[in]`` is ``[in, 1, 1]``);
- a family's weights: ``[out, in, kh, kw]``;
- images: ``[N, C, H, W]`` or ``[N, H, W, C]`` (C in {1, 3}) or ``[N, H, W]`` in ``[0, 1]``,
  or a list of such single images; ``None`` entries leave a blank cell.

Weights are drawn on :data:`~circuits.figures.palette.DIVERGING` with one symmetric scale
per figure (``vmin = -m``, ``vmax = m``, ``m = max |w|`` over every cell drawn).
Figures are built without pyplot (no global state); :func:`save_figure` writes PNG, SVG or
PDF by the file's suffix, atomically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from matplotlib.figure import Figure

from .._io import PathLike, atomic_path
from .palette import DIVERGING, symmetric_limit, to_hwc

__all__ = [
    "FigureResult",
    "save_figure",
    "rank_inputs",
    "rank_family_inputs",
    "weight_heatmap",
    "small_multiples",
    "family_grid",
    "spatial_directions",
    "spatial_position_grid",
    "factor_order",
    "factor_ordered_multiples",
    "nmf_rgb_figure",
]

_FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
Images = Optional[Union[np.ndarray, Sequence[Optional[object]]]]


@dataclass
class FigureResult:
    """A figure and the arrays it shows (``data``: names → NumPy arrays / numbers).

    In a notebook it shows itself (``_repr_html_``): the figure as a PNG inlined at 72 dpi
    (lower when needed to stay under 200 KB of HTML, :mod:`circuits._display`) and the names
    and shapes of ``data``; non-finite values in ``data`` are flagged in red.
    """

    figure: Figure
    data: dict[str, Any] = field(default_factory=dict)

    def _title(self) -> str:
        w, h = self.figure.get_size_inches()
        return f"{w:.3g}x{h:.3g} in figure; data: {', '.join(list(self.data)[:8])}" + (" ..." if len(self.data) > 8 else "")

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # IPython's text/plain: one line, not every tensor
        p.text(f"{type(self).__name__}({self._title()})")

    def _repr_html_(self) -> str:
        from .. import _display as D

        described, n_nan, n_inf = [], 0, 0
        for name, value in list(self.data.items())[:24]:
            try:
                a = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value)
            except Exception:  # ragged lists, objects: described by type only
                described.append(f"{name}: {type(value).__name__}")
                continue
            if a.dtype.kind in "fc":
                bad = D.count_nonfinite(a)
                n_nan, n_inf = n_nan + bad[0], n_inf + bad[1]
            described.append(f"{name} {list(a.shape)}" if a.ndim else f"{name}")
        notes = ["data: " + ", ".join(described) + (" ..." if len(self.data) > 24 else "")] if described else []
        body = D.img_tag(D.figure_png(self.figure), alt="figure")
        return D.container("FigureResult", "", body, notes, D.nan_flag(n_nan, n_inf, "data"))

    def save(self, path: PathLike, dpi: int = 150) -> Path:
        """Write the figure (format from the suffix: .png, .svg, .pdf) atomically."""
        return save_figure(self, path, dpi=dpi)

    def __iter__(self):  # ``fig, data = result``, as the inspect plots have always allowed
        return iter((self.figure, self.data))


def save_figure(fig: Union[Figure, FigureResult], path: PathLike, dpi: int = 150) -> Path:
    """Save ``fig`` to ``path`` as PNG, SVG or PDF (chosen by suffix), atomically.

    Raises ``ValueError`` for any other suffix, before anything is written.
    """
    figure = fig.figure if isinstance(fig, FigureResult) else fig
    path = Path(path)
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot save a figure as {path.name!r}: use a .png, .svg or .pdf file name")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight")
    return path


# ----------------------------------------------------------------------------- inputs


def _np(x: object) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()  # type: ignore[union-attr]
    return np.asarray(x, dtype=np.float64)


def _neuron_weights(weights: object) -> np.ndarray:
    w = _np(weights)
    if w.ndim == 1:
        w = w[:, None, None]
    if w.ndim != 3:
        raise ValueError(
            f"a neuron's input weights must be [in, kh, kw] (or [in] for a dense layer); got shape {tuple(w.shape)}"
        )
    return w


def _family_weights(weights: object) -> np.ndarray:
    w = _np(weights)
    if w.ndim == 2:
        w = w[:, :, None, None]
    if w.ndim != 4:
        raise ValueError(f"family weights must be [out, in, kh, kw] (or [out, in]); got shape {tuple(w.shape)}")
    return w


def _image_list(images: Images, n: int, what: str) -> list[Optional[np.ndarray]]:
    if images is None:
        return [None] * n
    if isinstance(images, np.ndarray) or hasattr(images, "detach"):
        arr = _np(images)
        if arr.ndim not in (3, 4):
            raise ValueError(f"{what}: images must be [N, C, H, W], [N, H, W, C] or [N, H, W]; got {tuple(arr.shape)}")
        seq: Sequence[Optional[object]] = list(arr)
    else:
        seq = list(images)
    if len(seq) != n:
        raise ValueError(f"{what}: expected {n} images (one per cell), got {len(seq)}")
    return [None if im is None else to_hwc(im) for im in seq]


def _show_image(ax: Any, image: Optional[np.ndarray], alpha: float = 1.0) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)
    if image is None:
        return
    if alpha < 1.0:  # fade towards white
        image = image * alpha + (1.0 - alpha)
    if image.ndim == 2:
        ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(image, vmin=0.0, vmax=1.0, interpolation="nearest")


def _show_weights(ax: Any, w2d: np.ndarray, m: float) -> Any:
    ax.set_xticks([])
    ax.set_yticks([])
    return ax.imshow(w2d, cmap=DIVERGING, vmin=-m, vmax=m, interpolation="nearest")


def _colorbar(fig: Figure, mappable: Any, axes: Any = None, cax: Any = None) -> None:
    if cax is not None:
        cb = fig.colorbar(mappable, cax=cax)
    else:
        cb = fig.colorbar(mappable, ax=axes, shrink=0.6, pad=0.02)
    cb.set_label("weight", fontsize=7)
    cb.ax.tick_params(labelsize=6)


def _margins(fig: Figure, title: Optional[str]) -> dict[str, float]:
    """Grid margins that leave about half an inch for a title, whatever the figure's height."""
    h = fig.get_figheight()
    return {"top": 1.0 - (0.55 if title else 0.15) / h, "bottom": 0.1 / h}


def _grid_with_colorbar(fig: Figure, nrows: int, ncols: int, colorbar: bool, **kw: Any) -> tuple[Any, Any]:
    """A gridspec of ``nrows x ncols`` cells plus, when ``colorbar``, a thin last column for it."""
    if not colorbar:
        return fig.add_gridspec(nrows, ncols, **kw), None
    gs = fig.add_gridspec(nrows, ncols + 1, width_ratios=[1.0] * ncols + [0.12], **kw)
    mid = nrows // 2
    lo, hi = max(0, mid - max(1, nrows // 3)), min(nrows, mid + max(1, nrows // 3))
    return gs, fig.add_subplot(gs[lo:hi, ncols])


# ----------------------------------------------------------------------------- ranking


def rank_inputs(weights: object, top_n: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """Rank a neuron's input channels by the L2 norm of their weight slice.

    Args:
        weights: ``[in, kh, kw]`` (direct or expanded weights of one output neuron).
        top_n: keep the ``top_n`` largest (default: all).

    Returns:
        ``(order, norms)``: input-channel indices, largest L2 first (ties keep channel
        order), and the L2 norm of every input channel ``[in]``.
    """
    from ..expanded import top_inputs

    w = _neuron_weights(weights)
    if top_n is not None and top_n < 1:
        raise ValueError(f"top_n must be >= 1, got {top_n}")
    ranked = top_inputs(torch.from_numpy(w if w.flags.writeable else w.copy()), w.shape[0])
    order = ranked.indices.numpy()
    norms = np.empty(w.shape[0])
    norms[order] = ranked.norms.numpy()
    return (order if top_n is None else order[:top_n]), norms


def rank_family_inputs(weights: object, top_n: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """Rank input channels by the L2 norm of their weights to a whole family ``[out, in, kh, kw]``
    (over outputs and positions); returns ``(order, norms [in])`` as :func:`rank_inputs`."""
    w = _family_weights(weights)
    return rank_inputs(np.ascontiguousarray(w.transpose(1, 0, 2, 3)).reshape(w.shape[1], w.shape[0] * w.shape[2], w.shape[3]), top_n)


# ----------------------------------------------------------------------------- figures


def weight_heatmap(
    weights: object,
    *,
    colorbar: bool = True,
    titles: Optional[Sequence[str]] = None,
    cols: int = 8,
    cell_size: float = 1.2,
) -> FigureResult:
    """Heatmap(s) of weights on the diverging palette, one symmetric scale for the figure.

    Args:
        weights: ``[h, w]`` (one map, e.g. a dense matrix) or ``[n, kh, kw]`` (n maps in a grid).
        colorbar: add a colour bar.
        titles: one title per map.

    ``data``: ``weights`` (as drawn, ``[n, h, w]``), ``vmin``, ``vmax`` (``= -vmin``).
    """
    w = _np(weights)
    if w.ndim == 2:
        w = w[None]
    if w.ndim != 3:
        raise ValueError(f"weight_heatmap takes [h, w] or [n, kh, kw]; got shape {tuple(w.shape)}")
    n = w.shape[0]
    if titles is not None and len(titles) != n:
        raise ValueError(f"got {len(titles)} titles for {n} maps")
    m = symmetric_limit(w)
    ncols = min(cols, n)
    nrows = math.ceil(n / ncols)
    if n == 1:
        aspect = w.shape[2] / max(w.shape[1], 1)
        size = (max(3.0, min(10.0, 4.0 * aspect)) + (1.0 if colorbar else 0.0), max(2.5, min(10.0, 4.0 / max(aspect, 1e-6))))
    else:
        size = (ncols * cell_size + (1.0 if colorbar else 0.0), nrows * cell_size)
    fig = Figure(figsize=size)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    im = None
    for i, ax in enumerate(axes.flat):
        if i < n:
            im = _show_weights(ax, w[i], m)
            if titles is not None:
                ax.set_title(titles[i], fontsize=7)
        else:
            ax.axis("off")
    if colorbar and im is not None:
        _colorbar(fig, im, axes.ravel().tolist())
    return FigureResult(fig, {"weights": w, "vmin": -m, "vmax": m})


def _cells_figure(
    w: np.ndarray,
    order: np.ndarray,
    images: list[Optional[np.ndarray]],
    labels: list[str],
    cols: int,
    title: Optional[str],
    colorbar: bool,
    cell_size: float,
    group_of_cell: Optional[np.ndarray] = None,
) -> tuple[Figure, float]:
    n = len(order)
    slices = w[order]
    m = symmetric_limit(slices)
    ncols = max(1, min(cols, n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(ncols * cell_size + (0.8 if colorbar else 0.0), nrows * cell_size * 2.1 + (0.4 if title else 0.0)))
    gs, cax = _grid_with_colorbar(fig, nrows * 2, ncols, colorbar, hspace=0.15, wspace=0.1, **_margins(fig, title))
    im = None
    weight_axes = []
    for k in range(n):
        r, c = divmod(k, ncols)
        ax_img = fig.add_subplot(gs[2 * r, c])
        ax_w = fig.add_subplot(gs[2 * r + 1, c])
        _show_image(ax_img, images[k])
        label = labels[k]
        if group_of_cell is not None:
            label = f"F{int(group_of_cell[k])} · {label}"
        ax_img.set_title(label, fontsize=6, pad=2)
        im = _show_weights(ax_w, slices[k], m)
        weight_axes.append(ax_w)
    if title:
        fig.suptitle(title, fontsize=9, y=1.0 - 0.12 / fig.get_figheight(), va="top")
    if cax is not None and im is not None:
        _colorbar(fig, im, cax=cax)
    return fig, m


def small_multiples(
    weights: object,
    images: Images = None,
    *,
    top_n: int = 12,
    labels: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
    cols: int = 6,
    colorbar: bool = True,
    cell_size: float = 1.1,
) -> FigureResult:
    """One neuron's top-N input neurons, each a feature visualization above its weight slice.

    Args:
        weights: the neuron's input weights ``[in, kh, kw]`` (direct or expanded).
        images: feature visualizations of **all** ``in`` input neurons (indexed by input
            channel; ``None`` for a blank), or ``None``.
        top_n: how many inputs to show, ranked by L2 of their weight slice.
        labels: a name per input channel (default ``"in {c}"``).

    ``data``: ``order`` (input channels shown, largest L2 first), ``norms`` (L2 of every
    input ``[in]``), ``slices`` (``[n, kh, kw]``, ``slices[k] == weights[order[k]]``),
    ``vmin``, ``vmax``.
    """
    w = _neuron_weights(weights)
    order, norms = rank_inputs(w, min(top_n, w.shape[0]))
    all_images = _image_list(images, w.shape[0], "small_multiples")
    names = list(labels) if labels is not None else [f"in {c}" for c in range(w.shape[0])]
    if len(names) != w.shape[0]:
        raise ValueError(f"small_multiples: got {len(names)} labels for {w.shape[0]} input channels")
    fig, m = _cells_figure(
        w, order, [all_images[c] for c in order], [names[c] for c in order], cols, title, colorbar, cell_size
    )
    return FigureResult(fig, {"order": order, "norms": norms, "slices": w[order], "vmin": -m, "vmax": m})


def family_grid(
    weights: object,
    in_images: Images = None,
    out_images: Images = None,
    *,
    inputs: Optional[Sequence[int]] = None,
    outputs: Optional[Sequence[int]] = None,
    in_labels: Optional[Sequence[str]] = None,
    out_labels: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
    colorbar: bool = True,
    cell_size: float = 0.9,
) -> FigureResult:
    """Weights between two families of neurons (article figure 5).

    Rows are input neurons, columns output neurons; cell ``(i, j)`` is the weight slice
    ``W[outputs[j], inputs[i]]``. Headers are feature visualizations: output neurons'
    along the top, input neurons' down the left.

    Args:
        weights: ``[out, in, kh, kw]``.
        in_images / out_images: feature visualizations of the *selected* input / output
            neurons (``len(inputs)`` / ``len(outputs)`` of them), or ``None``.
        inputs / outputs: channel indices to show (default: all).

    ``data``: ``cells`` ``[n_in, n_out, kh, kw]`` with ``cells[i, j] = W[outputs[j], inputs[i]]``,
    ``inputs``, ``outputs``, ``vmin``, ``vmax``.
    """
    w = _family_weights(weights)
    n_out_all, n_in_all = w.shape[:2]
    ins = np.arange(n_in_all) if inputs is None else np.asarray(inputs, dtype=int)
    outs = np.arange(n_out_all) if outputs is None else np.asarray(outputs, dtype=int)
    if ins.size == 0 or outs.size == 0:
        raise ValueError("family_grid needs at least one input and one output neuron")
    if ins.min() < 0 or ins.max() >= n_in_all:
        raise ValueError(f"family_grid: input indices must be in 0..{n_in_all - 1}; got {ins.tolist()}")
    if outs.min() < 0 or outs.max() >= n_out_all:
        raise ValueError(f"family_grid: output indices must be in 0..{n_out_all - 1}; got {outs.tolist()}")
    cells = np.transpose(w[outs][:, ins], (1, 0, 2, 3))  # [n_in, n_out, kh, kw]
    m = symmetric_limit(cells)
    n_in, n_out = cells.shape[:2]
    row_imgs = _image_list(in_images, n_in, "family_grid in_images")
    col_imgs = _image_list(out_images, n_out, "family_grid out_images")
    has_row, has_col = in_images is not None, out_images is not None
    in_names = list(in_labels) if in_labels is not None else [f"in {c}" for c in ins]
    out_names = list(out_labels) if out_labels is not None else [f"out {c}" for c in outs]
    if len(in_names) != n_in or len(out_names) != n_out:
        raise ValueError("family_grid: one label per selected input/output neuron")
    R, C = n_in + 1, n_out + 1
    fig = Figure(figsize=(C * cell_size + (0.8 if colorbar else 0.0), R * cell_size + (0.4 if title else 0.0)))
    gs, cax = _grid_with_colorbar(fig, R, C, colorbar, hspace=0.08, wspace=0.08, **_margins(fig, title))
    im = None
    weight_axes = []
    for j in range(n_out):
        ax = fig.add_subplot(gs[0, j + 1])
        _show_image(ax, col_imgs[j] if has_col else None)
        ax.set_title(out_names[j], fontsize=6, pad=2)
    for i in range(n_in):
        ax = fig.add_subplot(gs[i + 1, 0])
        _show_image(ax, row_imgs[i] if has_row else None)
        ax.set_ylabel(in_names[i], fontsize=6, rotation=0, ha="right", va="center")
        for j in range(n_out):
            ax_w = fig.add_subplot(gs[i + 1, j + 1])
            im = _show_weights(ax_w, cells[i, j], m)
            weight_axes.append(ax_w)
    if title:
        fig.suptitle(title, fontsize=9, y=1.0 - 0.12 / fig.get_figheight(), va="top")
    if cax is not None and im is not None:
        _colorbar(fig, im, cax=cax)
    return FigureResult(fig, {"cells": cells, "inputs": ins, "outputs": outs, "vmin": -m, "vmax": m})


def spatial_directions(weights: object) -> tuple[np.ndarray, np.ndarray]:
    """The weight vector at each kernel position as a direction in the input layer.

    Args:
        weights: ``[in, kh, kw]``.

    Returns:
        ``(directions [kh*kw, in], norms [kh, kw])``: row ``dy*kw + dx`` is ``W[:, dy, dx]``;
        feature-visualize each row (a direction objective) to get the spatial-position grid's
        images.
    """
    w = _neuron_weights(weights)
    n_in, kh, kw = w.shape
    directions = w.reshape(n_in, kh * kw).T.copy()
    norms = np.sqrt((directions**2).sum(axis=1)).reshape(kh, kw)
    return directions, norms


def spatial_position_grid(
    weights: object,
    images: Images = None,
    *,
    title: Optional[str] = None,
    cell_size: float = 1.0,
    fade: bool = True,
) -> FigureResult:
    """Feature visualizations of ``W[:, dy, dx]`` tiled in the kernel's layout (article figure 6).

    Args:
        weights: ``[in, kh, kw]`` (one neuron's weights, direct or expanded).
        images: ``kh*kw`` images in row-major kernel order (row ``dy*kw + dx`` of
            :func:`spatial_directions`), or ``None`` to show only the fading.
        fade: blend each tile towards white with ``alpha = norm / max norm``.

    ``data``: ``directions`` ``[kh*kw, in]``, ``norms`` ``[kh, kw]``, ``alpha`` ``[kh, kw]``.
    """
    w = _neuron_weights(weights)
    _, kh, kw = w.shape
    directions, norms = spatial_directions(w)
    top = norms.max()
    alpha = norms / top if top > 0 else np.zeros_like(norms)
    imgs = _image_list(images, kh * kw, "spatial_position_grid")
    fig = Figure(figsize=(kw * cell_size, kh * cell_size + (0.4 if title else 0.0)))
    axes = fig.subplots(kh, kw, squeeze=False, gridspec_kw={"hspace": 0.05, "wspace": 0.05})
    for dy in range(kh):
        for dx in range(kw):
            ax = axes[dy, dx]
            img = imgs[dy * kw + dx]
            a = float(alpha[dy, dx]) if fade else 1.0
            if img is None:  # a grey square whose darkness is the norm
                img = np.full((8, 8), 1.0 - 0.6 * a)
                a = 1.0
            _show_image(ax, img, a)
            ax.set_title(f"{norms[dy, dx]:.2g}", fontsize=6, pad=1)
    if title:
        fig.suptitle(title, fontsize=9, y=1.0 - 0.12 / fig.get_figheight(), va="top")
    return FigureResult(fig, {"directions": directions, "norms": norms, "alpha": alpha})


def factor_order(
    weights: object,
    loadings: object,
    top_n: Optional[int] = None,
    spatial_maps: Optional[object] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Order input channels by NMF factor: group by dominant factor, then by weight within.

    Args:
        weights: the neuron's input weights ``[in, kh, kw]``.
        loadings: signed factor loadings ``[k, in]`` (``B[k, c] - B[k, in + c]``).
        top_n: first keep the ``top_n`` inputs by L2 of their weight slice (default: all).
        spatial_maps: the factors' spatial maps ``[k, kh, kw]`` (or ``[k, kh*kw]``); when
            given, a factor's weight on a channel is ``|loading| * ||map||``, else ``|loading|``.

    Returns:
        ``(order, factor)``: the input channels, factor 0's group first, within a group by
        signed loading on that factor, largest first (excitatory, then inhibitory); and the
        dominant factor of each channel in ``order``.
    """
    w = _neuron_weights(weights)
    L = _np(loadings)
    if L.ndim != 2 or L.shape[1] != w.shape[0]:
        raise ValueError(f"loadings must be [k, in] with in={w.shape[0]}; got shape {tuple(L.shape)}")
    strength = np.abs(L)
    if spatial_maps is not None:
        maps = _np(spatial_maps).reshape(L.shape[0], -1)
        strength = strength * np.sqrt((maps**2).sum(axis=1))[:, None]
    chosen, _ = rank_inputs(w, top_n)
    dominant = strength[:, chosen].argmax(axis=0)
    signed = L[dominant, chosen]
    idx = np.lexsort((-signed, dominant))  # primary: factor; secondary: loading (descending)
    return chosen[idx], dominant[idx]


def factor_ordered_multiples(
    weights: object,
    loadings: object,
    images: Images = None,
    *,
    top_n: int = 12,
    spatial_maps: Optional[object] = None,
    labels: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
    cols: int = 6,
    colorbar: bool = True,
    cell_size: float = 1.1,
) -> FigureResult:
    """Small multiples whose cells are ordered by NMF factor (article figures 7 and 10).

    The top-N inputs by L2 are grouped by their dominant factor (see :func:`factor_order`);
    each cell is titled ``F<k> · <label>``.

    ``data``: ``order``, ``factor`` (dominant factor per cell), ``slices`` ``[n, kh, kw]``,
    ``vmin``, ``vmax``.
    """
    w = _neuron_weights(weights)
    order, factor = factor_order(w, loadings, min(top_n, w.shape[0]), spatial_maps)
    all_images = _image_list(images, w.shape[0], "factor_ordered_multiples")
    names = list(labels) if labels is not None else [f"in {c}" for c in range(w.shape[0])]
    if len(names) != w.shape[0]:
        raise ValueError(f"factor_ordered_multiples: got {len(names)} labels for {w.shape[0]} input channels")
    fig, m = _cells_figure(
        w, order, [all_images[c] for c in order], [names[c] for c in order], cols, title, colorbar, cell_size, factor
    )
    return FigureResult(fig, {"order": order, "factor": factor, "slices": w[order], "vmin": -m, "vmax": m})


def nmf_rgb_figure(
    rgb: object,
    *,
    factor_images: Images = None,
    labels: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
    cell_size: float = 1.3,
) -> FigureResult:
    """NMF pictures: each neuron's three spatial factors drawn as R, G, B.

    Args:
        rgb: ``[kh, kw, 3]`` or ``[n, kh, kw, 3]`` in ``[0, 1]`` (from :mod:`circuits.nmf`).
        factor_images: for a single picture, the feature visualizations of the three
            factors' directions, shown beside it with a red/green/blue frame.
        labels: a title per picture.

    ``data``: ``rgb`` ``[n, kh, kw, 3]``.
    """
    a = _np(rgb)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"NMF RGB pictures are [kh, kw, 3] or [n, kh, kw, 3]; got shape {tuple(a.shape)}")
    a = np.clip(a, 0.0, 1.0)
    n = a.shape[0]
    if labels is not None and len(labels) != n:
        raise ValueError(f"got {len(labels)} labels for {n} pictures")
    extras = _image_list(factor_images, 3, "nmf_rgb_figure factor_images") if factor_images is not None else []
    if extras and n != 1:
        raise ValueError("factor_images go with a single RGB picture")
    ncols = n + len(extras) if extras else min(n, 8)
    nrows = 1 if extras else math.ceil(n / ncols)
    fig = Figure(figsize=(ncols * cell_size, nrows * cell_size + (0.4 if title else 0.0)))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    flat = list(axes.flat)
    for i, ax in enumerate(flat):
        if i < n:
            _show_image(ax, a[i])
            if labels is not None:
                ax.set_title(labels[i], fontsize=7)
        elif extras and i - n < len(extras):
            k = i - n
            _show_image(ax, extras[k])
            for s in ax.spines.values():
                s.set_visible(True)
                s.set_color(("red", "green", "blue")[k])
                s.set_linewidth(2)
            ax.set_title(f"factor {k}", fontsize=7)
        else:
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9, y=1.0 - 0.12 / fig.get_figheight(), va="top")
    return FigureResult(fig, {"rgb": a})
