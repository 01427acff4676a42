"""Checkpoint diff: NaN-aware, empty-safe, added/removed/reshaped, streamed in bounded memory."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bigfiles import run_measured, write_sparse_safetensors
from circuits.cli import main
from circuits.inspect import DiffError, diff_checkpoints, diff_report
from circuits.models import FashionInception, load_model, save_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")
NAN, INF = float("nan"), float("inf")


def _reference(a: torch.Tensor, b: torch.Tensor) -> dict:
    """The figures computed the obvious way, in float64, over the positions finite on both sides."""
    a, b = a.double().reshape(a.shape[0] if a.dim() >= 2 else -1, -1), b.double().reshape(b.shape[0] if b.dim() >= 2 else -1, -1)
    both = torch.isfinite(a) & torch.isfinite(b)
    a0, b0 = torch.where(both, a, 0.0), torch.where(both, b, 0.0)
    d = b0 - a0
    na, nb, nd = a0.norm().item(), b0.norm().item(), d.norm().item()
    same_nonfinite = (~torch.isfinite(a) & ~torch.isfinite(b) & ((a.isnan() & b.isnan()) | (a == b)))
    mismatch = ~both & ~same_nonfinite
    changed_rows = ((d != 0) | mismatch).any(dim=1)
    return {"rel": nd / na if na else (0.0 if nd == 0 else INF), "cos": (a0 * b0).sum().item() / (na * nb) if na and nb else NAN,
            "max": d.abs().max().item() if d.numel() else 0.0, "changed": torch.nonzero(changed_rows).flatten().tolist(),
            "row_d": d.norm(dim=1)}


def test_nan_in_both_at_the_same_place_is_not_a_change(tmp_path):
    a = torch.randn(6, 5)
    a[2, 3] = NAN
    a[4, 0] = INF
    b = a.clone()
    b[1, 1] += 0.5
    save_state_dict({"w": a}, tmp_path / "a.safetensors")
    save_state_dict({"w": b}, tmp_path / "b.safetensors")
    d = diff_checkpoints(tmp_path / "a.safetensors", tmp_path / "b.safetensors")["w"]
    assert math.isfinite(d.rel_change) and d.changed_units == [1]
    assert d.nonfinite_same == 2 and d.nonfinite_changed == 0
    ref = _reference(a, b)
    assert d.rel_change == pytest.approx(ref["rel"]) and d.max_abs_change == pytest.approx(0.5)
    assert any("NaN/Inf on both sides" in f for f in d.flags)
    # a NaN that appears is a change, located by unit, and flagged
    c = a.clone()
    c[5, 2] = NAN
    d = diff_checkpoints({"w": a}, {"w": c})["w"]
    assert d.nonfinite_changed == 1 and d.nonfinite_changed_units == [5] and d.changed_units == [5]
    assert d.rel_change == 0.0 and any("NaN/Inf pattern differs at 1 values (units 5)" in f for f in d.flags)
    # +inf -> -inf is a change too
    e = a.clone()
    e[4, 0] = -INF
    assert diff_checkpoints({"w": a}, {"w": e})["w"].nonfinite_changed_units == [4]


def test_empty_tensors_never_raise(tmp_path):
    a = {"e0": torch.zeros(0, 4), "e1": torch.zeros(3, 0), "e2": torch.zeros(0), "w": torch.ones(2, 2)}
    b = {k: v.clone() for k, v in a.items()}
    save_state_dict(a, tmp_path / "a.safetensors")
    torch.save(b, tmp_path / "b.pth")
    d = diff_checkpoints(tmp_path / "a.safetensors", tmp_path / "b.pth")
    for name in ("e0", "e1", "e2"):
        t = d[name]
        assert (t.rel_change, t.max_abs_change, t.n_changed) == (0.0, 0.0, 0) and math.isnan(t.cosine)
        assert t.flags == ["empty tensor: nothing to compare (no cosine)"]
    assert d["w"].cosine == pytest.approx(1.0) and d["w"].flags == []


def test_added_removed_reshaped_and_dtype(tmp_path):
    a = {"kept": torch.ones(3), "gone": torch.ones(2), "grown": torch.ones(4, 3), "half": torch.ones(2)}
    b = {"kept": torch.ones(3), "new": torch.ones(5), "grown": torch.ones(5, 3), "half": torch.ones(2).half()}
    d = diff_checkpoints(a, b)
    assert d.removed == d.only_in_a == ["gone"] and d.added == d.only_in_b == ["new"]
    assert d.reshaped == [("grown", (4, 3), (5, 3))]
    assert [t.name for t in d.tensors] == ["kept", "half"]
    assert d["half"].flags == ["dtype changed: float32 -> float16"] and d["half"].n_changed == 0
    text = d.to_text()
    for line in ("added (only in b): new", "removed (only in a): gone", "reshaped: grown (4, 3) -> (5, 3)"):
        assert line in text
    rec = json.loads(d.to_json())
    assert rec["only_in_b"] == ["new"] and rec["shape_mismatch"] == [["grown", [4, 3], [5, 3]]]


def test_zero_side_is_flagged_not_silent():
    d = diff_checkpoints({"b": torch.zeros(4)}, {"b": torch.tensor([0.0, 0.5, 0, 0])})["b"]
    assert d.rel_change == INF and math.isnan(d.cosine)
    assert any("a is all zeros" in f for f in d.flags) and any("no cosine" in f for f in d.flags)
    assert d.top_units == [(1, INF)]
    rec = json.loads(json.dumps(d.to_record()))
    assert rec["rel_change"] == "inf" and rec["cosine"] is None


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 9), cols=st.integers(1, 7), block=st.integers(1, 40),
       n_nan=st.integers(0, 3))
def test_matches_a_reference_for_any_block_size(seed, rows, cols, block, n_nan):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, cols, generator=g)
    b = a + (torch.rand(rows, cols, generator=g) < 0.3) * torch.randn(rows, cols, generator=g)
    for k in range(n_nan):
        i, j = (seed + 7 * k) % rows, (seed + 3 * k) % cols
        a[i, j] = NAN
        if k % 2:
            b[i, j] = NAN
    d = diff_checkpoints({"w": a}, {"w": b}, top_k=3, block_elems=block)["w"]
    ref = _reference(a, b)
    assert d.rel_change == pytest.approx(ref["rel"], rel=1e-12, abs=1e-15)
    assert d.max_abs_change == pytest.approx(ref["max"])
    assert (math.isnan(d.cosine) and math.isnan(ref["cos"])) or d.cosine == pytest.approx(ref["cos"], rel=1e-12)
    assert d.changed_units == ref["changed"]
    expect_top = [i for i in torch.argsort(-ref["row_d"], stable=True).tolist() if ref["row_d"][i] > 0][:3]
    assert sorted(i for i, _ in d.top_units) == sorted(expect_top)


def test_trained_vs_initial_weights_of_the_bundled_model(tmp_path):
    torch.manual_seed(0)
    trained = load_model().state_dict()
    init = FashionInception().state_dict()
    d = diff_checkpoints(init, trained)
    assert d.added == d.removed == d.reshaped == []
    w = d["logits.weight"]
    a, b = init["logits.weight"].double(), trained["logits.weight"].double()
    assert w.rel_change == pytest.approx(((b - a).norm() / a.norm()).item(), rel=1e-12)
    assert w.cosine == pytest.approx((a * b).sum().item() / (a.norm() * b.norm()).item(), rel=1e-12)
    assert w.changed_units == list(range(10))
    row = (b - a).norm(dim=1)
    assert w.top_units[0][0] == int(row.argmax())


def test_diff_report_writes_text_json_html_and_prints(tmp_path, capsys):
    a = {"w": torch.ones(3, 3), "x": torch.ones(2)}
    b = {"w": torch.ones(3, 3) * 2, "y": torch.ones(2)}
    save_state_dict(a, tmp_path / "a.safetensors")
    save_state_dict(b, tmp_path / "b.safetensors")
    out = tmp_path / "report"
    res = diff_report(tmp_path / "a.safetensors", tmp_path / "b.safetensors", out_dir=out, format="html")
    assert capsys.readouterr().out.strip() == str(out / "diff.html")
    page = (out / "diff.html").read_text()
    assert "data:image/png;base64," in page and "Added (only in b)" in page and "<td>w</td>" in page
    assert json.loads((out / "diff.json").read_text())["tensors"][0]["rel_change"] == pytest.approx(1.0)
    assert (out / "diff.txt").read_text().startswith("name")
    assert res["w"].rel_change == pytest.approx(1.0)
    diff_report(a, b, format="json")
    assert json.loads(capsys.readouterr().out)["only_in_a"] == ["x"]
    with pytest.raises(DiffError, match="needs an output folder"):
        diff_report(a, b, format="html")
    (tmp_path / "file").write_text("")
    with pytest.raises(DiffError, match="exists and is not a folder"):
        diff_report(a, b, out_dir=tmp_path / "file")


def test_bad_file_is_a_weights_error_exit_2(tmp_path):
    (tmp_path / "a.pth").write_text("not weights")
    save_state_dict({"w": torch.ones(2)}, tmp_path / "b.safetensors")
    from circuits.models import WeightsError

    with pytest.raises(WeightsError, match="is a text file"):
        diff_report(tmp_path / "a.pth", tmp_path / "b.safetensors")
    assert main(["inspect", str(tmp_path / "a.pth")]) == 2


ROWS, COLS, N_TENSORS = 8192, 4096, 8  # 8 x 128 MiB float32 = 1 GiB per file


def _write_big(path, changed: bool) -> None:
    """A sparse 1 GiB safetensors file: per tensor 64 random rows, then zeros (a file hole)."""
    def live(i: int) -> np.ndarray:
        block = np.random.default_rng(i).standard_normal((64, COLS)).astype(np.float32)
        if changed and i == 3:
            block[10] += 1.0  # one changed unit in one tensor
        return block

    write_sparse_safetensors(path, N_TENSORS, ROWS, COLS, live)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc")
def test_1gib_pair_is_diffed_in_bounded_memory(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    try:
        _write_big(a, False)
        _write_big(b, True)
        size = a.stat().st_size
        assert size >= 1 << 30
        res = run_measured("""
            from circuits.inspect import diff_checkpoints
            result = diff_checkpoints(sys.argv[1], sys.argv[2], top_k=3).to_dict()
        """, a, b)
    finally:
        a.unlink(missing_ok=True)
        b.unlink(missing_ok=True)
    grown = (res["peak"] - res["base"]) * 1024
    assert grown < 0.25 * size, f"peak RSS grew by {grown / 2**20:.0f} MiB for two {size / 2**20:.0f} MiB files"
    tensors = {t["name"]: t for t in res["result"]["tensors"]}
    assert len(tensors) == N_TENSORS
    changed = tensors["layer3.weight"]
    assert changed["changed_units"] == [10] and changed["top_units"][0][0] == 10
    assert changed["max_abs_change"] == pytest.approx(1.0)
    assert all(t["n_changed"] == 0 for n, t in tensors.items() if n != "layer3.weight")
