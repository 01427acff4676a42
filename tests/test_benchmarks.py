"""Smoke tests for the benchmark scripts: tiny problems, so a broken benchmark is caught by CI.
(Timings are never asserted; benchmarks/RESULTS.md holds the real figures.)"""

from __future__ import annotations

from benchmarks import bench_nmf


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
