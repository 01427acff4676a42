"""The `circuits` command line, end to end on FashionInception (in-process and as a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from circuits.cli import config_to_argv, main, parse_channels
from circuits.models import FASHION_WEIGHTS, FashionInception, load_model, save_state_dict

REPO = Path(__file__).resolve().parents[1]
FAST = ["--steps", "2", "--quiet"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """The trained FashionInception checkpoint (a random-init one only while it is being trained)."""
    if FASHION_WEIGHTS.is_file():
        return str(FASHION_WEIGHTS)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "fashion_random.safetensors"
    save_state_dict(FashionInception().state_dict(), path)
    return str(path)


@pytest.fixture(autouse=True)
def _restore_threads():
    """The CLI sets torch's thread count for small models; give the test session its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_parse_channels():
    assert parse_channels("0-3,7,2") == [0, 1, 2, 3, 7]
    assert parse_channels(None) is None
    with pytest.raises(ValueError, match="out of range"):
        parse_channels("5", 4)
    with pytest.raises(ValueError, match="bad channel"):
        parse_channels("a-b")


def test_layers_lists_shapes_and_params(capsys, checkpoint):
    code, out, err = _run(capsys, "layers", "--model", checkpoint, "--filter", "mixed3b")
    assert code == 0, err
    rows = {line.split()[0]: line for line in out.splitlines()[1:-1]}
    assert "160×14×14" in rows["mixed3b"]
    model = load_model("fashion-inception", weights=checkpoint)
    conv = dict(model.named_modules())["mixed3b_3x3_pre_relu_conv"]
    assert rows["mixed3b_3x3_pre_relu_conv"].split()[-1].replace(",", "") == str(sum(p.numel() for p in conv.parameters()))


def test_expand_saves_npz_and_prints_top_inputs(capsys, checkpoint, tmp_path):
    from circuits.expanded import connection_weights

    out_file = tmp_path / "e.npz"
    code, out, err = _run(capsys, "expand", "mixed3a", "mixed3b", "--channels", "60,61", "--top", "4",
                          "--model", checkpoint, "--out", str(out_file))
    assert code == 0, err
    with np.load(out_file) as f:
        w = f["weights"]
        assert f["channels"].tolist() == [60, 61]
        assert str(f["kind"]) == "expanded"
    model = load_model("fashion-inception", weights=checkpoint)
    ref = connection_weights(model, "mixed3a", "mixed3b", channels=[60, 61]).weights.numpy()
    np.testing.assert_allclose(w, ref, rtol=1e-5, atol=1e-7)
    norms = np.linalg.norm(w[0].reshape(w.shape[1], -1), axis=1)
    top = np.argsort(-norms)[:4]
    line = next(l for l in out.splitlines() if "mixed3b:60 ←" in l)
    printed = [int(tok.split(":")[1]) for tok in line.split("←")[1].replace(",", " ").split() if tok.startswith("mixed3a:")]
    assert printed == top.tolist()


def test_unknown_layer_lists_close_matches(capsys, checkpoint):
    code, out, err = _run(capsys, "expand", "mixed3a", "mixed3bb", "--model", checkpoint)
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "unknown layer 'mixed3bb'" in err and "mixed3b" in err.split("Did you mean")[1]


def test_bad_model_path(capsys, tmp_path):
    code, _, err = _run(capsys, "layers", "--model", str(tmp_path / "missing" / "model.pth"))
    assert code == 2 and "not found" in err and "Traceback" not in err
    garbage = tmp_path / "broken.safetensors"
    garbage.write_bytes(b"not a checkpoint")
    code, _, err = _run(capsys, "layers", "--model", str(garbage))
    assert code == 2 and "broken.safetensors" in err and err.count("\n") == 1
    code, _, err = _run(capsys, "layers", "--model", "fashion-inceptoin")
    assert code == 2 and "fashion-inception" in err


def test_channel_out_of_range(capsys, checkpoint, tmp_path):
    code, _, err = _run(capsys, "render", "mixed3a:999", "--model", checkpoint, "--out", str(tmp_path), *FAST)
    assert code == 2 and "0..111" in err
    assert not any(tmp_path.iterdir())


def _unwritable_dir(tmp_path: Path) -> Path:
    if os.geteuid() == 0:  # root writes through permissions: use a read-only file system
        if not os.path.isdir("/sys"):
            pytest.skip("running as root without /sys: no unwritable folder to test with")
        return Path("/sys/circuits-test-output")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return locked / "out"


def test_unwritable_output_folder(capsys, checkpoint, tmp_path):
    target = _unwritable_dir(tmp_path)
    code, out, err = _run(capsys, "explore", "--model", checkpoint, "--layers", "mixed3a", "--per-layer", "1",
                          "--out", str(target), *FAST)
    assert code == 2
    assert "cannot write to output folder" in err and str(target) in err and err.count("\n") == 1
    assert not target.exists()
    code, _, err = _run(capsys, "figure", "heatmap", "mixed3a:5", "--model", checkpoint, "--out", str(target / "f.png"), *FAST)
    assert code == 2 and "cannot write" in err


def test_render_writes_the_rendered_image(capsys, checkpoint, tmp_path):
    from PIL import Image

    from circuits.featurevis import render
    from circuits.figures.palette import to_uint8

    code, out, err = _run(capsys, "render", "mixed3a:3", "--model", checkpoint, "--out", str(tmp_path / "r"),
                          "--scale", "2", "--cache", str(tmp_path / "cache"), *FAST)
    assert code == 0, err
    png = tmp_path / "r" / "mixed3a_3.png"
    assert out.split()[0] == str(png)
    img = np.asarray(Image.open(png))
    assert img.shape == (56, 56)
    model = load_model("fashion-inception", weights=checkpoint)
    res = render(model, ["mixed3a:3"], steps=2, seed=0, cache=str(tmp_path / "cache"), progress=False)
    assert res.from_cache == [True]
    expected = to_uint8(res.images[0])  # the library's quantisation (float32 vs float64 rounding differs at .5)
    np.testing.assert_array_equal(img[::2, ::2], expected)


