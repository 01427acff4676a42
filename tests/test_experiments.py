"""The figure scripts, the story-neuron search and the bottleneck study, end to end with tiny budgets.

On the bundled trained model (``fashion_model``): every ``*_fashion`` figure reads the shared
story-neuron file, and the claims that hold on this model are asserted against their controls
(random init, shuffled weights). On a random-init InceptionV1 (``inception``): the article's
configs run (names, shapes, numbers equal to the library's). Feature visualization uses 1
step; controls use 1 draw.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from circuits.experiment import ExperimentError, apply_overrides, check_config, find_experiment, run_experiment
from circuits.layers import get_layer
from circuits.nmf import family_factors, neuron_factors, weight_banding

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
STORY = json.loads((CONFIGS / "story_neurons_fashion.json").read_text())["neurons"]
BASE = {"render.steps": 1, "render.cache": False, "render.progress": False, "formats": ["png"], "dpi": 40, "nmf.max_iter": 50,
        "controls.random_init": 1, "controls.shuffled": 1}
TINY = dict(BASE, **{"render.size": 32, "render.resize_to": 32, "controls.random_init": 0, "controls.shuffled": 0})  # InceptionV1


@pytest.fixture(scope="module")
def fashion_random():
    from circuits.models import FashionInception

    torch.manual_seed(0)
    return FashionInception().eval()


def _run(name: str, model, tmp_path: Path, settings: dict = TINY, **extra):
    ov = dict(settings, model=model, out=str(tmp_path / name), **extra)
    res = run_experiment(CONFIGS / f"{name}.yaml", ov)
    for f in res["files"]:
        assert Path(f).is_file() and Path(f).stat().st_size > 0, f
    return res


def _fashion(name: str, model, tmp_path: Path, **extra):
    return _run(name, model, tmp_path, dict(BASE, model_is_trained=True), **extra)


def _load(res: dict, stem: str):
    out = Path(res["out"])
    return np.load(out / f"{stem}.npz"), json.loads((out / f"{stem}.json").read_text())


def _beats(claim: dict) -> None:
    """The claim beats every control value, and says so."""
    controls = claim["random_init"] + claim["shuffled"]
    assert controls, claim
    if claim["higher_is_claim"]:
        assert claim["value"] > max(controls), claim
    else:
        assert claim["value"] < min(controls), claim
    assert claim["beats_control"] is True and claim["verdict"] == "beats its controls"


# ----------------------------------------------------------------------------- configs


def test_every_article_config_has_a_script_and_a_fashion_twin():
    names = sorted(p.stem for p in CONFIGS.glob("fig[0-9]*.yaml") if not p.stem.endswith("_fashion"))
    assert len(names) == 11  # figures 1, 2, 3-4, 5, 6, 7, 8, 9, 10, 11-12, 13
    for n in names:
        assert (CONFIGS / f"{n}_fashion.yaml").is_file()
        assert find_experiment(n).is_file()


def _yaml(path: Path) -> dict:
    from circuits._io import read_yaml

    return read_yaml(path)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_config_is_valid_and_refuses_unknown_keys(path, tmp_path):
    raw = _yaml(path)
    if "command" in raw:  # a CLI command config: the CLI checks it against the command's options
        from circuits.cli import UsageError, config_to_argv

        assert config_to_argv(path)[0] == raw["command"]
        bad = tmp_path / path.name
        bad.write_text(path.read_text() + "stepz: 4\n")
        with pytest.raises(UsageError, match="stepz"):
            config_to_argv(bad)
        return
    check_config(path)  # every key is one the script reads
    with pytest.raises(ExperimentError, match=r"unknown key 'bogus_key'.*valid keys: .*out"):
        check_config(path, {"bogus_key": 1})
    with pytest.raises(ExperimentError, match=r"render: unknown key 'stepz' \(did you mean 'steps'\?\)"):
        check_config(path, {"render.stepz": 4})


def test_unknown_render_key_stops_the_run_before_any_work(tmp_path):
    with pytest.raises(ExperimentError, match="stepz"):
        run_experiment(CONFIGS / "fig03_04_top_inputs_fashion.yaml", {"render": {"stepz": 4}, "out": str(tmp_path / "x")})
    assert not (tmp_path / "x").exists()
    with pytest.raises(ExperimentError, match="controls: unknown key 'random'"):
        check_config(CONFIGS / "fig01_nmf_fashion.yaml", {"controls.random": 2})


def test_fashion_figures_read_the_shared_story_file():
    targets = {}
    for p in sorted(CONFIGS.glob("fig*_fashion.yaml")):
        cfg = _yaml(p)
        if p.stem.startswith(("fig01", "fig02")):  # layer-wide figures: no story neuron
            continue
        assert cfg["story"] == "story_neurons_fashion.json", p.name
        spec = cfg.get("target") or cfg.get("outputs") or cfg.get("neurons")
        assert isinstance(spec, str) and spec.startswith("story:"), (p.name, spec)
        targets[p.stem] = spec
    assert targets["fig09_top5_inputs_fashion"] == targets["fig10_expanded_factors_fashion"] == "story:bottleneck"
    assert targets["fig11_12_boundary_fashion"] == "story:boundary"
    assert targets["fig07_highlow_factors_fashion"] == targets["fig08_upstream_factors_fashion"] == "story:highlow"
    assert _yaml(CONFIGS / "fig11_12_boundary_fashion.yaml")["source"] == "story:boundary.source"


# ----------------------------------------------------------------------------- story neurons


@pytest.fixture(scope="module")
def mixed3a_to_mixed3b(fashion_model):
    from circuits.expanded import expanded_weights

    return expanded_weights(fashion_model, "mixed3a", "mixed3b")


def test_story_file_is_measured_on_the_bundled_model(fashion_model, mixed3a_to_mixed3b):
    import sys

    sys.path.insert(0, str(ROOT / "experiments"))
    from _measures import best_family, boundary_neuron
    from circuits._io import state_dict_hash

    doc = json.loads((CONFIGS / "story_neurons_fashion.json").read_text())
    assert doc["model"]["state_dict_hash"] == state_dict_hash(fashion_model)
    assert doc["controls"]["random_init"] >= 3
    fam = best_family(mixed3a_to_mixed3b, len(STORY["family"]["neurons"]))
    assert fam.neurons == STORY["family"]["neurons"] and fam.score == pytest.approx(STORY["family"]["value"], abs=1e-6)
    ch, odd = boundary_neuron(mixed3a_to_mixed3b)
    assert STORY["boundary"]["target"] == f"mixed3b:{ch}" and odd == pytest.approx(STORY["boundary"]["value"], abs=1e-6)
    for name in ("family", "boundary", "bottleneck"):
        _beats(STORY[name]["claim"])
    _beats(STORY["highlow"]["claims"]["explained"])
    assert STORY["highlow"]["claims"]["contrast"]["beats_control"] is False  # stated, not hidden


def test_story_search_runs_and_writes_the_file(fashion_random, tmp_path):
    cfg = dict(BASE, model=fashion_random, out=str(tmp_path / "story"), write=str(tmp_path / "story.json"), progress=False,
               highlow={"max_candidates": 4})
    res = run_experiment(CONFIGS / "story_neurons_fashion.yaml", cfg)
    doc = json.loads((tmp_path / "story.json").read_text())
    assert set(doc["neurons"]) == {"family", "highlow", "boundary", "bottleneck"}
    assert len(doc["neurons"]["family"]["neurons"]) == 6 and len(doc["neurons"]["highlow"]["neurons"]) == 8
    assert doc["neurons"]["boundary"]["source"].startswith("conv2d2:")
    for name, c in res["summary"].items():
        if name != "chosen":
            assert len(c["random_init"]) == 1 and c["verdict"] in ("beats its controls", "does NOT beat its controls")


# ----------------------------------------------------------------------------- figures on the bundled model


def test_fig01_fig02_claims_hold_on_the_bundled_model(fashion_model, tmp_path):
    d, js = _load(_fashion("fig01_nmf_fashion", fashion_model, tmp_path), "fig01_nmf")
    _beats(js["claim"])
    assert js["claim"]["value"] == pytest.approx(float(d["layer_explained"].mean()), abs=1e-6)
    d2, js2 = _load(_fashion("fig02_banding_fashion", fashion_model, tmp_path), "fig02_banding")
    _beats(js2["claim"])
    assert js2["mean_score"] > 0.3 and abs(js2["claim"]["random_init"][0]) < 0.1  # banded; random init is not
    assert js2["mean_score"] > js2["baseline_mean_score"]


def test_fig03_to_06_show_the_story_family(fashion_model, tmp_path):
    seed = STORY["family"]["target"]
    _, js = _load(_fashion("fig03_04_top_inputs_fashion", fashion_model, tmp_path), "fig04_small_multiples")
    assert js["target"] == seed
    _beats(js["claim"])
    d5, js5 = _load(_fashion("fig05_curve_grid_fashion", fashion_model, tmp_path), "fig05_curve_grid")
    assert js5["outputs"] == STORY["family"]["neurons"]
    assert js5["claim"]["value"] == pytest.approx(STORY["family"]["value"], abs=1e-6)
    _beats(js5["claim"])
    assert d5["cells"].shape[2:] == (3, 3)  # the family's 3x3 kernel, not the 5x5 window's zero padding
    d6, js6 = _load(_fashion("fig06_spatial_positions_fashion", fashion_model, tmp_path), "fig06_spatial_positions")
    assert js6["target"] == seed and js6["window"] == [5, 5] and js6["kernel"] == [3, 3]
    assert (d6["norms"] > 0).all() and js6["n_rendered"] <= 9  # no zero-padding tiles
    _beats(js6["claim"])


def test_fig07_08_factor_the_story_highlow_family(fashion_model, tmp_path):
    res7 = _fashion("fig07_highlow_factors_fashion", fashion_model, tmp_path)
    d7, js7 = _load(res7, "fig07_highlow_factors")
    assert js7["neurons"] == STORY["highlow"]["neurons"]
    _beats(js7["claim"])
    assert js7["claim_highlow"]["beats_control"] is False and "does NOT" in js7["claim_highlow"]["verdict"]
    res8 = _fashion("fig08_upstream_factors_fashion", fashion_model, tmp_path)
    d8, js8 = _load(res8, "fig08_factor_neurons")
    assert js8["neurons"] == js7["neurons"]
    for i, f in enumerate(js8["factors"]):  # each factor's neurons: its largest entries, largest first
        assert f["neurons"] == np.argsort(-d8["directions"][i], kind="stable")[:4].tolist()
    _beats(js8["claim"])
    png7 = (Path(res7["out"]) / "fig07_highlow_factors.png").read_bytes()
    assert png7 != (Path(res8["out"]) / "fig08_factor_neurons.png").read_bytes()


def test_fig09_10_13_show_the_story_bottleneck_neuron(fashion_model, tmp_path):
    target = STORY["bottleneck"]["target"]
    for name, stem in (("fig09_top5_inputs_fashion", "fig09_top5_inputs"), ("fig10_expanded_factors_fashion", "fig10_expanded_factors"),
                       ("fig13_smooth_expanded_fashion", "fig13_smooth_expanded")):
        _, js = _load(_fashion(name, fashion_model, tmp_path), stem)
        assert js["target"] == target, name
        _beats(js["claim"])
    assert js["claim"]["value"] > 0.4 and abs(js["claim"]["random_init"][0]) < 0.2  # smooth; random init is not


def test_fig11_12_washout_is_over_all_middle_channels(fashion_model, tmp_path):
    from scipy.signal import convolve2d

    from circuits.expanded import expanded_weights

    res = _fashion("fig11_12_boundary_fashion", fashion_model, tmp_path, n_scan=500)
    d, js = _load(res, "fig12_washout")
    assert js["target"] == STORY["boundary"]["target"] and js["source"] == STORY["boundary"]["source"]
    _beats(js["claim_fig11"])
    ch, src = int(js["target"].split(":")[1]), int(js["source"].split(":")[1])
    P = d["paths"]
    assert P.shape[0] == 112 == js["n_paths"]  # every mixed3a channel
    E = expanded_weights(fashion_model, "conv2d2", "mixed3b", [ch])[0, src].numpy()
    np.testing.assert_allclose(P.sum(0), E, atol=1e-5 * np.abs(E).max())  # the paths sum to the expanded weight
    np.testing.assert_allclose(d["expanded"], E, atol=1e-6)
    # an independent all-channel computation: compose the two expanded-weight steps by convolution
    A = expanded_weights(fashion_model, "conv2d2", "mixed3a")[:, src].numpy()  # [112, 5, 5]
    B = expanded_weights(fashion_model, "mixed3a", "mixed3b", [ch])[0].numpy()  # [112, 5, 5]
    composed = np.stack([convolve2d(B[m], A[m], mode="full") for m in range(112)])
    np.testing.assert_allclose(composed, P, atol=1e-5 * np.abs(P).max())
    norms = np.sqrt((composed ** 2).sum(axis=(1, 2)))
    independent = 1 - np.sqrt((composed.sum(0) ** 2).sum()) / norms.sum()
    assert js["washout"] == pytest.approx(independent, abs=1e-4)
    assert list(d["order"][:6]) == list(np.argsort(-norms, kind="stable")[:6])  # the strongest individual paths
    assert js["claim"]["shuffled"] and len(js["claim"]["shuffled"]) == 200  # sign-shuffled baseline
    c = js["claim"]
    assert c["beats_control"] == (c["value"] > max(c["random_init"] + c["shuffled"]))
    assert len(js["example_activations"]) >= 1 and min(js["example_activations"]) > 0  # only active examples


# ----------------------------------------------------------------------------- InceptionV1 configs (random init: plumbing)


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
    assert js["claim"]["verdict"] == "no control run"  # controls switched off here


def test_fig02_banding_is_measured_on_mixed5b_5x5(inception, tmp_path):
    res = _run("fig02_banding", inception, tmp_path)
    d, js = _load(res, "fig02_banding")
    assert js["layer"] == "mixed5b_5x5" and js["baseline_layer"] == "mixed3b_5x5"
    conv = get_layer(inception, "mixed5b_5x5_pre_relu_conv")
    expect = weight_banding(conv.weight.detach(), 3, max_iter=50).numpy()
    np.testing.assert_allclose(d["scores"], expect, atol=1e-5)
    assert list(d["shown"]) == list(np.argsort(-expect, kind="stable")[:8])
    assert abs(js["mean_score"]) < 0.1  # random init: no banding


def test_fig03_04_top_inputs(inception, tmp_path):
    res = _run("fig03_04_top_inputs", inception, tmp_path, top_n=4)
    d, js = _load(res, "fig04_small_multiples")
    assert js["target"] == "mixed3b:342" and js["kind"] == "expanded"
    norms = np.sqrt((d["weights"] ** 2).sum(axis=(1, 2)))
    assert list(d["order"]) == list(np.argsort(-norms, kind="stable")[:4])
    assert any(p.endswith("fig03_top_input.png") for p in res["files"])


def test_fig05_curve_grid_uses_the_article_lists(inception, tmp_path):
    from circuits.expanded import expanded_weights

    res = _run("fig05_curve_grid", inception, tmp_path)
    d, js = _load(res, "fig05_curve_grid")
    assert js["outputs"] == [379, 385, 343, 342, 388, 340, 330, 349]
    assert js["inputs"] == [147, 189, 156, 163, 85, 160]
    E = expanded_weights(inception, "mixed3a", "mixed3b", [342])[0]
    np.testing.assert_allclose(d["cells"][2, 3], E[156].numpy(), atol=1e-6)


def test_fig07_and_fig08_family_factors(inception, tmp_path):
    res = _run("fig07_highlow_factors", inception, tmp_path)
    d, js = _load(res, "fig07_highlow_factors")
    assert js["neurons"] == [136, 108, 132, 88, 110, 180, 153, 186, 86, 117] and js["from_layer"] == "conv2d2"
    assert d["directions"].shape == (2, 192) and (d["directions"] >= 0).all()
    fam = family_factors(torch.as_tensor(d["weights"]), 2, max_iter=50)
    np.testing.assert_allclose(d["directions"], fam.directions.numpy(), atol=1e-6)
    assert js["explained"] == pytest.approx(fam.explained, abs=1e-6)
    res8 = _run("fig08_upstream_factors", inception, tmp_path, neurons=[136, 108, 132])
    d8, js8 = _load(res8, "fig08_factor_neurons")
    assert js8["from_layer"] == "maxpool1" and d8["directions"].shape == (2, 192) and d8["top"].shape == (2, 4)


def test_fig09_and_fig10(inception, tmp_path):
    d, js = _load(_run("fig09_top5_inputs", inception, tmp_path), "fig09_top5_inputs")
    assert js["target"] == "mixed3b:208" and len(js["order"]) == 5
    norms = np.sqrt((d["weights"] ** 2).sum(axis=(1, 2)))
    assert set(js["order"]) == set(np.argsort(-norms)[:5].tolist())
    d, js = _load(_run("fig10_expanded_factors", inception, tmp_path), "fig10_expanded_factors")
    assert js["target"] == "mixed3b:208" and js["from_layer"] == "conv2d2"
    w = d["weights"]
    norms = np.sqrt((w.reshape(192, -1) ** 2).sum(1))
    order, factor = d["order"], d["factor"]
    assert len(order) == 18 and set(order.tolist()) == set(np.argsort(-norms)[:18].tolist())
    assert (np.diff(factor) >= 0).all()  # grouped by factor, factor 0 first
    strength = np.abs(d["loadings"]) * np.sqrt((d["spatial"] ** 2).sum(axis=(1, 2)))[:, None]
    assert (strength[:, order].argmax(0) == factor).all()


def test_fig13_smooth(inception, tmp_path):
    d, js = _load(_run("fig13_smooth_expanded", inception, tmp_path, top_n=4), "fig13_smooth_expanded")
    assert js["target"] == "mixed3b:268" and js["from_layer"] == "conv2d1"
    assert d["maps"].shape[0] == 4 and d["maps"].shape[1] > 5


# ----------------------------------------------------------------------------- bottleneck study


def test_bottleneck_branch_shares_add_up(inception, tmp_path):
    import csv

    res = _run("bottleneck_inceptionv1", inception, tmp_path, dict(TINY, **{"controls.random_init": 1}), blocks=["mixed3a", "mixed3b"],
               progress=False)
    per = res["summary"]["per_block"]
    assert per["mixed3a"]["input_layer"] == "maxpool1" and per["mixed3b"]["input_layer"] == "mixed3a"
    rows = list(csv.DictReader(open(Path(res["out"]) / "branch_shares.csv")))
    for block in ("mixed3a", "mixed3b"):
        mine = [r for r in rows if r["block"] == block]
        assert [r["branch"] for r in mine] == ["1x1", "3x3", "5x5", "pool"]
        assert sum(float(r["share"]) for r in mine) == pytest.approx(1.0, abs=1e-9)
        assert sum(float(r["expanded_sq_l2"]) for r in mine) == pytest.approx(per[block]["total_sq_l2"], rel=1e-9)
        assert float(mine[0]["expanded_sq_l2"]) == pytest.approx(float(mine[0]["direct_entry_sq_l2"]), rel=1e-5)  # 1x1 is direct
    up = list(csv.DictReader(open(Path(res["out"]) / "upstream_neurons.csv")))
    assert len(up) == 192 + 256
    for r in up[:20]:
        assert sum(float(r[f"share_{b}"]) for b in ("1x1", "3x3", "5x5", "pool")) == pytest.approx(1.0, abs=1e-9)


def test_bottleneck_study_result_on_the_bundled_model(fashion_model, tmp_path):
    res = _run("bottleneck_fashion", fashion_model, tmp_path, dict(BASE, model_is_trained=True), blocks=["mixed3b"], progress=False,
               polysemanticity={"n_images": 600})
    b = res["summary"]["per_block"]["mixed3b"]
    claims = res["summary"]["claims"]
    # the finding: training moves connection strength out of the 1x1 branch into the bottlenecked 3x3 branch
    assert b["shares"]["1x1"] < 0.3 < 0.5 < b["random_init_shares"]["1x1"][0]
    assert b["shares"]["3x3"] > 0.5 > 0.35 > b["random_init_shares"]["3x3"][0]
    _beats(claims["mixed3b_share_1x1"])
    _beats(claims["mixed3b_share_3x3"])
    assert b["bottleneck_only_neurons"]  # no longer empty: the control sets the threshold
    poly = b["polysemanticity_median"]
    assert max(poly.values()) - min(poly.values()) > 1.0  # the activation measure is not flat
    # the written study cites the numbers this script prints
    text = (ROOT / "experiments" / "RESULTS.md").read_text()
    assert f"| mixed3b | mixed3a | {b['shares']['1x1']:.2f}" in text
    assert f"{b['shares']['3x3']:.2f}" in text


# ----------------------------------------------------------------------------- runner and gallery


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


def test_runner_finds_scripts_by_env_and_checks_their_options(tmp_path, monkeypatch):
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "hello_exp.py").write_text("OPTIONS = {'value': 'a number', 'inner': ('a', 'b')}\n"
                                                   "def run(config):\n    return {'got': config['value']}\n")
    monkeypatch.setenv("CIRCUITS_EXPERIMENTS_DIR", str(tmp_path / "exp"))
    assert run_experiment({"experiment": "hello_exp", "value": 3, "inner": {"a": 1}}) == {"got": 3}
    with pytest.raises(ExperimentError, match=r"unknown key 'valeu' \(did you mean 'value'\?\); valid keys: experiment, inner, value"):
        run_experiment({"experiment": "hello_exp", "valeu": 3})
    with pytest.raises(ExperimentError, match=r"inner: unknown key 'c'"):
        run_experiment({"experiment": "hello_exp", "value": 3, "inner": {"c": 1}})
    with pytest.raises(ExperimentError, match="must be a mapping"):
        run_experiment({"experiment": "hello_exp", "value": 3, "inner": 5})


def test_cli_run_dispatches_experiment_configs(inception, tmp_path):
    from circuits import cli

    src = (CONFIGS / "fig01_nmf.yaml").read_text()
    cfg = tmp_path / "fig01.yaml"
    cfg.write_text(src.replace("out: outputs/fig01_nmf", f"out: {tmp_path / 'cli_out'}")
                   + "formats: [png]\nneurons: [0, 1]\nweights: random\ncontrols: {random_init: 0, shuffled: 0}\n")
    assert cli.main(["run", str(cfg)]) == 0
    js = json.loads((tmp_path / "cli_out" / "fig01_nmf.json").read_text())
    assert js["neurons"] == [0, 1]


def test_make_gallery_copies_each_figure_of_the_chosen_configs(tmp_path):
    import importlib.util

    path = ROOT / "experiments" / "make_gallery.py"
    spec = importlib.util.spec_from_file_location("make_gallery", path)
    gallery = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gallery)
    assert [p.stem for p in gallery.gallery_configs(["fig01"])] == ["fig01_nmf_fashion"]
    assert "explore_fashion" not in [p.stem for p in gallery.gallery_configs([])]
    assert gallery.main(["fig01", "--gallery", str(tmp_path / "g"), "--outputs", str(tmp_path / "o"),
                         "--set", "controls.random_init=1", "--set", "controls.shuffled=1"]) == 0
    copied = tmp_path / "g" / "fig01_nmf.png"
    written = tmp_path / "o" / "fig01_nmf_fashion" / "fig01_nmf.png"
    assert copied.read_bytes() == written.read_bytes() and copied.stat().st_size > 1000
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["CLAIMS.md", "claims.json", "fig01_nmf.png"]  # no temp files left
    assert "beats its controls" in (tmp_path / "g" / "CLAIMS.md").read_text()
    with pytest.raises(SystemExit):
        gallery.main(["no-such-figure", "--gallery", str(tmp_path / "g")])


def test_every_config_render_section_validates() -> None:
    """The ``render:`` keys of every committed config are render settings or call arguments."""
    from circuits.experiment import check_config
    from circuits.featurevis import RENDER_OPTIONS, RenderSettings

    configs = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))
    checked = 0
    for path in configs:
        cfg = yaml.safe_load(path.read_text())
        if "experiment" not in cfg or not cfg.get("render"):
            continue
        check_config(path)
        RenderSettings.from_dict({k: v for k, v in cfg["render"].items() if k in RenderSettings.field_names()})
        assert set(cfg["render"]) <= set(RENDER_OPTIONS)
        checked += 1
    assert checked >= 5


def test_parse_overrides_reads_yaml_values() -> None:
    from circuits.experiment import parse_overrides

    assert parse_overrides(["render.steps=2", "out=/tmp/x", "layers=[a, b]", "name=a: b: c"]) == {
        "render.steps": 2, "out": "/tmp/x", "layers": ["a", "b"], "name": "a: b: c"}
    with pytest.raises(ExperimentError, match="KEY=VALUE"):
        parse_overrides(["steps"])
