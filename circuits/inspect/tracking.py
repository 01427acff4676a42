"""Weights over training: :func:`watch` (weights, gradients and update-to-weight ratios per
layer, through hooks that are removed on exit), the writers it logs to, and the older
:class:`TensorBoardWeightLogger` (called by hand).

:func:`watch` hooks the optimizer's ``step`` (``register_step_pre_hook``/``post_hook``, or
torch's global optimizer hooks when no optimizer is given, filtered to optimizers that hold
the model's parameters). Every ``every``-th optimizer step it logs, for each named parameter:

- ``weights/<name>/norm``, ``mean``, ``std``, ``max_abs`` (finite values) and ``nonfinite``
  (count of NaN/Inf), after the step;
- ``grads/<name>/norm``, ``max_abs`` and ``nonfinite``, the gradient the step used;
- ``updates/<name>/ratio``: ``||W_after - W_before|| / ||W_before||``, the update-to-weight
  ratio (about 1e-3 per step is the usual healthy range; much larger means the learning rate
  is too high for that layer, much smaller that it barely trains). A parameter whose weights
  were all zero or not finite before the step, or whose update is not finite, has no ratio (it
  is not logged, and ``Watcher.notes`` says so; the ``nonfinite`` counts show NaN/Inf).

To measure the update, the parameters are copied before a logged step (memory for one copy
of the model, only during logged steps). Writers: a TensorBoard ``SummaryWriter`` (histograms
of weights and gradients too, with ``histograms=True``), a :class:`ScalarWriter` (plain CSV or
JSON), or a path (``.csv``/``.json`` → :class:`ScalarWriter`, else a TensorBoard run folder)::

    with watch(model, "runs/exp1", every=100):
        for x, y in loader:
            opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()

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

The checkpoint diff lives in :mod:`circuits.inspect.diff`.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .._io import PathLike, atomic_write_text
from .stats import tensor_stats

__all__ = ["TensorBoardWeightLogger", "ScalarWriter", "Watcher", "watch"]


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
            rec = tensor_stats(name, t, spectral=self.spectral, spectrum=False)
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


class ScalarWriter:
    """Scalars to a plain ``.csv`` (``step,tag,value``) or ``.json`` file, TensorBoard-style.

    ``add_scalar(tag, value, global_step)`` as on a ``SummaryWriter``; the file is rewritten
    atomically on :meth:`flush`/:meth:`close` (so a reader never sees half a file). JSON:
    ``{"scalars": [{"step", "tag", "value"}, ...]}`` with NaN as ``null`` and infinities as
    ``"inf"``/``"-inf"``.
    """

    def __init__(self, path: PathLike, format: Optional[str] = None):
        self.path = Path(path)
        fmt = format or self.path.suffix.lstrip(".").lower()
        if fmt not in ("csv", "json"):
            raise ValueError(f"ScalarWriter writes .csv or .json files; got {self.path.name!r} (pass format='csv' or 'json')")
        if self.path.is_dir():
            raise ValueError(f"{self.path} is a folder; ScalarWriter needs a file name ending in .csv or .json")
        self.format = fmt
        self.records: list[tuple[int, str, float]] = []

    def add_scalar(self, tag: str, scalar_value: float, global_step: Optional[int] = None, *args: Any, **kwargs: Any) -> None:
        self.records.append((int(global_step or 0), str(tag), float(scalar_value)))

    def scalars(self, tag: str) -> list[tuple[int, float]]:
        """``[(step, value)]`` logged for ``tag``."""
        return [(s, v) for s, t, v in self.records if t == tag]

    def tags(self) -> list[str]:
        return list(dict.fromkeys(t for _, t, _ in self.records))

    def flush(self) -> None:
        if self.format == "csv":
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            w.writerow(["step", "tag", "value"])
            w.writerows(self.records)
            text = buf.getvalue()
        else:
            def js(v: float) -> Any:
                return None if math.isnan(v) else (v if math.isfinite(v) else ("inf" if v > 0 else "-inf"))

            text = json.dumps({"scalars": [{"step": s, "tag": t, "value": js(v)} for s, t, v in self.records]})
        atomic_write_text(self.path, text)

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> "ScalarWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _finite_summary(x: torch.Tensor) -> tuple[dict[str, float], int]:
    """``({norm, mean, std, max_abs}, n_nonfinite)`` of a tensor's finite values (float64 sums)."""
    x = x.detach().reshape(-1)
    fin = torch.isfinite(x)
    bad = int(x.numel() - int(fin.sum()))
    if bad:
        x = x[fin]
    x = x.double()
    if not x.numel():
        return {}, bad
    return {"norm": float(torch.linalg.vector_norm(x)), "mean": float(x.mean()), "std": float(x.std(unbiased=False)),
            "max_abs": float(x.abs().max())}, bad


