"""Weight plots (matplotlib, Agg). Every function returns a
:class:`circuits.figures.FigureResult`: the Figure *and* the arrays it draws, so numbers can
be checked without reading pixels (``Plot`` is its deprecated old name)::

    fig, data = plot_histograms(model)
    data["conv2d0_pre_relu_conv.weight"]["counts"]       # the bars of that panel

Functions: :func:`plot_histograms` (small multiples), :func:`plot_heatmap` (dense matrix,
block-pooled when large), :func:`plot_conv_filters` (first-layer filters, RGB when 3 input
channels), :func:`plot_weight_norms` (bar chart), :func:`plot_neuron_embedding` (t-SNE, or
UMAP when ``umap-learn`` is installed; at most ``max_units`` units, reduced by PCA first),
:func:`plot_activations` (per-channel activation grid for one input image),
:func:`plot_spectra` (each layer's eigenvalue density with its power-law fit) and
:func:`plot_alphas` (the fitted ``alpha`` per layer against the 2 and 6 thresholds). The
architecture graph lives in :mod:`circuits.inspect.graph`.

Large tensors: :func:`histogram` and :func:`pool_matrix` work through a tensor in blocks of
rows, so a plot of a multi-gigabyte matrix needs memory for one block, not a copy.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import nn  # noqa: E402

from ..figures.smallmultiples import FigureResult  # noqa: E402
from .stats import StatsTable, named_tensors, weight_stats  # noqa: E402

__all__ = [
    "histogram",
    "pool_matrix",
    "plot_histogram_data",
    "plot_spectra",
    "plot_alphas",
    "embedding_input",
    "plot_histograms",
    "plot_heatmap",
    "plot_pooled_heatmap",
    "block_pool",
    "plot_conv_filters",
    "normalize_filters",
    "plot_weight_norms",
    "plot_neuron_embedding",
    "plot_activations",
    "first_conv_weight",
]

Source = Union[nn.Module, Mapping[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]]


def __getattr__(name: str) -> Any:
    if name == "Plot":
        import warnings

        warnings.warn("circuits.inspect.plots.Plot is deprecated: the plots return circuits.figures.FigureResult",
                      DeprecationWarning, stacklevel=2)
        return FigureResult
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def _row_blocks(t: torch.Tensor, block_elems: int) -> Iterable[torch.Tensor]:
    """A tensor as ``[rows, cols]`` blocks of at most about ``block_elems`` values (views)."""
    mat = t.detach().reshape(t.shape[0], -1) if t.dim() >= 2 else t.detach().reshape(-1, 1)
    per = max(1, block_elems // max(1, mat.shape[1]))
    for i in range(0, mat.shape[0], per):
        yield mat[i:i + per]


def histogram(t: torch.Tensor, bins: int = 50, block_elems: int = 1 << 22) -> dict[str, Any]:
    """Histogram of every finite value of ``t``, computed block by block.

    Returns ``{"counts": [bins], "edges": [bins + 1], "n": finite values counted, "n_nonfinite"}``;
    a constant tensor gets the range ``value ± 0.5``.
    """
    lo, hi, n_bad = math.inf, -math.inf, 0
    for blk in _row_blocks(t, block_elems):
        x = blk.reshape(-1)
        fin = torch.isfinite(x)
        if not bool(fin.all()):
            n_bad += int((~fin).sum())
            x = x[fin]
        if x.numel():
            a, b = torch.aminmax(x)
            lo, hi = min(lo, float(a)), max(hi, float(b))
    if not math.isfinite(lo):
        return {"counts": np.zeros(bins), "edges": np.linspace(0.0, 1.0, bins + 1), "n": 0, "n_nonfinite": n_bad}
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    counts = torch.zeros(bins, dtype=torch.float64)
    for blk in _row_blocks(t, block_elems):
        x = blk.reshape(-1)
        x = x[torch.isfinite(x)].float()
        if x.numel():
            counts += torch.histc(x, bins=bins, min=lo, max=hi).double().cpu()
    return {"counts": counts.numpy(), "edges": np.linspace(lo, hi, bins + 1), "n": int(counts.sum()),
            "n_nonfinite": n_bad}


def plot_histograms(source: Source, names: Optional[Sequence[str]] = None, bins: int = 50,
                    max_layers: int = 48, weights_only: bool = True, ncols: Optional[int] = None) -> FigureResult:
    """Histograms of each tensor's finite values as small multiples.

    ``data[name] = {"counts": [bins], "edges": [bins + 1], ...}`` (:func:`histogram`).
    ``weights_only`` keeps tensors with >= 2 dimensions (conv/linear weights). With more than
    ``max_layers`` tensors, ``max_layers`` evenly spaced ones are drawn (``data`` has only those).
    """
    items = _items(source, names)
    if weights_only and names is None:
        items = [(n, t) for n, t in items if t.dim() >= 2] or items
    items = [items[i] for i in spread(len(items), max_layers)]
    if not items:
        raise ValueError("no floating-point tensors to plot")
    return plot_histogram_data({name: histogram(t, bins) for name, t in items}, ncols)


def spread(n: int, k: int) -> list[int]:
    """``min(n, k)`` evenly spaced indices of ``range(n)`` (first and last included)."""
    if n <= k:
        return list(range(n))
    if k <= 1:
        return [0][:k]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def plot_histogram_data(data: Mapping[str, Mapping[str, Any]], ncols: Optional[int] = None,
                        title: Optional[str] = None) -> FigureResult:
    """Small multiples of ready histograms ``{name: {"counts", "edges"}}`` (from :func:`histogram`)."""
    if not data:
        raise ValueError("no histograms to plot")
    rows, cols = _grid(len(data), ncols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 1.9 * rows + (0.3 if title else 0)), squeeze=False)
    for ax, (name, h) in zip(axes.flat, data.items()):
        ax.stairs(h["counts"], h["edges"], fill=True, color="#4a7ab8")
        ax.set_title(name if len(name) < 34 else "..." + name[-31:], fontsize=7)
        ax.tick_params(labelsize=6)
        ax.set_yticks([])
    for ax in list(axes.flat)[len(data):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return FigureResult(fig, dict(data))


def block_pool(matrix: np.ndarray, max_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Mean-pool a 2-D array in ``fy x fx`` blocks so that each side is at most ``max_size``.

    Returns ``(pooled, (fy, fx))``; edge blocks average only the cells that exist (and only
    their finite values). The NumPy face of :func:`pool_matrix`.
    """
    return pool_matrix(torch.from_numpy(np.asarray(matrix, dtype=np.float64)), max_size)


