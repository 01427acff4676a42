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


def test_option_study_runs_and_compares_to_the_defaults(monkeypatch, capsys) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    bench = importlib.import_module("benchmarks.bench_featurevis_options")
    # "defaults" is put first even when named last; compile is left out (inductor takes minutes)
    out = bench.main(["--sets", "fashion", "--steps", "3", "--channels", "2", "--options", "nchw,bf16,cosine,defaults"])
    printed = capsys.readouterr().out
    res = out["fashion"]
    assert list(res) == ["defaults", "nchw", "bf16", "cosine"]
    base = res["defaults"]
    assert base["speedup"] == 1.0 and base["delta"] == 0.0
    for name, entry in res.items():
        assert "error" not in entry and ("same_as" in entry) == (name == "cosine"), (name, entry)
        assert entry["ms_per_step"] > 0 and entry["warmup_s"] > 0
        assert entry["speedup"] == pytest.approx(base["ms_per_step"] / entry["ms_per_step"])
        assert 0 <= entry["not_positive"] <= 2 and 0.0 <= entry["delta"] <= 1.0
    # channels-last vs NCHW is the same computation: the images agree to float rounding
    assert res["nchw"]["delta"] < 1e-2
    # at 28 px the defaults already are the cosine schedule from lr 0.1: reported, not rerun
    assert res["cosine"]["same_as"] == "defaults" and res["cosine"]["seconds"] == base["seconds"]
    assert "fashion] nchw: " in printed and "vs defaults" in printed
    with pytest.raises(SystemExit, match="unknown option"):
        bench.main(["--sets", "fashion", "--options", "defaults,fp8"])
