"""Weights over training: a TensorBoard logger and a diff of two checkpoints.

:class:`TensorBoardWeightLogger` is cheap enough to leave on: every ``every`` steps it
computes a ``torch.histc`` histogram of each parameter on the parameter's own device and
writes it with ``SummaryWriter.add_histogram_raw`` (tag ``weights/<name>``), plus scalars
``stats/<name>/<stat>`` (mean, std, Frobenius norm, max |w|, near-zero fraction, NaN and
Inf counts, and the spectral norm when ``spectral`` is not ``"none"``)::

    logger = TensorBoardWeightLogger(model, "runs/exp1", every=100)
    for step, batch in enumerate(loader):
        ...; optimizer.step()
        logger.step(step)          # or logger(step)
    logger.close()

:func:`diff_checkpoints` compares two checkpoints (paths, modules or state dicts) tensor by
tensor: relative change ``||a - b|| / ||a||`` and the units (rows of ``[out, -1]``) that
changed most.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

import torch
from torch import nn

from .._io import PathLike, atomic_write_text
from .stats import named_tensors, tensor_stats

__all__ = ["TensorBoardWeightLogger", "diff_checkpoints", "CheckpointDiff", "TensorDiff"]


class TensorBoardWeightLogger:
    """Log per-parameter histograms and statistics of ``model`` to TensorBoard every ``every`` steps.

    Args:
        model: the module being trained (its ``named_parameters()`` are logged).
        log_dir: TensorBoard run folder (ignored when ``writer`` is given).
        every: log when ``step % every == 0``.
        bins: histogram bins.
        stats: also log scalar statistics.
        spectral: ``"none"`` (default, cheapest), ``"power"`` or ``"auto"`` for the spectral norm.
        writer: an existing ``SummaryWriter`` to share.
    """

    def __init__(self, model: nn.Module, log_dir: Optional[PathLike] = None, every: int = 1, bins: int = 64,
                 stats: bool = True, spectral: str = "none", writer: Any = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
        if every < 1 or bins < 1:
            raise ValueError(f"every and bins must be >= 1; got every={every}, bins={bins}")
        if writer is None:
            if log_dir is None:
                raise ValueError("give log_dir (a TensorBoard run folder) or writer")
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(log_dir))
            self._owns_writer = True
        else:
            self._owns_writer = False
        self.model, self.writer, self.every, self.bins = model, writer, every, bins
        self.stats, self.spectral = stats, spectral
        self.logged_steps: list[int] = []

    def __call__(self, step: int) -> bool:
        return self.step(step)

    def step(self, step: int, force: bool = False) -> bool:
        """Log at ``step`` if it is a multiple of ``every`` (or ``force``); return whether it logged."""
        if not force and step % self.every:
            return False
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                self._log_tensor(name, p.detach(), step)
        self.writer.flush()
        self.logged_steps.append(step)
        return True

    def _log_tensor(self, name: str, t: torch.Tensor, step: int) -> None:
        x = t.reshape(-1)
        if not x.is_floating_point() or x.numel() == 0:
            return
        finite = torch.isfinite(x)
        n_bad = int(x.numel() - int(finite.sum()))
        if n_bad:
            x = x[finite]
        x = x.float()
        if x.numel():
            lo, hi = torch.aminmax(x)
            lo_f, hi_f = float(lo), float(hi)
            if lo_f == hi_f:
                lo_f, hi_f = lo_f - 0.5, hi_f + 0.5
            counts = torch.histc(x, bins=self.bins, min=lo_f, max=hi_f)
            limits = torch.linspace(lo_f, hi_f, self.bins + 1, device=x.device)[1:]
            self.writer.add_histogram_raw(
                f"weights/{name}", min=float(lo), max=float(hi), num=int(x.numel()), sum=float(x.sum()),
                sum_squares=float(torch.dot(x, x)), bucket_limits=limits.cpu().tolist(),
                bucket_counts=counts.cpu().tolist(), global_step=step)
        if self.stats:
            rec = tensor_stats(name, t, spectral=self.spectral)
            values = {"mean": rec.mean, "std": rec.std, "fro_norm": rec.fro_norm,
                      "max_abs": max(abs(rec.min), abs(rec.max)) if x.numel() else math.nan,
                      "near_zero": rec.near_zero, "nan": rec.n_nan, "inf": rec.n_inf}
            if t.dim() >= 2:
                values["dead_units"] = len(rec.dead_units)
                if self.spectral != "none":
                    values["spectral_norm"] = rec.spectral_norm
            for k, v in values.items():
                self.writer.add_scalar(f"stats/{name}/{k}", float(v), step)

    def close(self) -> None:
        if self._owns_writer:
            self.writer.close()
        else:
            self.writer.flush()

    def __enter__(self) -> "TensorBoardWeightLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class TensorDiff:
    """How one tensor changed from checkpoint ``a`` to ``b``."""

    name: str
    shape: tuple[int, ...]
    norm_a: float
    norm_diff: float
    rel_change: float  # ||a - b|| / ||a|| (inf when ||a|| = 0 and b != a)
    max_abs_change: float
    top_units: list[tuple[int, float]] = field(default_factory=list)  # (unit index, ||a_i - b_i|| / ||a_i||)


@dataclass
class CheckpointDiff:
    """Per-tensor diffs plus the names found in only one side or with different shapes."""

    tensors: list[TensorDiff]
    only_in_a: list[str]
    only_in_b: list[str]
    shape_mismatch: list[tuple[str, tuple[int, ...], tuple[int, ...]]]

    def __getitem__(self, name: str) -> TensorDiff:
        for d in self.tensors:
            if d.name == name:
                return d
        raise KeyError(name)

    def most_changed(self, k: int = 10) -> list[TensorDiff]:
        return sorted(self.tensors, key=lambda d: -d.rel_change if math.isfinite(d.rel_change) else -math.inf)[:k]

    def to_records(self) -> list[dict[str, Any]]:
        return [{**asdict(d), "shape": list(d.shape)} for d in self.tensors]

    def to_json(self, path: Optional[PathLike] = None) -> str:
        import json

        text = json.dumps({"tensors": self.to_records(), "only_in_a": self.only_in_a, "only_in_b": self.only_in_b,
                           "shape_mismatch": [[n, list(a), list(b)] for n, a, b in self.shape_mismatch]},
                          indent=1, default=str)
        if path is not None:
            atomic_write_text(path, text)
        return text

    def to_text(self) -> str:
        w = max([len(d.name) for d in self.tensors] + [4])
        lines = [f"{'name'.ljust(w)}  {'rel change':>10}  {'||a-b||':>10}  {'max|a-b|':>10}  most changed units (index: rel)"]
        for d in self.tensors:
            units = ", ".join(f"{i}: {r:.3g}" for i, r in d.top_units)
            lines.append(f"{d.name.ljust(w)}  {d.rel_change:>10.4g}  {d.norm_diff:>10.4g}  {d.max_abs_change:>10.4g}  {units}")
        for n in self.only_in_a:
            lines.append(f"only in a: {n}")
        for n in self.only_in_b:
            lines.append(f"only in b: {n}")
        for n, sa, sb in self.shape_mismatch:
            lines.append(f"shape differs: {n} {sa} vs {sb}")
        return "\n".join(lines)


class _Side:
    """Random access to tensors of a module, a state dict, or a checkpoint file."""

    def __init__(self, source: Union[nn.Module, Mapping[str, torch.Tensor], PathLike]):
        self.reader = None
        if isinstance(source, (str, Path)):
            from .checkpoint import CheckpointReader

            self.reader = CheckpointReader(source)
            self.names = self.reader.keys()
        else:
            self.mapping = dict(named_tensors(source)) if isinstance(source, nn.Module) else dict(named_tensors(source))
            self.names = list(self.mapping)

    def get(self, name: str) -> torch.Tensor:
        return self.reader.get(name) if self.reader is not None else self.mapping[name]

    def release(self, t: torch.Tensor) -> None:
        if self.reader is not None:
            self.reader.release(t)

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()


def diff_checkpoints(a: Union[nn.Module, Mapping[str, torch.Tensor], PathLike],
                     b: Union[nn.Module, Mapping[str, torch.Tensor], PathLike], top_k: int = 5) -> CheckpointDiff:
    """Compare two checkpoints tensor by tensor (streamed when they are files).

    For every floating-point tensor present in both with the same shape: ``rel_change =
    ||a - b|| / ||a||`` (Frobenius), the largest ``|a - b|``, and the ``top_k`` units (rows of
    ``[out, -1]``; elements for 1-D tensors) with the largest ``||a_i - b_i||``, each reported
    as ``(index, ||a_i - b_i|| / ||a_i||)``.
    """
    sa, sb = _Side(a), _Side(b)
    try:
        in_b = set(sb.names)
        in_a = set(sa.names)
        diffs, mismatch = [], []
        for name in sa.names:
            if name not in in_b:
                continue
            ta, tb = sa.get(name), sb.get(name)
            if tuple(ta.shape) != tuple(tb.shape):
                mismatch.append((name, tuple(ta.shape), tuple(tb.shape)))
                continue
            if not (ta.is_floating_point() and tb.is_floating_point()):
                continue
            diffs.append(_diff_one(name, ta, tb, top_k))
            sa.release(ta)
            sb.release(tb)
        return CheckpointDiff(diffs, [n for n in sa.names if n not in in_b], [n for n in sb.names if n not in in_a], mismatch)
    finally:
        sa.close()
        sb.close()


def _diff_one(name: str, ta: torch.Tensor, tb: torch.Tensor, top_k: int) -> TensorDiff:
    with torch.no_grad():
        wd = torch.float64 if torch.float64 in (ta.dtype, tb.dtype) else torch.float32
        xa, xb = ta.to(wd), tb.to(wd)
        d = xb - xa
        rows_a = xa.reshape(xa.shape[0], -1) if xa.dim() >= 1 else xa.reshape(1, 1)
        rows_d = d.reshape(rows_a.shape)
        if xa.dim() <= 1:
            rows_a, rows_d = rows_a.reshape(-1, 1), rows_d.reshape(-1, 1)
        unit_d = torch.linalg.vector_norm(rows_d, dim=1)
        unit_a = torch.linalg.vector_norm(rows_a, dim=1)
        norm_a = float(torch.linalg.vector_norm(unit_a))
        norm_d = float(torch.linalg.vector_norm(unit_d))
        k = min(top_k, unit_d.numel())
        top = torch.topk(unit_d, k).indices.tolist() if k else []
        units = []
        for i in top:
            if float(unit_d[i]) == 0:
                break
            na = float(unit_a[i])
            units.append((int(i), float(unit_d[i]) / na if na > 0 else math.inf))
        rel = norm_d / norm_a if norm_a > 0 else (0.0 if norm_d == 0 else math.inf)
        return TensorDiff(name, tuple(ta.shape), norm_a, norm_d, rel,
                          float(d.abs().max()) if d.numel() else 0.0, units)