def pool_matrix(weight: torch.Tensor, max_size: int, block_elems: int = 1 << 22) -> tuple[np.ndarray, tuple[int, int]]:
    """:func:`block_pool` of ``weight`` viewed as ``[out, -1]``, block of rows by block of rows.

    NaN/Inf values are left out of each cell's mean (a cell with none finite is NaN). Needs
    memory for one block of rows, not a float64 copy of the matrix.
    """
    mat = weight.detach().reshape(weight.shape[0], -1)
    h, w = mat.shape
    fy, fx = max(1, math.ceil(h / max_size)), max(1, math.ceil(w / max_size))
    ph, pw = math.ceil(h / fy), math.ceil(w / fx)
    sums = torch.zeros(ph, pw, dtype=torch.float64)
    counts = torch.zeros(ph, pw, dtype=torch.float64)
    rows_per = max(fy, (block_elems // max(1, w)) // fy * fy)
    pad_w = pw * fx - w
    for r0 in range(0, h, rows_per):
        blk = mat[r0:r0 + rows_per].to(torch.float64)
        fin = torch.isfinite(blk)
        vals = torch.where(fin, blk, torch.zeros((), dtype=torch.float64))
        n = blk.shape[0]
        pad_h = math.ceil(n / fy) * fy - n
        vals = torch.nn.functional.pad(vals, (0, pad_w, 0, pad_h))
        cnt = torch.nn.functional.pad(fin.to(torch.float64), (0, pad_w, 0, pad_h))
        i0 = r0 // fy
        k = vals.shape[0] // fy
        sums[i0:i0 + k] += vals.reshape(k, fy, pw, fx).sum(dim=(1, 3))
        counts[i0:i0 + k] += cnt.reshape(k, fy, pw, fx).sum(dim=(1, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        pooled = (sums / counts).numpy()
    return pooled, (fy, fx)


def plot_heatmap(weight: torch.Tensor, name: str = "weight", max_size: int = 256, cmap: str = "RdBu_r") -> FigureResult:
    """Heatmap of a dense matrix on a diverging palette centred at 0.

    ``weight``: ``[out, in]`` or conv ``[out, in, kh, kw]`` (shown as ``[out, in*kh*kw]``).
    Matrices larger than ``max_size`` on a side are block-mean-pooled (:func:`pool_matrix`);
    the factor is in the title. ``data = {"matrix": pooled [h, w], "factor": (fy, fx)}``.
    """
    if weight.dim() < 2:
        raise ValueError(f"a heatmap needs a tensor with >= 2 dimensions; {name} has shape {tuple(weight.shape)}")
    pooled, factor = pool_matrix(weight, max_size)
    return plot_pooled_heatmap(pooled, factor, tuple(weight.shape), name, cmap)


def plot_pooled_heatmap(pooled: np.ndarray, factor: tuple[int, int], shape: tuple[int, ...], name: str = "weight",
                        cmap: str = "RdBu_r") -> FigureResult:
    """Draw a matrix already pooled by :func:`pool_matrix` (``shape``: the tensor's own shape)."""
    fy, fx = factor
    finite = pooled[np.isfinite(pooled)]
    vmax = float(np.abs(finite).max()) if finite.size else 1.0
    vmax = vmax or 1.0
    fig, ax = plt.subplots(figsize=(6, 6 * min(2.0, max(0.2, pooled.shape[0] / max(1, pooled.shape[1])))))
    im = ax.imshow(pooled, cmap=cmap, vmin=-vmax, vmax=vmax, aspect="auto", interpolation="nearest")
    title = f"{name} {tuple(shape)}"
    if (fy, fx) != (1, 1):
        title += f"\nblock-mean pooled {fy}x{fx}"
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("input" + (" x kh x kw" if len(shape) > 2 else ""))
    ax.set_ylabel("output unit")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return FigureResult(fig, {"matrix": pooled, "factor": (fy, fx)})


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
                      ncols: Optional[int] = None, max_filters: int = 256) -> FigureResult:
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
    return FigureResult(fig, {"images": images, "mode": mode})


def plot_weight_norms(source: Union[Source, StatsTable], norm: str = "fro", weights_only: bool = True) -> FigureResult:
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
    return FigureResult(fig, {"names": names, "values": values})


def embedding_input(weight: torch.Tensor, max_units: int = 1000, pca_dims: int = 50, seed: int = 0,
                    max_values: int = 50_000_000) -> dict[str, Any]:
    """The rows that :func:`plot_neuron_embedding` embeds: a seeded sample of at most
    ``max_units`` units (fewer when ``units x inputs`` exceeds ``max_values``), reduced to
    ``pca_dims`` principal components when longer.

    Returns ``{"x": [n, d], "units": unit indices, "norms": each unit's weight norm,
    "n_total": all units, "pca_dims": d or None, "explained": PCA's explained variance share}``.
    """
    if weight.dim() < 2:
        raise ValueError(f"need a weight with >= 2 dimensions; got shape {tuple(weight.shape)}")
    mat = weight.detach().reshape(weight.shape[0], -1)
    n, cols = mat.shape
    cap = max(3, min(max_units, max_values // max(1, cols)))
    units = np.arange(n) if n <= cap else np.sort(np.random.default_rng(seed).choice(n, size=cap, replace=False))
    x = np.nan_to_num(mat[torch.as_tensor(units)].double().cpu().numpy(), nan=0.0, posinf=0.0, neginf=0.0)
    norms = np.linalg.norm(x, axis=1)
    out: dict[str, Any] = {"units": units, "norms": norms, "n_total": n, "pca_dims": None, "explained": 1.0}
    if pca_dims and x.shape[1] > pca_dims and x.shape[0] > pca_dims:
        from sklearn.decomposition import PCA

        pca = PCA(n_components=pca_dims, svd_solver="randomized", random_state=seed)
        x = pca.fit_transform(x)
        out["pca_dims"], out["explained"] = pca_dims, float(pca.explained_variance_ratio_.sum())
    out["x"] = x
    return out


def plot_neuron_embedding(weight: Union[torch.Tensor, Mapping[str, Any]], name: str = "layer", method: str = "auto",
                          seed: int = 0, perplexity: float = 30.0, color: Optional[np.ndarray] = None,
                          max_units: int = 1000, pca_dims: int = 50) -> FigureResult:
    """2-D embedding of a layer's output units by their weight vectors (rows of ``[out, -1]``).

    ``method``: ``"tsne"`` (scikit-learn), ``"umap"`` (needs ``umap-learn``) or ``"auto"``
    (UMAP when installed, else t-SNE). A layer with more than ``max_units`` units is sampled
    (seeded) and rows longer than ``pca_dims`` are reduced by PCA first
    (:func:`embedding_input`; ``weight`` may also be its result); the title says so. Points are
    coloured by ``color`` (default: each unit's weight norm). ``data = {"embedding": [n, 2],
    "units": [n] unit indices, "color": [n], "method": str, "pca_dims", "n_total"}``.
    """
    prep = weight if isinstance(weight, Mapping) else embedding_input(weight, max_units, pca_dims, seed)
    x, units = prep["x"], prep["units"]
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

        # one thread is fastest for a few thousand points, and avoids OpenMP thrashing (100x
        # slowdowns) on a busy machine
        with threadpool_limits(limits=1):
            emb = TSNE(n_components=2, perplexity=min(perplexity, (n - 1) / 3), random_state=seed,
                       init="pca").fit_transform(x)
    else:
        raise ValueError(f"method must be 'auto', 'tsne' or 'umap'; got {method!r}")
    c = prep["norms"] if color is None else np.asarray(color)
    fig, ax = plt.subplots(figsize=(5, 5))
    sc = ax.scatter(emb[:, 0], emb[:, 1], c=c, cmap="viridis", s=14 if n <= 500 else 4)
    if n <= 80:
        for i, (px, py) in zip(units, emb):
            ax.annotate(str(i), (px, py), fontsize=5)
    fig.colorbar(sc, ax=ax, fraction=0.046, label="unit weight norm" if color is None else "")
    what = f"{n} units" if n == prep["n_total"] else f"{n} of {prep['n_total']} units (seeded sample)"
    pca = f", PCA to {prep['pca_dims']} dims ({100 * prep['explained']:.0f}% of variance) first" if prep["pca_dims"] else ""
    ax.set_title(f"{method.upper()} of {name}: {what} by weight vector{pca}", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    return FigureResult(fig, {"embedding": np.asarray(emb), "units": np.asarray(units), "color": c, "method": method,
                              "pca_dims": prep["pca_dims"], "n_total": prep["n_total"]})


def plot_activations(model: nn.Module, layer: str, image: torch.Tensor, max_channels: int = 64,
                     ncols: Optional[int] = None) -> FigureResult:
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
    return FigureResult(fig, {"activations": arr})


def plot_spectra(table: StatsTable, names: Optional[Sequence[str]] = None, max_layers: int = 16,
                 ncols: Optional[int] = None) -> FigureResult:
    """Each layer's eigenvalue density (``log10`` density against ``log10 sigma^2``, log-spaced
    bins) with its power-law fit (a straight line of slope ``-alpha``).

    Layers: those of ``table`` with a spectrum (``names`` to choose; at most ``max_layers``,
    evenly spaced). The fitted tail ``p(x) ~ x^-alpha`` above ``xmin`` is the red line.
    ``data[name] = {"evals", "alpha", "xmin", "quality"}``.
    """
    rows = [r for r in table if r.spectrum is not None and (names is None or r.name in names)]
    rows = [rows[i] for i in spread(len(rows), max_layers)]
    if not rows:
        raise ValueError("no layer has a spectrum to plot (spectral='none', or every matrix above spectral_exact_max)")
    nr, nc = _grid(len(rows), ncols)
    fig, axes = plt.subplots(nr, nc, figsize=(2.8 * nc, 2.2 * nr), squeeze=False)
    data: dict[str, Any] = {}
    for ax, r in zip(axes.flat, rows):
        sp = r.spectrum
        evals = np.sort(sp.singular_values ** 2)
        pos = evals[evals > 0]
        f = sp.fit
        data[r.name] = {"evals": evals, "alpha": f.alpha, "xmin": f.xmin, "quality": f.quality}
        if pos.size >= 2 and pos[-1] > pos[0]:
            # log10 values on linear axes: the same picture as log-log axes, much cheaper to draw
            dens, edges = np.histogram(pos, bins=np.logspace(np.log10(pos[0]), np.log10(pos[-1]), 30), density=True)
            keep = dens > 0
            centers = np.log10(np.sqrt(edges[:-1] * edges[1:]))
            ax.plot(centers[keep], np.log10(dens[keep]), "o", ms=2.5, color="#4a7ab8")
            if math.isfinite(f.alpha):
                xs = np.logspace(np.log10(f.xmin), np.log10(pos[-1]), 20)
                frac = (pos >= f.xmin).mean()
                fit = frac * (f.alpha - 1) / f.xmin * (xs / f.xmin) ** (-f.alpha)
                ax.plot(np.log10(xs), np.log10(fit), color="#c0392b", lw=1.2)
            ax.set_xlabel("log10 eigenvalue", fontsize=5)
        label = f"alpha {f.alpha:.2f} ({f.quality})" if math.isfinite(f.alpha) else f.quality
        ax.set_title(f"{r.name if len(r.name) < 30 else '...' + r.name[-27:]}\n{label}", fontsize=6)
        ax.tick_params(labelsize=5)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.tight_layout()
    return FigureResult(fig, data)


def plot_alphas(table: StatsTable, low: float = 2.0, high: float = 6.0) -> FigureResult:
    """The fitted power-law ``alpha`` per layer, with the over-trained (``< low``) and
    under-trained (``> high``) bands shaded; fits of poor quality are drawn hollow.

    ``data = {"names", "alphas", "good"}``.
    """
    rows = [r for r in table if r.spectrum is not None and math.isfinite(r.spectrum.alpha)]
    if not rows:
        raise ValueError("no layer has a fitted alpha (too few eigenvalues, or no spectra computed)")
    names = [r.name for r in rows]
    alphas = np.array([r.spectrum.alpha for r in rows])
    good = np.array([r.spectrum.fit.quality == "good" for r in rows])
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(rows)), 4))
    x = np.arange(len(rows))
    ax.axhspan(0, low, color="#fde7e7", zorder=0)
    ax.axhspan(high, max(high + 1, float(alphas.max()) + 0.5), color="#e7ecfd", zorder=0)
    ax.bar(x[good], alphas[good], color="#4a7ab8")
    ax.bar(x[~good], alphas[~good], facecolor="none", edgecolor="#4a7ab8", hatch="//")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_ylabel("power-law alpha of the ESD")
    ax.set_title(f"alpha per layer (< {low:g}: over-trained, > {high:g}: under-trained; hatched: poor fit)", fontsize=8)
    fig.tight_layout()
    return FigureResult(fig, {"names": names, "alphas": alphas, "good": good})
