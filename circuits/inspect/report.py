"""``circuits inspect MODEL_OR_CHECKPOINT [--out DIR] [--format table|csv|json|html]``.

:func:`inspect_report` is the library entry: the statistics table (printed), and with
``out_dir`` the table as CSV/JSON and PNG plots (histograms, norms, heatmaps of the dense
matrices, first-layer filters, a t-SNE of the last weight layer's units; plus the architecture
graph and its DOT text when the source is a model), and for ``format="html"`` a
self-contained ``report.html`` (images embedded as base64) that opens without a server.

``circuits inspect SOURCE`` (:mod:`circuits.cli`) is the command-line form.
"""

from __future__ import annotations

import base64
import html
import io
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, TextIO, Union

import torch
from torch import nn

from .._io import PathLike, atomic_write_text
from ..models.loading import WeightsError
from .checkpoint import CHECKPOINT_SUFFIXES, checkpoint_stats
from .stats import StatsConfig, StatsTable, weight_stats

__all__ = ["inspect_report", "FORMATS", "InspectError"]

FORMATS = ("table", "csv", "json", "html")


class InspectError(ValueError):
    """Bad input for :func:`inspect_report` (unknown source, bad option)."""


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


def _png_b64(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _make_plots(table: StatsTable, tensors: Mapping[str, torch.Tensor], model: Optional[nn.Module],
                out_dir: Path, max_heatmaps: int, embedding: bool, image: Optional[torch.Tensor],
                activation_layer: Optional[str]) -> list[tuple[str, str, str]]:
    """Write PNGs; return ``[(title, filename, base64)]``."""
    import matplotlib.pyplot as plt

    from . import plots

    made: list[tuple[str, str, str]] = []

    def emit(title: str, fname: str, plot: Any) -> None:
        b64 = _png_b64(plot.figure)
        from .._io import atomic_write_bytes

        atomic_write_bytes(out_dir / fname, base64.b64decode(b64))
        plt.close(plot.figure)
        made.append((title, fname, b64))

    items = list(tensors.items())
    emit("Weight histograms", "histograms.png", plots.plot_histograms(items))
    emit("Frobenius norm per layer", "norms.png", plots.plot_weight_norms(table))
    if any(r.spectral_method for r in table):
        emit("Spectral norm per layer", "spectral_norms.png", plots.plot_weight_norms(table, norm="spectral"))
    dense = [(n, t) for n, t in items if t.dim() == 2]
    dense.sort(key=lambda nt: -nt[1].numel())
    for n, t in dense[:max_heatmaps]:
        emit(f"Heatmap of {n}", f"heatmap_{_safe(n)}.png", plots.plot_heatmap(t, n))
    convs = [(n, t) for n, t in items if t.dim() == 4]
    if convs:
        n, t = convs[0]
        emit(f"First-layer filters ({n})", "filters.png", plots.plot_conv_filters(t, n))
    weights = [(n, t) for n, t in items if t.dim() >= 2 and t.shape[0] >= 5]
    if embedding and weights:
        n, t = weights[-1]
        emit(f"t-SNE of {n}'s units", "embedding.png", plots.plot_neuron_embedding(t, n))
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


def _html(label: str, table: StatsTable, images: list[tuple[str, str, str]]) -> str:
    cols = ["name", "shape", "numel", "mean", "std", "min", "max", "skew", "kurtosis", "fro_norm",
            "spectral_norm", "near_zero", "dead", "n_nan", "n_inf", "flags"]
    rows = []
    for r in table:
        rec = r.to_record()
        rec["shape"] = "x".join(map(str, r.shape))
        rec["dead"] = f"{len(r.dead_units)}/{r.n_units}" if r.n_units else ""
        rec["flags"] = "; ".join(r.flags)
        cells = []
        for c in cols:
            v = rec.get(c)
            cells.append(f"<td>{html.escape(f'{v:.4g}' if isinstance(v, float) else ('' if v is None else str(v)))}</td>")
        cls = ' class="flag"' if r.flags else ""
        rows.append(f"<tr{cls}>{''.join(cells)}</tr>")
    figs = "\n".join(f'<figure><img alt="{html.escape(t)}" src="data:image/png;base64,{b}"><figcaption>{html.escape(t)} '
                     f'(<a href="{html.escape(f)}">{html.escape(f)}</a>)</figcaption></figure>' for t, f, b in images)
    skipped = "".join(f"<li>{html.escape(n)}: {html.escape(r)}</li>" for n, r in table.skipped)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>circuits inspect: {html.escape(label)}</title>
<style>body{{font-family:sans-serif;margin:1.5em}}table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:2px 5px;text-align:right}}td:first-child,td:last-child{{text-align:left}}
tr.flag{{background:#fde7e7}}figure{{display:inline-block;margin:1em;vertical-align:top}}img{{max-width:900px}}</style>
</head><body><h1>Weights of {html.escape(label)}</h1>
<p>{len(table)} tensors, {sum(r.numel for r in table):,} values, {len(table.flagged())} flagged.
Spectral norms marked by method (exact / power iteration estimate) in the JSON.</p>
<table><tr>{''.join(f'<th>{c}</th>' for c in cols)}</tr>
{''.join(rows)}</table>{f'<p>Skipped:</p><ul>{skipped}</ul>' if skipped else ''}
{figs}
</body></html>
"""


def inspect_report(
    source: Union[str, PathLike, nn.Module, Mapping[str, torch.Tensor]],
    out_dir: Optional[PathLike] = None,
    format: str = "table",
    plots: bool = True,
    config: Optional[StatsConfig] = None,
    stream: Optional[TextIO] = None,
    max_heatmaps: int = 4,
    embedding: bool = True,
    image: Optional[torch.Tensor] = None,
    activation_layer: Optional[str] = None,
    device: str = "cpu",
    progress: bool = False,
) -> StatsTable:
    """Inspect a model or checkpoint: print the table, write files to ``out_dir``.

    Args:
        source: a model name (:func:`circuits.models.load_model`), a checkpoint path
            (streamed, no model code needed), an ``nn.Module`` or a state dict.
        out_dir: where ``stats.csv``, ``stats.json``, the PNG plots and ``report.html`` go
            (required for ``format="html"``).
        format: what is printed: ``"table"`` (aligned text), ``"csv"``, ``"json"``, or
            ``"html"`` (writes ``out_dir/report.html`` and prints its path).
        plots: write PNG plots when ``out_dir`` is given.
        config: statistics options (:class:`~circuits.inspect.stats.StatsConfig`).
        stream: where to print (default stdout).
        image, activation_layer: for a model, also plot this layer's activations for the
            image (``[C, H, W]`` in ``[0, 1]``).

    Returns:
        The :class:`~circuits.inspect.stats.StatsTable`.
    """
    if format not in FORMATS:
        raise InspectError(f"format must be one of {', '.join(FORMATS)}; got {format!r}")
    if format == "html" and out_dir is None:
        raise InspectError("format 'html' needs an output folder (--out DIR)")
    stream = stream or sys.stdout
    label, model, path, state = _resolve(source, device)
    cfg = config or StatsConfig()
    if path is not None:
        table = checkpoint_stats(path, cfg, progress=progress)
    else:
        table = weight_stats(model if model is not None else state, cfg, progress=progress)  # type: ignore[arg-type]
    out = Path(out_dir) if out_dir is not None else None
    images: list[tuple[str, str, str]] = []
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "stats.csv")
        table.to_json(out / "stats.json")
        if plots:
            # plots need the tensors themselves: small ones (the plotted set) are loaded lazily
            tensors = _plot_tensors(model, path, state)
            images = _make_plots(table, tensors, model, out, max_heatmaps, embedding, image, activation_layer)
    if format == "table":
        print(table.to_text(), file=stream)
    elif format == "csv":
        print(table.to_csv(), end="", file=stream)
    elif format == "json":
        print(table.to_json(), file=stream)
    else:
        assert out is not None
        atomic_write_text(out / "report.html", _html(label, table, images))
        print(str(out / "report.html"), file=stream)
    return table


def _plot_tensors(model: Optional[nn.Module], path: Optional[Path], state: Optional[Mapping]) -> dict[str, torch.Tensor]:
    if model is not None:
        return {n: p.detach() for n, p in model.named_parameters()}
    if state is not None:
        return {n: t for n, t in state.items() if isinstance(t, torch.Tensor) and t.is_floating_point()}
    from .checkpoint import CheckpointReader

    out: dict[str, torch.Tensor] = {}
    budget = 256 * 1024 * 1024  # plots of a huge checkpoint use its first 256 MB of float tensors
    with CheckpointReader(path) as reader:  # type: ignore[arg-type]
        for name, t in reader:
            if not t.is_floating_point():
                continue
            nbytes = t.numel() * t.element_size()
            if nbytes > budget:
                continue
            budget -= nbytes
            out[name] = t.clone()
    return out
