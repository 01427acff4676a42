"""Smoke test of the time-to-quality benchmark (tiny sizes; timings are never asserted)."""

from __future__ import annotations

import importlib
import statistics
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


def test_time_to_quality_benchmark_runs(monkeypatch, tmp_path, capsys) -> None:
    pytest.importorskip("lucent")
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    bench = importlib.import_module("benchmarks.bench_featurevis")
    out = bench.main(["--sets", "fashion,inceptionv1", "--steps", "4", "--every", "2", "--ladder", "2,4,8",
                      "--channels", "2", "--grid", str(tmp_path)])
    printed = capsys.readouterr().out
    for name in ("fashion", "inceptionv1"):
        res = out[name]
        assert set(res["lucent_medians"]) == {2, 4}
        assert res["bar"] == res["lucent_medians"][4]
        assert 0 < res["lucent_to_quality_s"] <= res["lucent_s"]
        assert set(res["ours"]) == set(bench.CONFIGS)
        for entry in res["ours"].values():
            assert entry["steps"] in (2, 4, 8) and entry["seconds"] > 0
            assert entry["reached"] == (entry["median"] >= res["bar"])
            assert entry["values"].shape == (2,) and statistics.median(entry["values"].tolist()) == pytest.approx(entry["median"])
        assert statistics.median(res["lucent_values"].tolist()) == pytest.approx(res["bar"])
        assert (tmp_path / f"featurevis_{name}.png").is_file()
    assert "Lucent batched: 4 steps" in printed and "(the bar)" in printed
    assert "Lucent batched at 4 steps, per target: " in printed and " of 2 not positive" in printed
