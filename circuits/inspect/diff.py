"""What changed between two checkpoints, tensor by tensor, in bounded memory.

Both sides are read through :class:`circuits.models.checkpoint.CheckpointReader` (files,
shard folders, or in-memory modules/state dicts) and compared in blocks of rows, so resident
memory holds a few blocks, not two checkpoints. For every tensor present on both sides with
the same shape (values compared in float64):

- ``rel_change = ||b - a|| / ||a||`` (Frobenius), ``cosine = <a, b> / (||a|| ||b||)``,
  ``max_abs_change = max |b - a|``;
- ``changed_units``: the units (rows of ``[out, -1]``; elements of a 1-D tensor) with any
  changed value, and ``top_units``: the ``top_k`` with the largest ``||b_i - a_i||``, each as
  ``(index, ||b_i - a_i|| / ||a_i||)``;
- NaN-aware: a position that is NaN on both sides, or the same infinity on both, is *not* a
  change; the figures above use the positions finite on both sides, and positions whose
  NaN/Inf pattern differs are counted and located by unit (``nonfinite_changed_units``), each
  case a flag. An empty tensor has no cosine (flagged), never an error.

Tensors on one side only are listed (``added``: only in ``b``, ``removed``: only in ``a``), as
are same-named tensors whose shape differs (``reshaped``).

:func:`diff_report` is the one call behind ``circuits diff A B``: it reads both, computes, prints
text/JSON (or writes HTML), writes ``diff.json``/``diff.txt``/``diff.html`` to ``out_dir``, and
returns the :class:`CheckpointDiff`.

Example:
    >>> d = diff_checkpoints("epoch1.pth", "epoch2.safetensors")   # doctest: +SKIP
    >>> print(d.to_text())                                         # doctest: +SKIP
"""

from __future__ import annotations

import heapq
import html
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, TextIO, Union

import torch
from torch import nn

from .._io import PathLike, atomic_write_text
from ..models.checkpoint import CheckpointReader
from . import html as H

__all__ = ["TensorDiff", "CheckpointDiff", "DiffError", "diff_checkpoints", "diff_report", "DIFF_FORMATS"]

DIFF_FORMATS = ("table", "json", "html")
Side = Union[nn.Module, Mapping[str, Any], PathLike]


class DiffError(ValueError):
    """Bad arguments for :func:`diff_report` (format, output folder)."""


@dataclass
class TensorDiff:
    """How one tensor changed from ``a`` to ``b`` (see the module docstring)."""

    name: str
    shape: tuple[int, ...]
    dtype_a: str
    dtype_b: str
    norm_a: float
    norm_b: float
    norm_diff: float
    rel_change: float  # ||b - a|| / ||a||; inf (and a flag) when ||a|| = 0 and b differs
    cosine: float  # NaN (and a flag) when a side is all zero or empty
    max_abs_change: float
    n_changed: int  # values that differ (NaN/Inf pattern changes included)
    n_units: int
    changed_units: list[int] = field(default_factory=list)
    top_units: list[tuple[int, float]] = field(default_factory=list)
    nonfinite_same: int = 0  # positions NaN (or the same Inf) on both sides: not a change
    nonfinite_changed: int = 0  # positions whose NaN/Inf pattern differs
    nonfinite_changed_units: list[int] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)

    def to_record(self) -> dict[str, Any]:
        rec = asdict(self)
        rec["shape"] = list(self.shape)
        rec["top_units"] = [[i, _json_float(r)] for i, r in self.top_units]
        for k, v in rec.items():
            if isinstance(v, float):
                rec[k] = _json_float(v)
        return rec


def _json_float(v: float) -> Any:
    if math.isnan(v):
        return None
    return v if math.isfinite(v) else ("inf" if v > 0 else "-inf")


