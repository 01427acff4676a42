"""TensorBoard logging over training, inspect_report, and the CLI entry (exit codes, no tracebacks)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from circuits.cli import main
from circuits.inspect import TensorBoardWeightLogger, inspect_report
from circuits.models import FashionInception, save_state_dict


pytestmark = pytest.mark.usefixtures("one_thread")


def test_tensorboard_logger_histograms_every_n_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import HISTOGRAMS, SCALARS, EventAccumulator

    torch.manual_seed(0)
    model = FashionInception()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    logged = []
    with TensorBoardWeightLogger(model, tmp_path / "run", every=2, bins=16) as logger:
        for step in range(5):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            logged.append(logger(step))
    assert logged == [True, False, True, False, True]
    acc = EventAccumulator(str(tmp_path / "run"), size_guidance={HISTOGRAMS: 0, SCALARS: 0})
    acc.Reload()
    names = [n for n, _ in model.named_parameters()]
    assert sorted(acc.Tags()["histograms"]) == sorted(f"weights/{n}" for n in names)
    for n, p in model.named_parameters():
        events = acc.Histograms(f"weights/{n}")
        assert [e.step for e in events] == [0, 2, 4]
        last = events[-1].histogram_value
        assert last.num == p.numel() and sum(last.bucket) == p.numel() and len(last.bucket) == 16
        assert last.min == pytest.approx(p.min().item()) and last.max == pytest.approx(p.max().item())
        assert last.sum_squares == pytest.approx((p.detach() ** 2).sum().item(), rel=1e-4)
    # the weights moved between logged steps, and the scalars say by how much
    w = "logits.weight"
    first, last = acc.Histograms(f"weights/{w}")[0].histogram_value, acc.Histograms(f"weights/{w}")[-1].histogram_value
    assert first.sum_squares != last.sum_squares
    norms = acc.Scalars(f"stats/{w}/fro_norm")
    assert [s.step for s in norms] == [0, 2, 4]
    assert norms[-1].value == pytest.approx(model.logits.weight.norm().item(), rel=1e-5)
    assert f"stats/{w}/dead_units" in acc.Tags()["scalars"]


def test_logger_rejects_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="nn.Module"):
        TensorBoardWeightLogger({"w": torch.ones(1)}, tmp_path)
    with pytest.raises(ValueError, match="every"):
        TensorBoardWeightLogger(torch.nn.Linear(2, 2), tmp_path, every=0)


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    state = FashionInception().state_dict()
    state["conv2d0_pre_relu_conv.weight"][4] = 0.0  # a planted dead filter
    return save_state_dict(state, tmp_path / "model.safetensors")


def test_inspect_report_from_checkpoint_writes_everything(tmp_path, checkpoint, capsys):
    out = tmp_path / "report"
    table = inspect_report(checkpoint, out_dir=out, format="html", embedding=False)
    printed = capsys.readouterr().out.strip()
    assert printed == str(out / "report.html")
    assert table["conv2d0_pre_relu_conv.weight"].dead_units == [4]
    recs = json.loads((out / "stats.json").read_text())
    assert [r["name"] for r in recs] == table.names()
    assert (out / "stats.csv").read_text().splitlines()[0].startswith("name,shape,dtype,numel")
    for png in ("histograms.png", "norms.png", "filters.png", "heatmap_logits.weight.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 4  # self-contained
    assert "3% of filters dead (1/32: 4)" in page and 'class="flag"' in page


def test_inspect_report_from_model_prints_table_and_graph(tmp_path, capsys):
    torch.manual_seed(0)
    model = FashionInception()
    inspect_report(model, out_dir=tmp_path, format="table", embedding=False,
                   image=torch.rand(1, 28, 28), activation_layer="conv2d1")
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["name", "shape", "params", "mean"]
    assert any(line.startswith("logits.weight") for line in lines)
    dot = (tmp_path / "architecture.dot").read_text()
    assert '"mixed4a_pool_reduce" -> "mixed4a";' in dot
    assert (tmp_path / "architecture.png").exists() and (tmp_path / "activations_conv2d1.png").exists()
    inspect_report(model.state_dict(), format="csv", plots=False)
    assert capsys.readouterr().out.startswith("name,shape,")


def _inspect(source, **kw) -> int:
    return main(["inspect", str(source), "--quiet"] + [a for k, v in kw.items() for a in (f"--{k.replace('_', '-')}", str(v))])


def _bad_inputs(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n" * 20)
    empty = tmp_path / "empty.pth"
    torch.save({}, empty)
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"w": torch.ones(3), "rng": np.random.default_rng(0)}, unsafe)
    return {
        text: "is a text file (starting 'not a checkpoint')",
        empty: "holds no tensors (empty state dict",
        unsafe: "imports numpy.random._pickle.__generator_ctor",
        tmp_path / "missing.safetensors": "not found",
        "resnet5O": "unknown model",
    }


def test_cli_bad_input_exit_2_one_line(tmp_path, capsys):
    for source, message in _bad_inputs(tmp_path).items():
        assert _inspect(source) == 2, source
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("circuits: error: ") and message in err, err
        assert "Traceback" not in err
    ok = tmp_path / "ok.safetensors"
    save_state_dict({"w": torch.randn(4, 4)}, ok)
    assert _inspect(ok, format="json") == 0
    assert json.loads(capsys.readouterr().out)[0]["name"] == "w"
    assert _inspect(ok, format="html") == 2  # html needs --out
    assert "--out" in capsys.readouterr().err


def test_module_entry_point_subprocess(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00" * 64)
    out = subprocess.run([sys.executable, "-m", "circuits", "inspect", str(bad)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.startswith("circuits: error:") and "Traceback" not in out.stderr
    good = tmp_path / "good.pth"
    torch.save({"fc.weight": torch.ones(3, 5)}, good)
    out = subprocess.run([sys.executable, "-m", "circuits", "inspect", str(good), "--format", "csv", "--quiet"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[1].startswith("fc.weight,3x5,float32,15,1.0,0.0")


def test_large_checkpoint_plots_every_tensor_and_says_what_it_sampled(tmp_path, capsys, monkeypatch):
    """The old report plotted only the first 256 MB of tensors; now every tensor is read once
    and the plots sample from all of them, saying so."""
    from bigfiles import write_sparse_safetensors
    from circuits.inspect.report import ReportLimits

    rows, cols, n = 2560, 4096, 10  # 10 x 40 MiB float32: 400 MiB, a sparse file
    path = tmp_path / "big.safetensors"
    write_sparse_safetensors(path, n, rows, cols, lambda i: np.full((4, cols), i + 1, np.float32))  # 4 live rows
    monkeypatch.setattr(ReportLimits, "max_histograms", 6)
    out = tmp_path / "r"
    from circuits.inspect import StatsConfig

    inspect_report(path, out_dir=out, format="html", config=StatsConfig(spectral="none"), embedding=False)
    page = (out / "report.html").read_text()
    assert "histograms: every finite value of 6 of 10 weight tensors (evenly spaced)" in page
    assert "heatmap of layer0.weight (2560, 4096): every value, block-mean pooled 10x16" in page
    assert "spectral norms and diagnostics: not computed" in page
    inspect_report(path, out_dir=out, format="table", config=StatsConfig(spectral="none"), embedding=False, max_heatmaps=0)
    text = capsys.readouterr().out
    assert "covers: histograms: every finite value of 6 of 10 weight tensors (evenly spaced)" in text


def test_report_shows_nan_units_and_spectral_columns(tmp_path):
    state = load_model_state()
    state["logits.weight"][3, 7] = float("nan")
    save_state_dict(state, tmp_path / "m.safetensors")
    out = tmp_path / "r"
    table = inspect_report(tmp_path / "m.safetensors", out_dir=out, format="html", embedding=False)
    assert table["logits.weight"].nan_units == [3]
    page = (out / "report.html").read_text()
    assert "<td>1 in 3</td>" in page and "contains 1 NaN (in 1 of 10 rows: 3)" in page
    assert "alpha (fit)" in page and "(good, D=" in page
    recs = json.loads((out / "stats.json").read_text())
    rec = {r["name"]: r for r in recs}
    assert rec["logits.weight"]["nan_units"] == [3] and rec["logits.weight"]["alpha"] is None
    assert len(rec["mixed4a_3x3_pre_relu_conv.weight"]["singular_values"]) == 96
    for png in ("alphas.png", "spectra.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def load_model_state():
    from circuits.models import load_model

    return {k: v.clone() for k, v in load_model().state_dict().items()}


def test_report_tables_flag_nan_and_inf_instead_of_leaving_them_blank():
    from circuits.inspect import html as H

    out = H.table(["tensor", "mean", "std"], [["a", float("nan"), 1.5], ["b", float("inf"), None]], [True, False])
    assert out.count('class="circuits-nan"') == 2 and ">NaN<" in out and "+Inf" in out
    assert "<td>1.5</td>" in out and "<td></td>" in out and out.count('class="flag"') == 1
    assert H.cell([1, 2, 3]) == "1, 2, 3" and "NaN" in H.cell(float("nan"))
