"""Checkpoints without the model's code: streaming, memory bound, bad files, diffs."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from bigfiles import run_measured, write_sparse_safetensors
from circuits.inspect import CheckpointReader, checkpoint_stats, diff_checkpoints, weight_stats
from circuits.models import FashionInception, save_state_dict

ROWS, COLS, N_TENSORS, LIVE_ROWS = 8192, 4096, 8, 64  # 8 x 128 MiB float32 = 1 GiB
TENSOR_BYTES = ROWS * COLS * 4


def _live_block(i: int) -> np.ndarray:
    return np.random.default_rng(i).standard_normal((LIVE_ROWS, COLS)).astype(np.float32)


def _write_big_safetensors(path) -> None:
    """1 GiB safetensors: per tensor a 1 MiB random block (its first 64 rows), then a hole."""
    write_sparse_safetensors(path, N_TENSORS, ROWS, COLS, _live_block)


def _inspect_in_child(path) -> dict:
    res = run_measured("""
        from circuits.inspect import checkpoint_stats
        result = checkpoint_stats(sys.argv[1], spectral="power", power_iters=2).to_records()
    """, path, timeout=300)
    return {"base": res["base"], "peak": res["peak"], "rows": res["result"]}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc")
def test_1gib_safetensors_streams_with_bounded_memory(tmp_path):
    path = tmp_path / "big.safetensors"
    try:
        _write_big_safetensors(path)
        size = path.stat().st_size
        assert size >= 1 << 30
        res = _inspect_in_child(path)
    finally:
        path.unlink(missing_ok=True)
    grown = (res["peak"] - res["base"]) * 1024
    assert grown < 0.5 * size, f"peak RSS grew by {grown / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB file"
    rows = res["rows"]
    assert [r["name"] for r in rows] == [f"layer{i}.weight" for i in range(N_TENSORS)]
    for i, r in enumerate(rows):
        live = _live_block(i).astype(np.float64)
        full_n = ROWS * COLS
        mean = live.sum() / full_n
        std = np.sqrt((live ** 2).sum() / full_n - mean ** 2)
        assert r["numel"] == full_n
        assert r["mean"] == pytest.approx(mean, rel=1e-4, abs=1e-7)
        assert r["std"] == pytest.approx(std, rel=1e-4)
        assert r["dead_units"] == list(range(LIVE_ROWS, ROWS))
        assert r["spectral_method"] == "power" and r["spectral_norm"] > 0
        assert r["max"] == pytest.approx(float(live.max()))


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc")
def test_1gib_pth_mmap_streams_with_bounded_memory(tmp_path):
    raw = tmp_path / "zeros.raw"
    with open(raw, "wb") as f:  # a sparse 128 MiB file, memory-mapped 8 times as 8 storages
        f.write(_live_block(0).tobytes())
        f.truncate(TENSOR_BYTES)
    path = tmp_path / "big.pth"
    try:
        state = {f"layer{i}.weight": torch.from_file(str(raw), shared=False, size=ROWS * COLS).view(ROWS, COLS)
                 for i in range(N_TENSORS)}
        torch.save(state, path)
        del state
        raw.unlink()
        size = path.stat().st_size
        assert size >= 1 << 30
        res = _inspect_in_child(path)
    finally:
        path.unlink(missing_ok=True)
    grown = (res["peak"] - res["base"]) * 1024
    assert grown < 0.5 * size, f"peak RSS grew by {grown / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB file"
    assert all(r["dead_units"] == list(range(LIVE_ROWS, ROWS)) for r in res["rows"])


@pytest.fixture
def small_state():
    torch.manual_seed(0)
    state = FashionInception().state_dict()
    state["extra.half"] = torch.randn(5, 3).half()
    state["extra.count"] = torch.tensor(7)
    return state


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_checkpoint_stats_equal_in_memory_stats(tmp_path, small_state, suffix):
    path = save_state_dict(small_state, tmp_path / f"m{suffix}")
    from_file = checkpoint_stats(path)
    in_memory = weight_stats(small_state)
    assert sorted(from_file.names()) == sorted(in_memory.names())
    for r in in_memory:
        f = from_file[r.name]
        for k in ("mean", "std", "min", "max", "fro_norm", "skew", "numel", "dead_units"):
            a, b = getattr(f, k), getattr(r, k)
            assert a == b or (isinstance(a, float) and (np.isnan(a) and np.isnan(b) or a == pytest.approx(b))), (r.name, k)
    assert [n for n, _ in from_file.skipped] == ["extra.count"]
    with CheckpointReader(path) as reader:
        assert torch.equal(reader.get("logits.weight"), small_state["logits.weight"])
        assert reader.get("extra.half").dtype == torch.float16


def test_wrapped_pth_is_unwrapped(tmp_path):
    torch.save({"epoch": 3, "state_dict": {"w": torch.ones(2, 2)}}, tmp_path / "c.pth")
    table = checkpoint_stats(tmp_path / "c.pth")
    assert table.names() == ["w"]
    assert table.notes == ["weights read from 'state_dict'", "skipped epoch: not a tensor (int)"]
    assert "note: skipped epoch: not a tensor (int)" in table.to_text()


def test_diff_checkpoints_on_known_pair(tmp_path):
    torch.manual_seed(0)
    a = {"conv.weight": torch.randn(8, 3, 3, 3), "fc.weight": torch.randn(4, 10), "fc.bias": torch.zeros(4),
         "only_a": torch.ones(1), "shape": torch.ones(3)}
    b = {k: v.clone() for k, v in a.items() if k != "only_a"}
    b["conv.weight"][6] += 1.0          # unit 6 moves by ||1|| = sqrt(27)
    b["conv.weight"][2] += 0.1          # unit 2 moves by 0.1 * sqrt(27)
    b["fc.bias"][1] = 0.5               # ||a|| = 0 -> infinite relative change
    b["shape"] = torch.ones(4)
    b["only_b"] = torch.ones(1)
    save_state_dict(a, tmp_path / "a.safetensors")
    torch.save(b, tmp_path / "b.pth")
    for left, right in [(tmp_path / "a.safetensors", tmp_path / "b.pth"), (a, b)]:
        d = diff_checkpoints(left, right, top_k=3)
        conv = d["conv.weight"]
        expected = (torch.full((2, 27), 1.0) * torch.tensor([[1.0], [0.1]])).norm().item()
        assert conv.norm_diff == pytest.approx(expected, rel=1e-5)
        assert conv.rel_change == pytest.approx(expected / a["conv.weight"].norm().item(), rel=1e-5)
        assert [i for i, _ in conv.top_units] == [6, 2]
        assert conv.top_units[0][1] == pytest.approx(27 ** 0.5 / a["conv.weight"][6].norm().item(), rel=1e-5)
        assert d["fc.weight"].rel_change == 0.0 and d["fc.weight"].top_units == []
        assert d["fc.bias"].rel_change == float("inf") and d["fc.bias"].top_units[0][0] == 1
        assert d.only_in_a == ["only_a"] and d.only_in_b == ["only_b"]
        assert d.shape_mismatch == [("shape", (3,), (4,))]
        assert d.most_changed(1)[0].name == "fc.bias"
        assert "conv.weight" in d.to_text() and json.loads(d.to_json())["only_in_b"] == ["only_b"]
