"""``circuits inspect MODEL_OR_CHECKPOINT [--out DIR] [--format table|csv|json|html]``.

:func:`inspect_report` is the library entry: the statistics table (printed), and with
``out_dir`` the table as CSV/JSON and PNG plots (histograms, norms, the power-law ``alpha``
per layer and the eigenvalue densities, heatmaps of the largest matrices, first-layer filters,
a t-SNE of the last weight layer's units; plus the architecture graph and its DOT text when the
source is a model), and for ``format="html"`` a self-contained ``report.html`` (images
embedded as base64) that opens without a server.

A checkpoint is read once, tensor by tensor (:class:`~circuits.models.checkpoint.CheckpointReader`):
each tensor gives its statistics and, while it is in memory, what the plots need from it (a
histogram of all its finite values, a block-pooled heatmap, a seeded sample of units for the
embedding), so a checkpoint larger than memory is plotted from every tensor. What each plot
covers, and what was sampled, is stated in the report ("What this report covers").

:func:`add_inspect_subcommand` / :func:`run_inspect_command` keep the CLI thin: exit code 0
on success, 2 on bad input with one line on stderr (never a traceback).
``python -m circuits.inspect.report SOURCE ...`` runs the same command.
"""

from __future__ import annotations

import base64
import html
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, TextIO, Union

import torch
from torch import nn

from .._io import PathLike, atomic_write_bytes, atomic_write_text
from ..models.checkpoint import CHECKPOINT_SUFFIXES, CheckpointReader, WeightsError
from ..models.loading import check_device
from . import html as H
from .stats import StatsConfig, StatsTable, named_tensors, stats_from_items, weight_stats

__all__ = ["inspect_report", "FORMATS", "InspectError", "ReportLimits"]

FORMATS = ("table", "csv", "json", "html")


class InspectError(ValueError):
    """Bad input for :func:`inspect_report` (unknown source, bad option)."""


class ReportLimits:
    """How much of a source the report's plots use (defaults of :func:`inspect_report`)."""

    max_histograms = 48  # panels; evenly spaced tensors beyond that
    max_heatmaps = 4  # the largest matrices
    heatmap_size = 256  # pixels per side after block-mean pooling
    max_filters = 256  # first-layer filters drawn
    embed_units = 1000  # units embedded (a seeded sample beyond that)
    embed_pca = 50  # PCA dimensions before t-SNE/UMAP


def _resolve(source: Any, device: str) -> tuple[str, Optional[nn.Module], Optional[Path], Optional[Mapping]]:
    """→ (label, model or None, checkpoint path or None, state dict or None)."""
    if isinstance(source, nn.Module):
        return type(source).__name__, source, None, None
    if isinstance(source, Mapping):
        return "state dict", None, None, source
    if not isinstance(source, (str, os.PathLike)):
        raise InspectError(f"source must be a model name, a checkpoint path, an nn.Module or a state dict; got {type(source).__name__}")
    s = str(source)
    p = Path(s).expanduser()
    if p.exists() or p.suffix.lower() in CHECKPOINT_SUFFIXES or os.sep in s:
        if not p.exists():
            raise WeightsError(f"checkpoint not found: {p}")
        return p.name, None, p, None
    from ..models import resolve_model

    try:
        return s, resolve_model(s, device=device), None, None
    except WeightsError:
        raise
    except ValueError as exc:  # UnknownModelError
        raise InspectError(f"{exc} (or give the path of a .pth/.safetensors checkpoint)") from None


