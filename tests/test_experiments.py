"""Every figure script and the bottleneck study, end to end on random-init models with tiny budgets.

One random-init InceptionV1 (the session fixture ``inception``) and one random-init
FashionInception are shared by all runs; feature visualization uses 1 step at 32 px.
The assertions are on the numbers each script saves.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from circuits.experiment import ExperimentError, apply_overrides, find_experiment, run_experiment
from circuits.layers import get_layer
from circuits.nmf import family_factors, neuron_factors, weight_banding

pytestmark = pytest.mark.usefixtures("one_thread")


ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
TINY = {"render.steps": 1, "render.size": 32, "render.resize_to": 32, "render.cache": False,
        "render.progress": False, "formats": ["png"], "dpi": 40, "nmf.max_iter": 50}


@pytest.fixture(scope="module")
def fashion_random():
    from circuits.models import FashionInception

    torch.manual_seed(0)
    return FashionInception().eval()


def _run(name: str, model, tmp_path: Path, **extra):
    ov = dict(TINY, model=model, out=str(tmp_path / name), **extra)
    res = run_experiment(CONFIGS / f"{name}.yaml", ov)
    for f in res["files"]:
        assert Path(f).is_file() and Path(f).stat().st_size > 0, f
    return res


def _load(res: dict, stem: str):
    out = Path(res["out"])
    return np.load(out / f"{stem}.npz"), json.loads((out / f"{stem}.json").read_text())


def test_every_article_config_has_a_script_and_a_fashion_twin():
    names = sorted(p.stem for p in CONFIGS.glob("fig[0-9]*.yaml") if not p.stem.endswith("_fashion"))
    assert len(names) == 11  # figures 1, 2, 3-4, 5, 6, 7, 8, 9, 10, 11-12, 13
    for n in names:
        assert (CONFIGS / f"{n}_fashion.yaml").is_file()
        assert find_experiment(n).is_file()


def test_fig01_nmf(inception, tmp_path):
    res = _run("fig01_nmf", inception, tmp_path, neurons=[0, 3, 5])
    d, js = _load(res, "fig01_nmf")
    assert js["neurons"] == [0, 3, 5] and js["layer"] == "mixed4d_5x5"
    assert d["spatial"].shape == (3, 3, 5, 5) and d["rgb"].shape == (3, 40, 40, 3)
    w = get_layer(inception, "mixed4d_5x5_pre_relu_conv").weight.detach()
    f = neuron_factors(w, 3, [0, 3, 5], max_iter=50)
    np.testing.assert_allclose(d["explained"], f.explained.numpy(), atol=1e-6)
    np.testing.assert_allclose(d["loadings"], f.loadings.numpy(), atol=1e-6)
    assert (d["spatial"] >= 0).all() and np.allclose(d["spatial"].max(axis=(2, 3)), 1.0)
    assert js["mean_explained"] == pytest.approx(float(f.explained.mean()), abs=1e-6)


def test_fig02_banding_is_measured_on_mixed5b_5x5(inception, tmp_path):
    res = _run("fig02_banding", inception, tmp_path)
    d, js = _load(res, "fig02_banding")
    assert js["layer"] == "mixed5b_5x5" and js["baseline_layer"] == "mixed3b_5x5"
    conv = get_layer(inception, "mixed5b_5x5_pre_relu_conv")
    assert d["scores"].shape == (conv.out_channels,)
    expect = weight_banding(conv.weight.detach(), 3, max_iter=50).numpy()
    np.testing.assert_allclose(d["scores"], expect, atol=1e-5)
    assert js["mean_score"] == pytest.approx(float(expect.mean()), abs=1e-6)
    assert list(d["shown"]) == list(np.argsort(-expect, kind="stable")[:8])
    assert abs(js["mean_score"]) < 0.1  # random init: no banding


def test_fig03_04_top_inputs(inception, tmp_path):
    res = _run("fig03_04_top_inputs", inception, tmp_path, top_n=4)
    d, js = _load(res, "fig04_small_multiples")
    assert js["target"] == "mixed3b:342" and js["kind"] == "expanded"
    norms = np.sqrt((d["weights"] ** 2).sum(axis=(1, 2)))
    assert list(d["order"]) == list(np.argsort(-norms, kind="stable")[:4])
    np.testing.assert_allclose(d["slices"], d["weights"][d["order"]])
    assert any(p.endswith("fig03_top_input.png") for p in res["files"])


def test_fig05_curve_grid_uses_the_article_lists(inception, tmp_path):
    from circuits.expanded import expanded_weights

    res = _run("fig05_curve_grid", inception, tmp_path)
    d, js = _load(res, "fig05_curve_grid")
    assert js["outputs"] == [379, 385, 343, 342, 388, 340, 330, 349]
    assert js["inputs"] == [147, 189, 156, 163, 85, 160]
    E = expanded_weights(inception, "mixed3a", "mixed3b", [342])[0]
    np.testing.assert_allclose(d["cells"][2, 3], E[156].numpy(), atol=1e-6)


def test_fig06_spatial_positions(fashion_random, tmp_path):
    res = _run("fig06_spatial_positions_fashion", fashion_random, tmp_path)
    d, js = _load(res, "fig06_spatial_positions")
    kh, kw = js["kernel"]
    assert kh > 1 and d["directions"].shape == (kh * kw, 112)
    np.testing.assert_allclose(np.sqrt((d["directions"] ** 2).sum(1)).reshape(kh, kw), d["norms"], rtol=1e-6)
    assert js["n_rendered"] == int(d["rendered"].sum()) >= 1


def test_fig07_and_fig08_family_factors(inception, tmp_path):
    res = _run("fig07_highlow_factors", inception, tmp_path)
    d, js = _load(res, "fig07_highlow_factors")
    assert js["neurons"] == [136, 108, 132, 88, 110, 180, 153, 186, 86, 117] and js["from_layer"] == "conv2d2"
    assert d["directions"].shape == (2, 192) and (d["directions"] >= 0).all()
    assert d["loadings"].shape[:2] == (10, 2)
    fam = family_factors(torch.as_tensor(d["weights"]), 2, max_iter=50)
    np.testing.assert_allclose(d["directions"], fam.directions.numpy(), atol=1e-6)
    assert js["explained"] == pytest.approx(fam.explained, abs=1e-6)
    assert js["dominant"] == fam.dominant.tolist()
    res8 = _run("fig08_upstream_factors", inception, tmp_path, neurons=[136, 108, 132])
    assert res8["summary"]["upstream"] == ["maxpool1", "conv2d1"]
    for src, c in (("maxpool1", 192), ("conv2d1", 64)):
        d8, js8 = _load(res8, f"fig08_{src}")
        assert d8["directions"].shape == (2, c) and js8["from_layer"] == src


def test_fig09_top5(inception, tmp_path):
    res = _run("fig09_top5_inputs", inception, tmp_path)
    d, js = _load(res, "fig09_top5_inputs")
    assert js["target"] == "mixed3b:208" and len(js["order"]) == 5
    norms = np.sqrt((d["weights"] ** 2).sum(axis=(1, 2)))
    assert set(js["order"]) == set(np.argsort(-norms)[:5].tolist())


def test_fig10_eighteen_largest_in_factor_order(inception, tmp_path):
    res = _run("fig10_expanded_factors", inception, tmp_path)
    d, js = _load(res, "fig10_expanded_factors")
    assert js["target"] == "mixed3b:208" and js["from_layer"] == "conv2d2"
    w = d["weights"]
    assert w.shape[0] == 192
    norms = np.sqrt((w.reshape(192, -1) ** 2).sum(1))
    order, factor = d["order"], d["factor"]
    assert len(order) == 18 and set(order.tolist()) == set(np.argsort(-norms)[:18].tolist())
    assert (np.diff(factor) >= 0).all()  # grouped by factor, factor 0 first
    # within a factor row: by signed loading, largest first
    for f in np.unique(factor):
        load = d["loadings"][f, order[factor == f]]
        assert (np.diff(load) <= 1e-12).all()
    # the dominant factor of each cell is the one with the largest |loading| * ||spatial map||
    strength = np.abs(d["loadings"]) * np.sqrt((d["spatial"] ** 2).sum(axis=(1, 2)))[:, None]
    assert (strength[:, order].argmax(0) == factor).all()


def test_fig11_12_paths_sum_to_the_expanded_weights(fashion_random, tmp_path):
    res = _run("fig11_12_boundary_fashion", fashion_random, tmp_path, examples="featurevis", n_examples=1)
    d, js = _load(res, "fig12_washout")
    np.testing.assert_allclose(d["paths"].sum(0), d["total"], atol=1e-7)
    np.testing.assert_allclose(d["total"], d["expanded"], atol=1e-6)  # the decomposition is exact
    assert d["paths"].shape[0] == js_n_mid(js) + 1
    assert 0.0 <= js["washout"] <= 1.0
    assert js["washout"] == pytest.approx(1 - js["expanded_norm"] / js["sum_of_path_norms"], abs=1e-6)


def js_n_mid(js: dict) -> int:
    return len(js["mids"])


@pytest.mark.filterwarnings("ignore:the receptive field")
def test_fig11_12_inception_names(inception, tmp_path):
    res = _run("fig11_12_boundary", inception, tmp_path, n_mid=2, input_size=128)
    d, js = _load(res, "fig12_washout")
    assert js["target"] == "mixed3b:345" and js["source"] == "conv2d2:89"
    np.testing.assert_allclose(d["total"], d["expanded"], atol=1e-6)


def test_fig13_smooth(inception, tmp_path):
    res = _run("fig13_smooth_expanded", inception, tmp_path, top_n=4)
    d, js = _load(res, "fig13_smooth_expanded")
    assert js["target"] == "mixed3b:268" and js["from_layer"] == "conv2d1"
    assert d["maps"].shape[0] == 4 and d["maps"].shape[1] > 5
    assert js["mean_smoothness"] > js["mean_shuffled_smoothness"]


def test_bottleneck_branch_shares_add_up(inception, fashion_random, tmp_path):
    import csv

    res = _run("bottleneck_inceptionv1", inception, tmp_path, blocks=["mixed3a", "mixed3b"], progress=False)
    per = res["summary"]["per_block"]
    assert per["mixed3a"]["input_layer"] == "maxpool1" and per["mixed3b"]["input_layer"] == "mixed3a"
    rows = list(csv.DictReader(open(Path(res["out"]) / "branch_shares.csv")))
    for block in ("mixed3a", "mixed3b"):
        mine = [r for r in rows if r["block"] == block]
        assert [r["branch"] for r in mine] == ["1x1", "3x3", "5x5", "pool"]
        assert sum(float(r["share"]) for r in mine) == pytest.approx(1.0, abs=1e-9)
        assert sum(float(r["expanded_sq_l2"]) for r in mine) == pytest.approx(per[block]["total_sq_l2"], rel=1e-9)
        # the 1x1 branch is direct: its expanded weights are its kernel
        assert float(mine[0]["expanded_sq_l2"]) == pytest.approx(float(mine[0]["direct_entry_sq_l2"]), rel=1e-5)
    assert [int(r["channels"]) for r in rows if r["block"] == "mixed3b"] == [128, 192, 96, 64]
    up = list(csv.DictReader(open(Path(res["out"]) / "upstream_neurons.csv")))
    assert len(up) == 192 + 256
    for r in up[:20]:
        s = sum(float(r[f"share_{b}"]) for b in ("1x1", "3x3", "5x5", "pool"))
        assert s == pytest.approx(1.0, abs=1e-9)
    resf = _run("bottleneck_fashion", fashion_random, tmp_path, progress=False)
    assert resf["summary"]["blocks"] == ["mixed3a", "mixed3b", "mixed4a"]
    assert resf["summary"]["per_block"]["mixed3a"]["input_layer"] == "conv2d2"
    for b in resf["summary"]["per_block"].values():
        assert abs(b["sum_check"]) < 1e-9 and sum(b["shares"].values()) == pytest.approx(1.0)
        assert all(0.0 <= v <= 1.0 for v in b["mean_entropy"].values())


def test_runner_overrides_and_errors(tmp_path):
    cfg = {"a": 1, "render": {"steps": 3, "size": 8}}
    apply_overrides(cfg, {"render.steps": 1, "render": {"size": 4}, "x.y": 2})
    assert cfg == {"a": 1, "render": {"steps": 1, "size": 4}, "x": {"y": 2}}
    with pytest.raises(ExperimentError, match="experiment"):
        run_experiment({"model": "inceptionv1"})
    with pytest.raises(ExperimentError, match="no experiment script"):
        run_experiment({"experiment": "fig10_expanded_factor"})
    with pytest.raises(ExperimentError, match="not found"):
        run_experiment(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("- a\n- b\n")
    with pytest.raises(ExperimentError, match="mapping"):
        run_experiment(tmp_path / "bad.yaml")


def test_runner_finds_scripts_by_env(tmp_path, monkeypatch):
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "hello_exp.py").write_text("def run(config):\n    return {'got': config['value']}\n")
    monkeypatch.setenv("CIRCUITS_EXPERIMENTS_DIR", str(tmp_path / "exp"))
    assert run_experiment({"experiment": "hello_exp", "value": 3}) == {"got": 3}


def test_cli_run_dispatches_experiment_configs(inception, tmp_path):
    from circuits import cli

    src = (CONFIGS / "fig01_nmf.yaml").read_text()
    if "experiment" not in Path(cli.__file__).read_text():
        pytest.skip("circuits.cli does not dispatch 'experiment:' configs yet")
    cfg = tmp_path / "fig01.yaml"
    cfg.write_text(src.replace("out: outputs/fig01_nmf", f"out: {tmp_path / 'cli_out'}") + "formats: [png]\nneurons: [0, 1]\nweights: random\n")
    assert cli.main(["run", str(cfg)]) == 0
    js = json.loads((tmp_path / "cli_out" / "fig01_nmf.json").read_text())
    assert js["neurons"] == [0, 1]


def test_make_gallery_copies_each_figure_of_the_chosen_configs(tmp_path):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "experiments" / "make_gallery.py"
    spec = importlib.util.spec_from_file_location("make_gallery", path)
    gallery = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gallery)
    assert [p.stem for p in gallery.gallery_configs(["fig01"])] == ["fig01_nmf_fashion"]
    assert "explore_fashion" not in [p.stem for p in gallery.gallery_configs([])]
    assert gallery.main(["fig01", "--gallery", str(tmp_path / "g"), "--outputs", str(tmp_path / "o")]) == 0
    copied = tmp_path / "g" / "fig01_nmf.png"
    written = tmp_path / "o" / "fig01_nmf_fashion" / "fig01_nmf.png"
    assert copied.read_bytes() == written.read_bytes() and copied.stat().st_size > 1000
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["fig01_nmf.png"]  # no temp files left
    with pytest.raises(SystemExit):
        gallery.main(["no-such-figure", "--gallery", str(tmp_path / "g")])
