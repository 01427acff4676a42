"""Weight plots (matplotlib, Agg). Every function returns a :class:`Plot`: the Figure *and*
the arrays it draws, so numbers can be checked without reading pixels::

    fig, data = plot_histograms(model)
    data["conv2d0_pre_relu_conv.weight"]["counts"]       # the bars of that panel

Functions: :func:`plot_histograms` (small multiples), :func:`plot_heatmap` (dense matrix,
block-pooled when large), :func:`plot_conv_filters` (first-layer filters, RGB when 3 input
channels), :func:`plot_weight_norms` (bar chart), :func:`plot_neuron_embedding` (t-SNE, or
UMAP when ``umap-learn`` is installed), :func:`plot_activations` (per-channel activation
grid for one input image). The architecture graph lives in :mod:`circuits.inspect.graph`.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, NamedTuple, Optional, Sequence, Union

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import nn  # noqa: E402

from .stats import StatsTable, named_tensors, weight_stats  # noqa: E402

__all__ = [
    "Plot",
    "plot_histograms",
    "plot_heatmap",
    "block_pool",
    "plot_conv_filters",
    "normalize_filters",
    "plot_weight_norms",
    "plot_neuron_embedding",
    "plot_activations",
    "first_conv_weight",
]

Source = Union[nn.Module, Mapping[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]]


class Plot(NamedTuple):
    """A matplotlib Figure and the arrays drawn in it (``fig, data = plot_...(...)``)."""

    figure: Figure
    data: dict[str, Any]

    def save(self, path: str, dpi: int = 100) -> None:
        """Write the figure (format from the suffix, e.g. ``.png``) atomically, then close it."""
        from .._io import atomic_path

        with atomic_path(path) as tmp:
            self.figure.savefig(tmp, dpi=dpi, format=str(path).rsplit(".", 1)[-1], bbox_inches="tight")
        plt.close(self.figure)


def _items(source: Source, names: Optional[Sequence[str]] = None) -> list[tuple[str, torch.Tensor]]:
    if isinstance(source, (nn.Module, Mapping)):
        items = named_tensors(source)
    else:
        items = list(source)
    items = [(n, t) for n, t in items if t.is_floating_point()]
    if names is not None:
        lookup = dict(items)
        missing = [n for n in names if n not in lookup]
        if missing:
            raise KeyError(f"no tensor named {missing[0]!r}; available: {', '.join(list(lookup)[:10])} ...")
        items = [(n, lookup[n]) for n in names]
    return items


def _grid(n: int, ncols: Optional[int] = None) -> tuple[int, int]:
    ncols = ncols or max(1, math.ceil(math.sqrt(n)))
    return max(1, math.ceil(n / ncols)), ncols


def plot_histograms(source: Source, names: Optional[Sequence[str]] = None, bins: int = 50,
                    max_layers: int = 48, weights_only: bool = True, ncols: Optional[int] = None) -> Plot:
    """Histograms of each tensor's finite values as small multiples.

    ``data[name] = {"counts": [bins], "edges": [bins + 1]}`` (``torch.histc`` on the tensor's
    device). ``weights_only`` keeps tensors with >= 2 dimensions (conv/linear weights).
    """
    items = _items(source, names)
    if weights_only and names is None:
        items = [(n, t) for n, t in items if t.dim() >= 2] or items
    items = items[:max_layers]
    if not items:
        raise ValueError("no floating-point tensors to plot")
    rows, cols = _grid(len(items), ncols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 1.9 * rows), squeeze=False)
    data: dict[str, Any] = {}
    for ax, (name, t) in zip(axes.flat, items):
        x = t.detach().reshape(-1)
        x = x[torch.isfinite(x)].float()
        if x.numel():
            lo, hi = float(x.min()), float(x.max())
            if lo == hi:
                lo, hi = lo - 0.5, hi + 0.5
            counts = torch.histc(x, bins=bins, min=lo, max=hi).cpu().numpy()
        else:
            lo, hi, counts = 0.0, 1.0, np.zeros(bins)
        edges = np.linspace(lo, hi, bins + 1)
        data[name] = {"counts": counts, "edges": edges}
        ax.stairs(counts, edges, fill=True, color="#4a7ab8")
        ax.set_title(name if len(name) < 34 else "..." + name[-31:], fontsize=7)
        ax.tick_params(labelsize=6)
        ax.set_yticks([])
    for ax in list(axes.flat)[len(items):]:
        ax.axis("off")
    fig.tight_layout()
    return Plot(fig, data)


def block_pool(matrix: np.ndarray, max_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Mean-pool a 2-D array in ``fy x fx`` blocks so that each side is at most ``max_size``.

    Returns ``(pooled, (fy, fx))``; edge blocks average only the cells that exist.
    """
    h, w = matrix.shape
    fy, fx = max(1, math.ceil(h / max_size)), max(1, math.ceil(w / max_size))
    if fy == fx == 1:
        return matrix.astype(np.float64, copy=True), (1, 1)
    ph, pw = math.ceil(h / fy) * fy, math.ceil(w / fx) * fx
    padded = np.full((ph, pw), np.nan)
    padded[:h, :w] = matrix
    blocks = padded.reshape(ph // fy, fy, pw // fx, fx)
    with np.errstate(invalid="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(blocks, axis=(1, 3)), (fy, fx)


def plot_heatmap(weight: torch.Tensor, name: str = "weight", max_size: int = 256, cmap: str = "RdBu_r") -> Plot:
    """Heatmap of a dense matrix on a diverging palette centred at 0.

    ``weight``: ``[out, in]`` or conv ``[out, in, kh, kw]`` (shown as ``[out, in*kh*kw]``).
    Matrices larger than ``max_size`` on a side are block-mean-pooled; the factor is in the title.
    ``data = {"matrix": pooled [h, w], "factor": (fy, fx)}``.
    """
    if weight.dim() < 2:
        raise ValueError(f"a heatmap needs a tensor with >= 2 dimensions; {name} has shape {tuple(weight.shape)}")
    mat = weight.detach().reshape(weight.shape[0], -1).float().cpu().numpy()
    pooled, (fy, fx) = block_pool(mat, max_size)
    finite = pooled[np.isfinite(pooled)]
    vmax = float(np.abs(finite).max()) if finite.size else 1.0
    vmax = vmax or 1.0
    fig, ax = plt.subplots(figsize=(6, 6 * min(2.0, max(0.2, pooled.shape[0] / pooled.shape[1]))))
    im = ax.imshow(pooled, cmap=cmap, vmin=-vmax, vmax=vmax, aspect="auto", interpolation="nearest")
    title = f"{name} {tuple(weight.shape)}"
    if (fy, fx) != (1, 1):
        title += f"\nblock-mean pooled {fy}x{fx}"
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("input" + (" x kh x kw" if weight.dim() > 2 else ""))
    ax.set_ylabel("output unit")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return Plot(fig, {"matrix": pooled, "factor": (fy, fx)})


def normalize_filters(weight: torch.Tensor, mode: str = "per_filter") -> np.ndarray:
    """Conv weights ``[out, in, kh, kw]`` → images ``[out, kh, kw, C]`` in ``[0, 1]``.

    ``C`` is 3 (RGB) when ``in == 3``, else 1 (the mean over input channels). ``mode``:
    ``"per_filter"`` (each filter's own min..max → 0..1) or ``"shared"`` (one symmetric scale
    ``|w|.max()`` for all, 0 → 0.5, so filters are comparable).
    """
    if weight.dim() != 4:
        raise ValueError(f"conv filters must be [out, in, kh, kw]; got shape {tuple(weight.shape)}")
    w = weight.detach().float().cpu()
    if w.shape[1] != 3:
        w = w.mean(dim=1, keepdim=True)
    img = w.permute(0, 2, 3, 1).numpy().astype(np.float64)  # [out, kh, kw, C]
    img = np.nan_to_num(img)
    if mode == "per_filter":
        lo = img.min(axis=(1, 2, 3), keepdims=True)
        hi = img.max(axis=(1, 2, 3), keepdims=True)
        span = np.where(hi - lo > 0, hi - lo, 1.0)
        out = (img - lo) / span
    elif mode == "shared":
        m = np.abs(img).max() or 1.0
        out = img / (2 * m) + 0.5
    else:
        raise ValueError(f"mode must be 'per_filter' or 'shared'; got {mode!r}")
    return np.clip(out, 0.0, 1.0)


def first_conv_weight(source: Source) -> tuple[str, torch.Tensor]:
    """The first 4-D tensor (a conv weight ``[out, in, kh, kw]``) in the source's order."""
    for name, t in _items(source):
        if t.dim() == 4:
            return name, t
    raise ValueError("no conv weight (4-D tensor) found")


def plot_conv_filters(weight: torch.Tensor, name: str = "conv", mode: str = "per_filter",
                      ncols: Optional[int] = None, max_filters: int = 256) -> Plot:
    """Grid of conv filters ``[out, in, kh, kw]`` (RGB when ``in == 3``, grey otherwise).

    ``data = {"images": [n, kh, kw, C] in [0, 1], "mode": mode}``.
    """
    images = normalize_filters(weight, mode)[:max_filters]
    n = images.shape[0]
    rows, cols = _grid(n, ncols)
    fig, axes = plt.subplots(rows, cols, figsize=(0.8 * cols + 0.5, 0.8 * rows + 0.6), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i < n:
            im = images[i]
            ax.imshow(im if im.shape[-1] == 3 else im[..., 0], cmap=None if im.shape[-1] == 3 else "gray",
                      vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(str(i), fontsize=6, pad=1)
        else:
            ax.axis("off")
    fig.suptitle(f"{name} {tuple(weight.shape)} ({mode.replace('_', '-')} normalisation)", fontsize=9)
    return Plot(fig, {"images": images, "mode": mode})


def plot_weight_norms(source: Union[Source, StatsTable], norm: str = "fro", weights_only: bool = True) -> Plot:
    """Bar chart of a norm per layer (``"fro"`` or ``"spectral"``) in the source's order.

    ``data = {"names": [...], "values": array}``. Accepts a ready :class:`StatsTable`.
    """
    if norm not in ("fro", "spectral"):
        raise ValueError(f"norm must be 'fro' or 'spectral'; got {norm!r}")
    table = source if isinstance(source, StatsTable) else weight_stats(
        source if isinstance(source, (nn.Module, Mapping)) else dict(source),
        spectral="auto" if norm == "spectral" else "none")
    rows = [r for r in table if (len(r.shape) >= 2 or not weights_only)]
    if not rows:
        rows = list(table)
    names = [r.name for r in rows]
    values = np.array([r.fro_norm if norm == "fro" else r.spectral_norm for r in rows], dtype=np.float64)
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(names)), 4))
    ax.bar(range(len(names)), values, color="#4a7ab8")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_ylabel("Frobenius norm" if norm == "fro" else "spectral norm")
    ax.set_title(f"{'Frobenius' if norm == 'fro' else 'spectral'} norm per layer", fontsize=9)
    fig.tight_layout()
    return Plot(fig, {"names": names, "values": values})


def plot_neuron_embedding(weight: torch.Tensor, name: str = "layer", method: str = "auto", seed: int = 0,
                          perplexity: float = 30.0, color: Optional[np.ndarray] = None) -> Plot:
    """2-D embedding of a layer's output units by their weight vectors (rows of ``[out, -1]``).

    ``method``: ``"tsne"`` (scikit-learn), ``"umap"`` (needs ``umap-learn``) or ``"auto"``
    (UMAP when installed, else t-SNE). Points are coloured by ``color`` (default: each unit's
    weight norm). ``data = {"embedding": [out, 2], "color": [out], "method": str}``.
    """
    if weight.dim() < 2:
        raise ValueError(f"need a weight with >= 2 dimensions; got shape {tuple(weight.shape)}")
    x = np.nan_to_num(weight.detach().reshape(weight.shape[0], -1).double().cpu().numpy())
    n = x.shape[0]
    if n < 3:
        raise ValueError(f"{name} has {n} units; an embedding needs at least 3")
    if method == "auto":
        try:
            import umap  # noqa: F401

            method = "umap"
        except ImportError:
            method = "tsne"
    if method == "umap":
        try:
            import umap
        except ImportError as exc:
            raise ImportError("method='umap' needs umap-learn (pip install umap-learn); or use method='tsne'") from exc
        emb = umap.UMAP(n_components=2, random_state=seed, n_neighbors=min(15, n - 1)).fit_transform(x)
    elif method == "tsne":
        from sklearn.manifold import TSNE
        from threadpoolctl import threadpool_limits

        # a layer has at most a few thousand units: one thread is fastest, and avoids OpenMP
        # thrashing (100x slowdowns) on a busy machine
        with threadpool_limits(limits=1 if n <= 5000 else None):
            emb = TSNE(n_components=2, perplexity=min(perplexity, (n - 1) / 3), random_state=seed,
                       init="pca").fit_transform(x)
    else:
        raise ValueError(f"method must be 'auto', 'tsne' or 'umap'; got {method!r}")
    c = np.linalg.norm(x, axis=1) if color is None else np.asarray(color)
    fig, ax = plt.subplots(figsize=(5, 5))
    sc = ax.scatter(emb[:, 0], emb[:, 1], c=c, cmap="viridis", s=14)
    if n <= 80:
        for i, (px, py) in enumerate(emb):
            ax.annotate(str(i), (px, py), fontsize=5)
    fig.colorbar(sc, ax=ax, fraction=0.046, label="unit weight norm" if color is None else "")
    ax.set_title(f"{method.upper()} of {name}'s {n} units by weight vector", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    return Plot(fig, {"embedding": np.asarray(emb), "color": c, "method": method})


def plot_activations(model: nn.Module, layer: str, image: torch.Tensor, max_channels: int = 64,
                     ncols: Optional[int] = None) -> Plot:
    """Per-channel activation heatmaps of ``layer`` for one image with pixels in ``[0, 1]``.

    ``image``: ``[C, H, W]`` or ``[1, C, H, W]``; it goes through
    :func:`circuits.models.preprocess_input`. ``data = {"activations": [channels, h, w]}``
    (all channels, even when only ``max_channels`` are drawn).
    """
    from ..layers import capture
    from ..models import preprocess_input

    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"image must be [C, H, W] or [1, C, H, W]; got shape {tuple(image.shape)}")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with torch.no_grad(), capture(model, [layer], detach=True) as acts:
        model(preprocess_input(model, image.to(device)))
    a = acts[layer][0].float().cpu()
    if a.dim() == 1:
        a = a[:, None, None]
    elif a.dim() != 3:
        raise ValueError(f"layer {layer!r} output has shape {tuple(acts[layer].shape)}; expected [1, C, H, W]")
    arr = a.numpy()
    n = min(max_channels, arr.shape[0])
    rows, cols = _grid(n, ncols)
    vmax = float(np.abs(arr[:n]).max()) or 1.0
    fig, axes = plt.subplots(rows, cols, figsize=(1.0 * cols + 0.5, 1.0 * rows + 0.6), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i < n:
            ax.imshow(arr[i], cmap="magma", vmin=min(0.0, float(arr[:n].min())), vmax=vmax, interpolation="nearest")
            ax.set_title(str(i), fontsize=6, pad=1)
        else:
            ax.axis("off")
    fig.suptitle(f"{layer} activations {tuple(arr.shape)} (first {n} channels, shared scale)", fontsize=9)
    return Plot(fig, {"activations": arr})