@pytest.mark.parametrize("kind", ["small-multiples", "family", "nmf"])
def test_figure_types(capsys, checkpoint, tmp_path, kind):
    out_file = tmp_path / f"{kind}.svg"
    code, out, err = _run(capsys, "figure", kind, "mixed3b:60", "--from", "mixed3a", "--top", "3", "--neurons", "60-61",
                          "--model", checkpoint, "--out", str(out_file), *FAST)
    assert code == 0, err
    assert out.strip() == str(out_file)
    text = out_file.read_text()
    assert text.lstrip().startswith("<?xml") and "mixed3b" in text


def test_figure_reports_a_branch_without_connection(capsys, checkpoint, tmp_path):
    code, _, err = _run(capsys, "figure", "heatmap", "mixed3b:5", "--from", "mixed3b_5x5_bottleneck",
                        "--model", checkpoint, "--out", str(tmp_path), *FAST)
    assert code == 2 and "another branch" in err


def test_nmf_command(capsys, checkpoint, tmp_path):
    code, out, err = _run(capsys, "nmf", "mixed3b", "--channels", "112-115", "--model", checkpoint, "--out", str(tmp_path), "--quiet")
    assert code == 0, err
    fractions = [float(l.split("explained")[1]) for l in out.splitlines() if "explained" in l]
    assert len(fractions) == 4 and all(0.0 <= f <= 1.0 for f in fractions)
    assert (tmp_path / "nmf_mixed3b_from_mixed3a_5x5.png").read_bytes().startswith(b"\x89PNG")


def test_run_config(capsys, checkpoint, tmp_path):
    cfg = tmp_path / "expand.yaml"
    cfg.write_text(f"command: expand\nfrom_layer: mixed3a\nto_layer: mixed3b\nchannels: '1'\nmodel: {checkpoint}\n"
                   f"out: {tmp_path / 'x.npz'}\nquiet: true\n")
    code, out, err = _run(capsys, "run", str(cfg))
    assert code == 0, err
    assert (tmp_path / "x.npz").is_file() and "mixed3b:1 ←" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("command: expand\nfrom_layer: mixed3a\nto_layer: mixed3b\ntop_kk: 3\n")
    code, _, err = _run(capsys, "run", str(bad))
    assert code == 2 and "unknown key 'top_kk'" in err and "top" in err
    code, _, err = _run(capsys, "run", str(tmp_path / "none.yaml"))
    assert code == 2 and "config file not found" in err


def test_example_configs_parse():
    argv = config_to_argv(REPO / "configs" / "explore_fashion.yaml")
    assert argv[0] == "explore" and "--top-k" in argv
    argv = config_to_argv(REPO / "configs" / "figure_small_multiples.yaml", overrides={"steps": 4})
    assert argv[:3] == ["figure", "small-multiples", "mixed3b:60"] and argv[argv.index("--steps") + 1] == "4"


def test_usage_errors(capsys):
    assert main(["--help"]) == 0
    assert main([]) == 2
    assert main(["figure", "bogus", "mixed3a:1"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_explore_in_process(capsys, checkpoint, tmp_path):
    code, out, err = _run(capsys, "explore", "--model", checkpoint, "--layers", "mixed3a", "--per-layer", "1",
                          "--top-k", "3", "--dataset-size", "32", "--out", str(tmp_path / "site"),
                          "--cache", str(tmp_path / "cache"), *FAST)
    assert code == 0, err
    index = tmp_path / "site" / "index.html"
    assert f"Open {index.resolve().as_uri()}" in out
    html = index.read_text()
    assert 'href="layers/mixed3a/index.html"' in html and "mixed3a:" in html


def test_python_dash_m_subprocess(checkpoint, tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    ok = subprocess.run([sys.executable, "-m", "circuits", "layers", "--model", checkpoint, "--filter", "mixed4a_5x5"],
                        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "mixed4a_5x5 " in ok.stdout and "32×7×7" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "circuits", "expand", "conv2d2", "mixd3a", "--model", checkpoint],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("circuits: error: unknown layer 'mixd3a'") and "mixed3a" in last


def test_run_experiment_config_with_weights_and_out_shortcuts(capsys, checkpoint, tmp_path):
    """`circuits run CONFIG --weights W --out DIR` = `--set weights=W out=DIR` (the way to point an
    InceptionV1 figure config at inception5h.pth)."""
    out_dir = tmp_path / "fig01"
    code, out, err = _run(capsys, "run", str(REPO / "configs" / "fig01_nmf_fashion.yaml"), "--weights", checkpoint,
                          "--out", str(out_dir))
    assert code == 0, err
    summary = json.loads((out_dir / "fig01_nmf.json").read_text())
    assert summary["model"]["weights"] == checkpoint and summary["model"]["meaningful"] is True
    assert str(out_dir / "fig01_nmf.png") in out.split()
    code, _, err = _run(capsys, "run", str(REPO / "configs" / "fig01_nmf_fashion.yaml"), "--weights",
                        str(tmp_path / "missing.pth"), "--out", str(tmp_path / "none"))
    assert code == 2 and "missing.pth" in err
