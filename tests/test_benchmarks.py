"""Smoke tests for the benchmark scripts: tiny problems, so a broken benchmark is caught by CI.
(Timings are never asserted; benchmarks/RESULTS.md holds the real figures.)"""

from __future__ import annotations

import datetime
import math
import time

import numpy as np
import pytest
import torch

from benchmarks import __main__ as bench_main
from benchmarks import bench_nmf, gpu_suite
from benchmarks.gpu_suite import Goal, Measured, Part, run_part, verdict


def test_bench_nmf_runs_both_backends_and_reports_parity(capsys):
    out = bench_nmf.main(["--neurons", "6", "--in-channels", "8", "--kernel", "3", "--max-iter", "20",
                          "--threads", "1", "--no-lucent"])
    printed = capsys.readouterr().out
    assert "backend=auto" in printed and "backend=torch" in printed and "speedup x" in printed
    assert set(out["ours_by_threads"]) == {"auto/1", "torch/1"}
    assert out["ratio_max"] <= 1.02  # every neuron within 2% of sklearn's error at the same budget
    assert out["speedup"] > 0 and out["torch_backend_s"] > 0


def test_bench_startup_reports_the_cli_cold_start(capsys):
    from benchmarks import bench_startup

    out = bench_startup.main(["--repeat", "1", "--no-peer"])  # the peers cost ~15 s of imports
    printed = capsys.readouterr().out
    assert "circuits --help" in printed and "goal < 1.5 s" in printed
    assert out["ours_s"] > 0


def test_gpu_suite_runs_end_to_end_at_tiny_sizes_on_the_cpu(tmp_path, one_thread, monkeypatch, capsys):
    """``python -m benchmarks --gpu-suite`` at tiny sizes on the CPU: every part runs, and the
    dated section with one row per goal is appended to the results file (its old text kept)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # Lucent and the suite pick the CPU
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nearlier figures\n")
    # exit status 0: no part raised or ran past its 30 s budget (the guard against a tiny run ballooning)
    code = bench_main.main(["--gpu-suite", "--preset", "tiny", "--results", str(results)])
    printed = capsys.readouterr().out
    assert code == 0, printed[-3000:]

    text = results.read_text()
    assert text.startswith("# Benchmark results\n\nearlier figures\n")
    assert "## GPU suite — " in text and "preset `tiny` on `cpu`" in text and "no GPU" in text
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in gpu_suite.PART_NAMES:
            rows[cells[0]] = dict(zip(gpu_suite.HEADER, cells))
    assert set(rows) == {"nmf", "expanded", "featurevis", "mixed3b", "atlas"}
    for name, row in rows.items():
        assert row["ratio"].startswith("x") and math.isfinite(float(row["ratio"][1:])), (name, row)
        assert float(row["ratio"][1:]) > 0, (name, row)
        assert float(row["ours"].removesuffix(" s")) > 0, (name, row)
        assert row["verdict"] == "not measured on CPU", (name, row)
        assert row["goal"] == next(p.goal.text for p in gpu_suite.PARTS if p.name == name)
    # the peers ran: the nmf, expanded, featurevis and atlas rows carry the peer's time
    assert all(rows[n]["peer"].endswith(" s") for n in ("nmf", "expanded", "featurevis", "atlas"))


def test_gpu_suite_verdicts_budgets_and_errors():
    """pass/FAIL only for a GPU run at the gpu preset; a part past its budget is stopped; a part
    that raises or returns a non-finite number is an error, never a figure."""
    cuda, cpu = torch.device("cuda:0"), torch.device("cpu")
    at_least_5 = Goal("≥ 5x", 5.0)
    assert verdict(at_least_5, 5.0, "gpu", cuda) == "pass"
    assert verdict(at_least_5, 4.9, "gpu", cuda) == "FAIL"
    assert verdict(at_least_5, 9.0, "tiny", cuda) == "not measured at tiny sizes"
    assert verdict(at_least_5, 9.0, "tiny", cpu) == "not measured on CPU"
    window = Goal("0.7–1.3", 0.7, 1.3)
    assert window.met(1.0) and not window.met(1.4) and not window.met(0.6)

    def slow(preset, dev):
        time.sleep(5)
        return Measured(1.0, 1.0, 1.0, "a", "b")

    t0 = time.perf_counter()
    row = run_part(Part("slow", at_least_5, {"tiny": 0.2}, slow), "tiny", cpu)
    assert row.verdict == "timed out" and time.perf_counter() - t0 < 3 and not math.isfinite(row.ratio)

    def broken(preset, dev):
        raise RuntimeError("no kernel for this shape")

    row = run_part(Part("broken", at_least_5, {"tiny": 5}, broken), "tiny", cpu)
    assert row.verdict == "error" and "no kernel for this shape" in row.notes

    row = run_part(Part("nan", at_least_5, {"tiny": 5}, lambda p, d: Measured(float("nan"), 1.0, float("nan"), "a", "b")),
                   "tiny", cpu)
    assert row.verdict == "error" and "non-finite" in row.notes
    result = gpu_suite.SuiteResult("tiny", "cpu", "m", datetime.datetime.now(datetime.timezone.utc), 1.0, [row])
    assert not result.ok and "| nan | — | 1.000 s | — |" in gpu_suite.table(result)

    with pytest.raises(ValueError, match="needs a CUDA device"):
        gpu_suite.run_suite("gpu", "cpu")
    with pytest.raises(ValueError, match="unknown part"):
        gpu_suite.run_suite("tiny", "cpu", ["nmf", "fft"])


def test_bench_nmf_peer_subset_is_scaled_to_all_neurons(monkeypatch):
    """With ``peer_neurons`` the sklearn loop sees only that many matrices and its time is scaled
    by neurons ÷ peer_neurons (what the GPU suite uses to keep its large batches to minutes)."""
    seen = []

    def fake_peer(Xn, k, max_iter, tol, threads):
        seen.append(len(Xn))
        return 0.5, 0.25, np.full(len(Xn), 1.0)

    monkeypatch.setattr(bench_nmf, "_sklearn_time", fake_peer)
    out = bench_nmf.run("cpu", "tiny", threads=(1,), backends=("torch",), repeat=1, peer_neurons=4, verbose=False)
    assert seen == [4, 4]
    for row in out["rows"]:
        assert row["peer_neurons"] == 4
        assert row["sklearn_s"] == pytest.approx(0.5 * row["neurons"] / 4)
        assert row["sklearn_cpu_s"] == pytest.approx(0.25 * row["neurons"] / 4)
        assert row["speedup"]["torch/1"] == pytest.approx(row["sklearn_s"] / row["ours_s"]["torch/1"])