class Watcher:
    """What :func:`watch` returns: the hooks, the step count and what was logged.

    Attributes:
        step: optimizer steps seen so far (of optimizers holding the model's parameters).
        logged_steps: the steps that were logged.
        notes: one line per thing that could not be logged (a ratio without a norm ...).
    """

    def __init__(self, model: nn.Module, writer: Any, every: int = 100, optimizer: Optional[torch.optim.Optimizer] = None,
                 histograms: bool = False, updates: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1; got {every!r}")
        self._owns_writer = not hasattr(writer, "add_scalar")
        if self._owns_writer:
            path = Path(writer)
            if path.suffix.lower() in (".csv", ".json"):
                writer = ScalarWriter(path)
            else:
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(str(path))
        self.model, self.writer, self.every = model, writer, every
        self.optimizer, self.histograms, self.updates = optimizer, histograms, updates
        self.params = {name: p for name, p in model.named_parameters()}
        if not self.params:
            raise ValueError(f"{type(model).__name__} has no parameters to watch")
        self._ids = {id(p) for p in self.params.values()}
        self._mine: dict[int, bool] = {}
        self.step = 0
        self.logged_steps: list[int] = []
        self.notes: list[str] = []
        self._before: Optional[dict[str, torch.Tensor]] = None
        self._handles: list[Any] = []

    # -- hooks
    def attach(self) -> "Watcher":
        if self._handles:
            return self
        if self.optimizer is not None:
            self._handles = [self.optimizer.register_step_pre_hook(self._pre),
                             self.optimizer.register_step_post_hook(self._post)]
        else:
            from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

            self._handles = [register_optimizer_step_pre_hook(self._pre), register_optimizer_step_post_hook(self._post)]
        return self

    def remove(self) -> None:
        """Remove every hook (idempotent); flush the writer, and close it if :func:`watch` made it."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._before = None
        if self._owns_writer:
            self.writer.close()
        elif hasattr(self.writer, "flush"):
            self.writer.flush()

    def __enter__(self) -> "Watcher":
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _is_mine(self, optimizer: torch.optim.Optimizer) -> bool:
        key = id(optimizer)
        if key not in self._mine:
            self._mine[key] = any(id(p) in self._ids for g in optimizer.param_groups for p in g["params"])
        return self._mine[key]

    def _pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self._is_mine(optimizer) or self.step % self.every:
            return
        with torch.no_grad():
            for name, p in self.params.items():
                if p.grad is None:
                    continue
                summary, bad = _finite_summary(p.grad)
                for k in ("norm", "max_abs"):
                    if k in summary:
                        self.writer.add_scalar(f"grads/{name}/{k}", summary[k], self.step)
                self.writer.add_scalar(f"grads/{name}/nonfinite", bad, self.step)
                if self.histograms and hasattr(self.writer, "add_histogram"):
                    self.writer.add_histogram(f"grads/{name}", p.grad.detach().float().cpu(), self.step)
            if self.updates:
                self._before = {name: p.detach().clone() for name, p in self.params.items()}

    def _post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self._is_mine(optimizer):
            return
        if self.step % self.every == 0:
            self._log_weights(self.step)
        self.step += 1

    def _log_weights(self, step: int) -> None:
        with torch.no_grad():
            for name, p in self.params.items():
                summary, bad = _finite_summary(p)
                for k, v in summary.items():
                    self.writer.add_scalar(f"weights/{name}/{k}", v, step)
                self.writer.add_scalar(f"weights/{name}/nonfinite", bad, step)
                if self.histograms and hasattr(self.writer, "add_histogram"):
                    self.writer.add_histogram(f"weights/{name}", p.detach().float().cpu(), step)
                if self._before is not None:
                    old = self._before[name].double()
                    norm_old = float(torch.linalg.vector_norm(old))
                    delta = float(torch.linalg.vector_norm(p.detach().double() - old))
                    if norm_old > 0 and math.isfinite(norm_old) and math.isfinite(delta):
                        self.writer.add_scalar(f"updates/{name}/ratio", delta / norm_old, step)
                    else:
                        why = ("its weights were all zero" if norm_old == 0 else "its weights were not finite"
                               if not math.isfinite(norm_old) else "the update is not finite")
                        self.notes.append(f"step {step}: no update ratio for {name} ({why})")
        self._before = None
        self.logged_steps.append(step)
        if hasattr(self.writer, "flush"):
            self.writer.flush()


def watch(model: nn.Module, writer: Any, every: int = 100, optimizer: Optional[torch.optim.Optimizer] = None,
          histograms: bool = False, updates: bool = True) -> Watcher:
    """Log weights, gradients and update-to-weight ratios of ``model`` every ``every`` optimizer steps.

    Args:
        model: the module being trained.
        writer: a TensorBoard ``SummaryWriter``, a :class:`ScalarWriter`, anything with
            ``add_scalar(tag, value, step)``, or a path (``.csv``/``.json``: a ScalarWriter;
            otherwise a TensorBoard run folder), closed on exit when made here.
        every: log optimizer steps ``0, every, 2 * every, ...``.
        optimizer: hook this optimizer only; default: every optimizer that holds the model's
            parameters (torch's global optimizer hooks, while the context is open).
        histograms: also write weight and gradient histograms (TensorBoard writers).
        updates: measure update-to-weight ratios (copies the parameters before logged steps).

    Returns:
        A :class:`Watcher`, to be used as a context manager (hooks attached on enter and
        removed on exit, also on error).

    Example:
        >>> with watch(model, "metrics.csv", every=10) as w:        # doctest: +SKIP
        ...     train(model, optimizer)
        >>> w.logged_steps                                          # doctest: +SKIP
    """
    return Watcher(model, writer, every, optimizer, histograms, updates)