class _PlotPlan:
    """What the plots need, chosen from names and shapes up front, gathered tensor by tensor."""

    def __init__(self, entries: list[tuple[str, tuple[int, ...], torch.dtype]], embedding: bool, max_heatmaps: int,
                 seed: int, limits: type = ReportLimits):
        from .plots import spread

        self.lim = limits
        floats = [(n, s) for n, s, d in entries if d.is_floating_point]
        weights = [(n, s) for n, s in floats if len(s) >= 2] or floats
        self.n_weights = len(weights)
        self.hist_names = [weights[i][0] for i in spread(len(weights), limits.max_histograms)]
        dense = sorted((e for e in floats if len(e[1]) == 2), key=lambda e: -(e[1][0] * e[1][1]))
        self.heatmap_names = [n for n, _ in dense[:max_heatmaps]]
        self.filters_name = next((n for n, s in floats if len(s) == 4), None)
        units = [(n, s) for n, s in floats if len(s) >= 2 and s[0] >= 5]
        self.embed_name = units[-1][0] if units and embedding else None
        self.seed = seed
        self.hists: dict[str, dict[str, Any]] = {}
        self.heatmaps: dict[str, tuple[Any, tuple[int, int], tuple[int, ...]]] = {}
        self.filters: Optional[tuple[torch.Tensor, int]] = None
        self.embed: Optional[dict[str, Any]] = None

    def collect(self, name: str, t: torch.Tensor) -> None:
        from . import plots

        if not t.is_floating_point():
            return
        if name in self.hist_names:
            self.hists[name] = plots.histogram(t)
        if name in self.heatmap_names:
            pooled, factor = plots.pool_matrix(t, self.lim.heatmap_size)
            self.heatmaps[name] = (pooled, factor, tuple(t.shape))
        if name == self.filters_name:
            self.filters = (t[: self.lim.max_filters].detach().float().clone(), t.shape[0])
        if name == self.embed_name:
            self.embed = plots.embedding_input(t, self.lim.embed_units, self.lim.embed_pca, self.seed)

    def tap(self, items: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in items:
            self.collect(name, t)
            yield name, t

    def limits(self) -> list[str]:
        out = []
        if self.hists:
            shown = len(self.hists)
            out.append(f"histograms: every finite value of {shown} of {self.n_weights} weight tensors"
                       + (" (evenly spaced)" if shown < self.n_weights else ""))
        for name, (_, (fy, fx), shape) in self.heatmaps.items():
            pooled = f", block-mean pooled {fy}x{fx}" if (fy, fx) != (1, 1) else ""
            out.append(f"heatmap of {name} {shape}: every value{pooled}")
        if self.filters is not None and self.filters[1] > self.filters[0].shape[0]:
            out.append(f"filters of {self.filters_name}: the first {self.filters[0].shape[0]} of {self.filters[1]}")
        if self.embed is not None:
            n, total = len(self.embed["units"]), self.embed["n_total"]
            what = f"all {total} units" if n == total else f"{n} of {total} units (seeded sample)"
            pca = f", PCA to {self.embed['pca_dims']} dims first" if self.embed["pca_dims"] else ""
            out.append(f"embedding of {self.embed_name}: {what}{pca}")
        return out


def _spectral_limits(table: StatsTable, cfg: StatsConfig) -> list[str]:
    mats = [r for r in table if len(r.shape) >= 2 and r.numel]
    if not mats or cfg.spectral == "none":
        return ["spectral norms and diagnostics: not computed (--spectral none)"] if mats else []
    with_spec = sum(r.spectrum is not None for r in mats)
    power = [r for r in mats if r.spectral_method == "power"]
    out = [f"spectra (alpha, stable/effective rank, randomised comparison): {with_spec} of {len(mats)} matrices "
           f"(conv weights as {'[out, in*kh*kw]' if cfg.esd_conv == 'flatten' else 'kh*kw slices [out, in]'})"]
    if power:
        out.append(f"{len(power)} matrices with smaller side > {cfg.spectral_exact_max} have a power-iteration "
                   "spectral norm only (marked ~; raise spectral_exact_max or use --spectral exact)")
    nonfinite = [r.name for r in mats if r.n_nan or r.n_inf]
    if nonfinite:
        out.append(f"{len(nonfinite)} matrices with NaN/Inf have no spectrum: {', '.join(nonfinite[:5])}")
    return out


def _make_plots(table: StatsTable, plan: _PlotPlan, model: Optional[nn.Module], out_dir: Path,
                image: Optional[torch.Tensor], activation_layer: Optional[str]) -> list[tuple[str, str, str]]:
    """Write PNGs; return ``[(title, filename, base64)]``."""
    import matplotlib.pyplot as plt

    from . import plots

    made: list[tuple[str, str, str]] = []

    def emit(title: str, fname: str, plot: Any) -> None:
        b64 = H.png_base64(plot.figure)
        atomic_write_bytes(out_dir / fname, base64.b64decode(b64))
        plt.close(plot.figure)
        made.append((title, fname, b64))

    if plan.hists:
        emit("Weight histograms", "histograms.png", plots.plot_histogram_data(plan.hists))
    emit("Frobenius norm per layer", "norms.png", plots.plot_weight_norms(table))
    if any(r.spectral_method for r in table):
        emit("Spectral norm per layer", "spectral_norms.png", plots.plot_weight_norms(table, norm="spectral"))
    if any(r.spectrum is not None and r.spectrum.alpha == r.spectrum.alpha for r in table):
        emit("Power-law alpha of each layer's eigenvalue density", "alphas.png", plots.plot_alphas(table))
    if any(r.spectrum is not None for r in table):
        emit("Eigenvalue densities with their power-law fits", "spectra.png", plots.plot_spectra(table))
    for n, (pooled, factor, shape) in plan.heatmaps.items():
        emit(f"Heatmap of {n}", f"heatmap_{_safe(n)}.png", plots.plot_pooled_heatmap(pooled, factor, shape, n))
    if plan.filters is not None:
        n = plan.filters_name
        emit(f"First-layer filters ({n})", "filters.png", plots.plot_conv_filters(plan.filters[0], n))
    if plan.embed is not None and len(plan.embed["units"]) >= 3:
        emit(f"t-SNE of {plan.embed_name}'s units", "embedding.png",
             plots.plot_neuron_embedding(plan.embed, plan.embed_name, seed=plan.seed))
    if model is not None:
        from .graph import graph_to_dot, plot_graph, trace_graph

        try:
            graph = trace_graph(model, stats=table)
        except Exception as exc:  # a model whose forward needs a special input: skip the graph
            print(f"note: architecture graph skipped ({type(exc).__name__}: {exc})", file=sys.stderr)
        else:
            atomic_write_text(out_dir / "architecture.dot", graph_to_dot(graph))
            emit("Architecture (coloured by weight std)", "architecture.png", plot_graph(graph))
        if image is not None and activation_layer:
            emit(f"Activations of {activation_layer}", f"activations_{_safe(activation_layer)}.png",
                 plots.plot_activations(model, activation_layer, image))
    return made


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _units(count: int, units: list[int]) -> str:
    if not count:
        return "0"
    return f"{count} in " + H.cell(units)


def _html(label: str, table: StatsTable, images: list[tuple[str, str, str]], limits: list[str]) -> str:
    cols = ["name", "shape", "numel", "mean", "std", "min", "max", "skew", "kurtosis", "fro_norm", "spectral_norm",
            "alpha (fit)", "stable rank", "effective rank", "spikes", "traps", "near_zero", "dead", "NaN (units)",
            "Inf (units)", "flags"]
    rows = []
    for r in table:
        sp = r.spectrum
        alpha = "" if sp is None or sp.alpha != sp.alpha else f"{sp.alpha:.3g} ± {sp.fit.sigma:.2g} ({sp.fit.quality}, D={sp.fit.ks:.3f})"
        rows.append([r.name, "x".join(map(str, r.shape)), r.numel, r.mean, r.std, r.min, r.max, r.skew, r.kurtosis,
                     r.fro_norm, r.spectral_norm, alpha, sp.stable_rank if sp else None,
                     f"{sp.effective_rank:.4g} / {sp.max_rank}" if sp else None, sp.n_spikes if sp else None,
                     sp.n_traps if sp else None, r.near_zero,
                     f"{len(r.dead_units)}/{r.n_units}" if r.n_units else "", _units(r.n_nan, r.nan_units),
                     _units(r.n_inf, r.inf_units), "; ".join(r.flags)])
    figs = "\n".join(H.figure(t, b, f) for t, f, b in images)
    skipped = [f"{n}: {why}" for n, why in table.skipped] + table.notes
    body = (f"<h1>Weights of {html.escape(label)}</h1>\n<p>{len(table)} tensors, {sum(r.numel for r in table):,} values, "
            f"{len(table.flagged())} flagged. Spectral norms marked by method (exact / power iteration estimate) in the "
            "JSON; alpha is the power-law exponent of the eigenvalue density (&lt; 2 over-trained, &gt; 6 under-trained, "
            "when the fit is good).</p>\n" + H.table(cols, rows, [bool(r.flags) for r in table])
            + (f"<h2>Skipped and notes</h2>{H.bullet_list(skipped)}" if skipped else "")
            + f'<h2>What this report covers</h2><div class="limits">{H.bullet_list(limits)}</div>\n{figs}')
    return H.page(f"circuits inspect: {label}", body)


def inspect_report(
    source: Union[str, PathLike, nn.Module, Mapping[str, torch.Tensor]],
    out_dir: Optional[PathLike] = None,
    format: str = "table",
    plots: bool = True,
    config: Optional[StatsConfig] = None,
    stream: Optional[TextIO] = None,
    max_heatmaps: int = ReportLimits.max_heatmaps,
    embedding: bool = True,
    image: Optional[torch.Tensor] = None,
    activation_layer: Optional[str] = None,
    device: str = "cpu",
    progress: bool = False,
) -> StatsTable:
    """Inspect a model or checkpoint: print the table, write files to ``out_dir``.

    Args:
        source: a model name (:func:`circuits.models.load_model`), a checkpoint (file, shard
            folder or index; streamed, no model code needed), an ``nn.Module`` or a state dict.
        out_dir: a folder (created if missing) for ``stats.csv``, ``stats.json`` (with each
            layer's singular values), the PNG plots and ``report.html``; required for
            ``format="html"``.
        format: what is printed: ``"table"`` (aligned text, then what the report covers),
            ``"csv"``, ``"json"``, or ``"html"`` (writes ``out_dir/report.html`` and prints its path).
        plots: write PNG plots when ``out_dir`` is given.
        config: statistics options (:class:`~circuits.inspect.stats.StatsConfig`).
        stream: where to print (default stdout).
        max_heatmaps: heatmaps of the largest matrices.
        embedding: the t-SNE/UMAP plot of the last weight layer's units.
        image, activation_layer: for a model, also plot this layer's activations for the
            image (``[C, H, W]`` in ``[0, 1]``).
        device: where a model named by ``source`` is loaded (checked first: a device that does
            not exist here is an :class:`InspectError`).

    Returns:
        The :class:`~circuits.inspect.stats.StatsTable`.
    """
    out = H.output_folder(format, FORMATS, out_dir, InspectError)
    check_device(device)
    stream = stream or sys.stdout
    label, model, path, state = _resolve(source, device)
    cfg = config or StatsConfig()
    want_plots = plots and out is not None
    plan: Optional[_PlotPlan] = None
    if path is not None:
        with CheckpointReader(path) as reader:
            if want_plots:
                plan = _PlotPlan([(n, reader.shape(n), reader.dtype(n)) for n in reader.keys()], embedding,
                                 max_heatmaps, cfg.seed)
            items = plan.tap(reader) if plan is not None else iter(reader)
            table = stats_from_items(items, cfg, progress=progress, total=len(reader))
            table.notes = list(reader.notes)
    else:
        table = weight_stats(model if model is not None else state, cfg, progress=progress)  # type: ignore[arg-type]
        if want_plots:
            tensors = named_tensors(model if model is not None else state)  # type: ignore[arg-type]
            plan = _PlotPlan([(n, tuple(t.shape), t.dtype) for n, t in tensors], embedding, max_heatmaps, cfg.seed)
            for n, t in tensors:
                plan.collect(n, t)
    limits = [f"statistics: every value of all {len(table)} floating-point tensors"
              + (f" ({len(table.skipped)} other entries skipped)" if table.skipped else "")]
    limits += _spectral_limits(table, cfg) + (plan.limits() if plan is not None else [])
    images: list[tuple[str, str, str]] = []
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "stats.csv")
        table.to_json(out / "stats.json", singular_values=True)
        if plan is not None:
            images = _make_plots(table, plan, model, out, image, activation_layer)
    if format == "table":
        print(table.to_text(), file=stream)
        for line in limits:
            print(f"covers: {line}", file=stream)
    elif format == "csv":
        print(table.to_csv(), end="", file=stream)
    elif format == "json":
        print(table.to_json(), file=stream)
    else:
        assert out is not None
        atomic_write_text(out / "report.html", _html(label, table, images, limits))
        print(str(out / "report.html"), file=stream)
    return table
