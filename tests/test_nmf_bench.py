"""The NMF benchmark's callable entry point (what the GPU suite calls) runs end to end on the
CPU at the tiny preset: both backends, both thread counts, the peer, the ratios."""

from __future__ import annotations

import pytest

from benchmarks import bench_nmf


def test_run_tiny_preset_reports_ratios_per_shape(capsys):
    out = bench_nmf.run(device="cpu", preset="tiny", threads=(1, 2), repeat=1)
    assert out["device"] == "cpu" and out["preset"] == "tiny"
    assert len(out["rows"]) == len(bench_nmf.PRESETS["tiny"])
    keys = {"auto/1", "auto/2", "torch/1", "torch/2"}
    for row in out["rows"]:
        assert set(row["speedup"]) == set(row["cpu_speedup"]) == keys
        assert all(v > 0 for v in [*row["speedup"].values(), *row["cpu_speedup"].values()])
        assert row["sklearn_s"] > 0 and row["err_ratio_max"] <= 1.02
    assert set(out["min_speedup"]) == set(out["min_cpu_speedup"]) == keys and out["worst_err_ratio"] <= 1.02
    printed = capsys.readouterr().out
    assert "sklearn" in printed and "auto/1 x" in printed
    table = bench_nmf.markdown_table(out)
    assert table.count("\n") == len(out["rows"]) + 1 and "| neurons | positions |" in table


def test_run_rejects_an_unknown_preset():
    with pytest.raises(ValueError, match="preset must be one of"):
        bench_nmf.run(preset="huge")