@dataclass
class CheckpointDiff:
    """Per-tensor diffs plus the tensors added, removed or reshaped between ``a`` and ``b``.

    In a notebook it shows itself (``_repr_html_``) as an HTML table (at most 200 tensors;
    flagged rows highlighted; NaN/Inf flagged in red), under 200 KB (:mod:`circuits._display`).
    """

    tensors: list[TensorDiff]
    only_in_a: list[str]
    only_in_b: list[str]
    shape_mismatch: list[tuple[str, tuple[int, ...], tuple[int, ...]]]
    label_a: str = "a"
    label_b: str = "b"
    notes: list[str] = field(default_factory=list)

    @property
    def added(self) -> list[str]:
        return self.only_in_b

    @property
    def removed(self) -> list[str]:
        return self.only_in_a

    @property
    def reshaped(self) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
        return self.shape_mismatch

    def __getitem__(self, name: str) -> TensorDiff:
        for d in self.tensors:
            if d.name == name:
                return d
        raise KeyError(name)

    def most_changed(self, k: int = 10) -> list[TensorDiff]:
        """The ``k`` tensors with the largest relative change (infinite ones first)."""
        return sorted(self.tensors, key=lambda d: -d.rel_change)[:k]

    def to_records(self) -> list[dict[str, Any]]:
        return [d.to_record() for d in self.tensors]

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.label_a, "b": self.label_b, "tensors": self.to_records(), "only_in_a": self.only_in_a,
                "only_in_b": self.only_in_b,
                "shape_mismatch": [[n, list(a), list(b)] for n, a, b in self.shape_mismatch], "notes": self.notes}

    def to_json(self, path: Optional[PathLike] = None) -> str:
        """JSON text; also written atomically to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            atomic_write_text(path, text)
        return text

    def summary(self) -> str:
        changed = sum(d.n_changed > 0 for d in self.tensors)
        return (f"{len(self.tensors)} tensors compared, {changed} changed; {len(self.only_in_b)} added, "
                f"{len(self.only_in_a)} removed, {len(self.shape_mismatch)} reshaped")

    def to_text(self, max_flag_width: int = 70) -> str:
        """Aligned plain text: one line per tensor, then the lists and the flags."""
        head = ["name", "shape", "rel change", "cosine", "max|b-a|", "changed", "most changed units (index: rel)"]
        body = []
        for d in self.tensors:
            units = ", ".join(f"{i}: {r:.3g}" for i, r in d.top_units)
            changed = f"{len(d.changed_units)}/{d.n_units}" if d.n_units else "-"
            body.append([d.name, "x".join(map(str, d.shape)) or "scalar", f"{d.rel_change:.4g}",
                         "-" if math.isnan(d.cosine) else f"{d.cosine:.6f}", f"{d.max_abs_change:.4g}", changed, units])
        widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(head)]

        def line(cells: list[str]) -> str:
            return "  ".join(c.rjust(w) if 2 <= i <= 5 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

        out = [line(head), line(["-" * w for w in widths])] + [line(r) for r in body]
        out.append(self.summary())
        out += [f"added (only in b): {n}" for n in self.only_in_b]
        out += [f"removed (only in a): {n}" for n in self.only_in_a]
        out += [f"reshaped: {n} {tuple(sa)} -> {tuple(sb)}" for n, sa, sb in self.shape_mismatch]
        for d in self.tensors:
            for f in d.flags:
                out.append(f"flag {d.name}: " + (f if len(f) <= max_flag_width else f[: max_flag_width - 3] + "..."))
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)

    def _title(self) -> str:
        return f"{self.label_a} → {self.label_b}: {self.summary()}"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # IPython's text/plain: one line, not every tensor
        p.text(f"{type(self).__name__}({self._title()})")

    def _repr_html_(self) -> str:
        from .. import _display as D

        cols = ["name", "shape", "rel change", "cosine", "max |b-a|", "changed units", "top units (index: rel)", "flags"]
        shown = self.tensors[:200]
        rows = [[d.name, "x".join(map(str, d.shape)) or "scalar", d.rel_change, d.cosine, d.max_abs_change,
                 f"{len(d.changed_units)}/{d.n_units}" if d.n_units else "-",
                 ", ".join(f"{i}: {r:.3g}" for i, r in d.top_units), "; ".join(d.flags)] for d in shown]
        budget = D.HtmlBudget()
        budget.add(D.table_html(cols, rows, [bool(d.flags) for d in shown]))
        budget.skip(len(self.tensors) - len(shown))
        notes = ([f"added (only in {self.label_b}): " + ", ".join(self.only_in_b[:20])] if self.only_in_b else []) + (
            [f"removed (only in {self.label_a}): " + ", ".join(self.only_in_a[:20])] if self.only_in_a else []) + [
            f"reshaped: {n} {tuple(a)} -> {tuple(b)}" for n, a, b in self.shape_mismatch[:20]] + [f"note: {n}" for n in self.notes]
        n_bad = sum(d.nonfinite_changed for d in self.tensors)
        flag = D.flag_html(f"{n_bad} position(s) whose NaN/Inf pattern changed") if n_bad else ""
        return D.container("CheckpointDiff", self._title(), budget, notes, flag)

    def to_html(self) -> str:
        """A self-contained page: the table (flagged rows highlighted), the lists, a bar chart."""
        cols = ["name", "shape", "rel change", "cosine", "max |b-a|", "changed units", "top units (index: rel)",
                "NaN/Inf same", "NaN/Inf changed at units", "flags"]
        rows = [[d.name, "x".join(map(str, d.shape)), d.rel_change, d.cosine, d.max_abs_change,
                 f"{len(d.changed_units)}/{d.n_units}", [f"{i}: {r:.3g}" for i, r in d.top_units], d.nonfinite_same,
                 d.nonfinite_changed_units, "; ".join(d.flags)] for d in self.tensors]
        parts = [f"<h1>{html.escape(self.label_a)} → {html.escape(self.label_b)}</h1>",
                 f"<p>{html.escape(self.summary())}.</p>",
                 H.table(cols, rows, [bool(d.flags) for d in self.tensors])]
        for title, items in (("Added (only in b)", self.only_in_b), ("Removed (only in a)", self.only_in_a),
                             ("Reshaped", [f"{n}: {tuple(a)} → {tuple(b)}" for n, a, b in self.shape_mismatch]),
                             ("Notes", self.notes)):
            if items:
                parts.append(f"<h2>{title}</h2>{H.bullet_list(items)}")
        finite = [d for d in self.tensors if math.isfinite(d.rel_change)]
        if finite:
            parts.append(H.figure("Relative change per tensor (infinite ones left out)", _bar_chart(finite)))
        return H.page(f"circuits diff: {self.label_a} → {self.label_b}", "\n".join(parts))


def _bar_chart(diffs: list[TensorDiff]) -> str:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(diffs)), 4))
    ax.bar(range(len(diffs)), [d.rel_change for d in diffs], color="#b8574a")
    ax.set_xticks(range(len(diffs)))
    ax.set_xticklabels([d.name for d in diffs], rotation=90, fontsize=6)
    ax.set_ylabel("||b - a|| / ||a||")
    fig.tight_layout()
    try:
        return H.png_base64(fig)
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------- computing


def _reader(source: Side, label: str) -> CheckpointReader:
    if isinstance(source, nn.Module):
        return CheckpointReader.from_state_dict(source.state_dict(), type(source).__name__)
    if isinstance(source, Mapping):
        return CheckpointReader.from_state_dict(source, label)
    return CheckpointReader(source)


class _Accumulator:
    """Running sums over the row blocks of one tensor pair."""

    def __init__(self, top_k: int, max_listed: int):
        self.aa = self.bb = self.ab = self.dd = 0.0
        self.max_abs = 0.0
        self.n_changed = self.nonfinite_same = self.nonfinite_changed = 0
        self.changed_units: list[int] = []
        self.nonfinite_units: list[int] = []
        self.n_changed_units = 0
        self.top: list[tuple[float, int, float]] = []  # min-heap of (||d_i||, i, ||a_i||)
        self.top_k, self.max_listed = top_k, max_listed

    def add(self, a: torch.Tensor, b: torch.Tensor, row0: int) -> None:
        """``a``, ``b``: ``[rows, cols]`` float64 blocks starting at unit ``row0``."""
        fa, fb = torch.isfinite(a), torch.isfinite(b)
        both = fa & fb
        if bool(both.all()):
            a0, b0 = a, b
            mismatch_rows = None
        else:
            same = ~fa & ~fb & ((torch.isnan(a) & torch.isnan(b)) | (a == b))
            mismatch = ~both & ~same
            self.nonfinite_same += int(same.sum())
            self.nonfinite_changed += int(mismatch.sum())
            mismatch_rows = mismatch.any(dim=1)
            bad = torch.nonzero(mismatch_rows).flatten() + row0
            self.nonfinite_units += bad.tolist()[: max(0, self.max_listed - len(self.nonfinite_units))]
            zero = torch.zeros((), dtype=a.dtype)
            a0, b0 = torch.where(both, a, zero), torch.where(both, b, zero)
            self.n_changed += int(mismatch.sum())
        d = b0 - a0
        row_aa = (a0 * a0).sum(dim=1)
        row_dd = (d * d).sum(dim=1)
        self.aa += float(row_aa.sum())
        self.bb += float((b0 * b0).sum())
        self.ab += float((a0 * b0).sum())
        self.dd += float(row_dd.sum())
        if d.numel():
            self.max_abs = max(self.max_abs, float(d.abs().max()))
        diff = d != 0
        self.n_changed += int(diff.sum())
        changed_rows = diff.any(dim=1) if mismatch_rows is None else (diff.any(dim=1) | mismatch_rows)
        idx = torch.nonzero(changed_rows).flatten()
        self.n_changed_units += idx.numel()
        self.changed_units += (idx + row0).tolist()[: max(0, self.max_listed - len(self.changed_units))]
        k = min(self.top_k, row_dd.numel())
        if k:
            vals, where = torch.topk(row_dd, k)
            for v, i in zip(vals.tolist(), where.tolist()):
                if v <= 0:
                    break
                item = (math.sqrt(v), row0 + i, math.sqrt(float(row_aa[i])))
                if len(self.top) < self.top_k:
                    heapq.heappush(self.top, item)
                elif item > self.top[0]:
                    heapq.heapreplace(self.top, item)


def _diff_tensor(name: str, ra: CheckpointReader, rb: CheckpointReader, top_k: int, block_elems: int,
                 max_listed: int) -> TensorDiff:
    shape = ra.shape(name)
    n_units = shape[0] if len(shape) >= 1 else 1
    row_elems = math.prod(shape[1:]) if len(shape) >= 1 else 1
    per_block = max(1, block_elems // max(1, row_elems))
    acc = _Accumulator(top_k, max_listed)
    with torch.no_grad():
        for start in range(0, max(n_units, 1) if shape else 1, per_block):
            stop = min(start + per_block, n_units)
            ta, tb = (ra.rows(name, start, stop), rb.rows(name, start, stop)) if shape else (ra.get(name), rb.get(name))
            rows = ta.shape[0] if len(shape) >= 2 else -1
            a = ta.detach().to(torch.float64).reshape(rows, row_elems if len(shape) >= 2 else 1)
            b = tb.detach().to(torch.float64).reshape(a.shape)
            acc.add(a, b, start)
            ra.release(ta)
            rb.release(tb)
            del ta, tb, a, b
    norm_a, norm_b, norm_d = math.sqrt(acc.aa), math.sqrt(acc.bb), math.sqrt(acc.dd)
    flags: list[str] = []
    numel = math.prod(shape)
    if numel == 0:
        flags.append("empty tensor: nothing to compare (no cosine)")
    if norm_a > 0:
        rel = norm_d / norm_a
    elif norm_d == 0:
        rel = 0.0
    else:
        rel = math.inf
        flags.append("a is all zeros: the relative change is infinite (see max |b-a| and the norms)")
    if norm_a > 0 and norm_b > 0:
        cosine = max(-1.0, min(1.0, acc.ab / (norm_a * norm_b)))
    else:
        cosine = math.nan
        if numel:
            flags.append(f"{'a' if norm_a == 0 else 'b'} is all zeros: no cosine")
    if acc.nonfinite_changed:
        units = ", ".join(map(str, acc.nonfinite_units[:8])) + (" ..." if len(acc.nonfinite_units) > 8 else "")
        flags.append(f"NaN/Inf pattern differs at {acc.nonfinite_changed} values (units {units}); the figures use the "
                     "values finite on both sides")
    if acc.nonfinite_same:
        flags.append(f"{acc.nonfinite_same} values are NaN/Inf on both sides (not counted as changes)")
    if acc.n_changed_units > len(acc.changed_units):
        flags.append(f"{acc.n_changed_units} units changed; the first {len(acc.changed_units)} are listed")
    da, db = (str(r.dtype(name)).replace("torch.", "") for r in (ra, rb))
    if da != db:
        flags.append(f"dtype changed: {da} -> {db}")
    top = [(i, dn / an if an > 0 else math.inf) for dn, i, an in sorted(acc.top, reverse=True)]
    return TensorDiff(name=name, shape=tuple(shape), dtype_a=da, dtype_b=db, norm_a=norm_a, norm_b=norm_b,
                      norm_diff=norm_d, rel_change=rel, cosine=cosine, max_abs_change=acc.max_abs,
                      n_changed=acc.n_changed, n_units=n_units if shape else 1, changed_units=acc.changed_units,
                      top_units=top, nonfinite_same=acc.nonfinite_same, nonfinite_changed=acc.nonfinite_changed,
                      nonfinite_changed_units=acc.nonfinite_units, flags=flags)


def diff_checkpoints(a: Side, b: Side, top_k: int = 5, block_elems: int = 1 << 21, max_listed: int = 10_000,
                     progress: bool = False) -> CheckpointDiff:
    """Compare two checkpoints (paths, shard folders, modules or state dicts) tensor by tensor.

    Args:
        a, b: the two sides; files are streamed, ``block_elems`` values of each at a time.
        top_k: most-changed units reported per tensor.
        max_listed: at most this many changed units are listed per tensor (the count is exact).
        progress: a tqdm bar over the tensors.

    Returns:
        A :class:`CheckpointDiff` (tensors in ``a``'s order).
    """
    if top_k < 0 or block_elems < 1:
        raise DiffError(f"top_k must be >= 0 and block_elems >= 1; got {top_k}, {block_elems}")
    ra = _reader(a, "a")
    try:
        rb = _reader(b, "b")
    except BaseException:
        ra.close()
        raise
    try:
        names_a, names_b = ra.keys(), rb.keys()
        in_a, in_b = set(names_a), set(names_b)
        common = [n for n in names_a if n in in_b]
        it: Any = common
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(common, desc="diff", unit="tensor", leave=False)
        diffs, reshaped = [], []
        for name in it:
            sa, sb = ra.shape(name), rb.shape(name)
            if sa != sb:
                reshaped.append((name, sa, sb))
                continue
            diffs.append(_diff_tensor(name, ra, rb, top_k, block_elems, max_listed))
        notes = [f"a: {n}" for n in ra.notes] + [f"b: {n}" for n in rb.notes]
        return CheckpointDiff(diffs, [n for n in names_a if n not in in_b], [n for n in names_b if n not in in_a],
                              reshaped, _label(a, "a"), _label(b, "b"), notes)
    finally:
        ra.close()
        rb.close()


def _label(source: Side, default: str) -> str:
    if isinstance(source, nn.Module):
        return type(source).__name__
    if isinstance(source, Mapping):
        return default
    return str(source)


def diff_report(a: Side, b: Side, out_dir: Optional[PathLike] = None, format: str = "table",
                stream: Optional[TextIO] = None, top_k: int = 5, progress: bool = False) -> CheckpointDiff:
    """Everything ``circuits diff A B`` does: read both, compare, print, write files.

    Args:
        a, b: checkpoints (files, shard folders), modules or state dicts.
        out_dir: when given, ``diff.txt``, ``diff.json`` and ``diff.html`` are written there
            (atomically); it must be a folder (created if missing).
        format: what is printed: ``"table"`` (aligned text), ``"json"``, or ``"html"`` (writes
            ``out_dir/diff.html`` and prints its path; needs ``out_dir``).
        stream: where to print (default stdout).
        top_k: most-changed units per tensor.

    Returns:
        The :class:`CheckpointDiff`. Bad files raise :class:`circuits.models.WeightsError`, bad
        arguments :class:`DiffError` (a ``ValueError``).
    """
    out = H.output_folder(format, DIFF_FORMATS, out_dir, DiffError)
    result = diff_checkpoints(a, b, top_k=top_k, progress=progress)
    stream = stream or sys.stdout
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "diff.txt", result.to_text() + "\n")
        result.to_json(out / "diff.json")
        atomic_write_text(out / "diff.html", result.to_html())
    if format == "table":
        print(result.to_text(), file=stream)
    elif format == "json":
        print(result.to_json(), file=stream)
    else:
        print(str(out / "diff.html"), file=stream)  # type: ignore[operator]
    return result
