"""Tests for circuits.atlas: the plan, the store, the local and Ray engines, resumption, retries.

The end-to-end atlas is FashionInception's 496 mixed-block neurons (mixed3a 112 + mixed3b 160 +
mixed4a 224) with tiny budgets (2 steps, top 2 connections, 64 dataset images). It is built
once per module by each engine; the tests read those runs.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from circuits.atlas import (
    AtlasTaskError,
    ResultStore,
    build_atlas,
    cache_relpath,
    cache_requests,
    make_plan,
    read_examples,
    read_tables,
)
from circuits.atlas._testing import fail_once
from circuits.atlas.plan import AtlasPlan, batch_size_for
from circuits.layers import UnknownLayerError

pytestmark = pytest.mark.usefixtures("one_thread")


SETTINGS = dict(steps=2, top_k=2, dataset_size=64, n_examples=3, seed=3)
LAYERS = ["mixed3a", "mixed3b", "mixed4a"]


@pytest.fixture(scope="module")
def model():
    """The trained FashionInception when its checkpoint is there, else a seeded random one."""
    from circuits.models import FashionInception, WeightsError, load_model

    try:
        return load_model().eval()
    except (WeightsError, FileNotFoundError):
        torch.manual_seed(0)
        return FashionInception().eval()


@pytest.fixture(scope="module")
def plan(model):
    return make_plan(model, LAYERS, **SETTINGS)


# ----------------------------------------------------------------------------- plan


def test_predicted_cache_files_are_what_render_writes(model, tmp_path):
    from circuits.featurevis import FeatureVisCache, render

    targets = ["mixed3a:5", "mixed4a_5x5_bottleneck:1"]
    for opts in ({"steps": 1}, {"steps": 1, "seed": 7, "size": 24, "redirected_relu": False, "lr": 0.1}):
        cache = FeatureVisCache(tmp_path / str(len(opts)))
        render(model, targets, cache=cache, progress=False, **opts)
        written = sorted(str(p.relative_to(cache.root)) for p in cache.root.rglob("*.npz"))
        predicted = sorted(cache_relpath(r) for r in cache_requests(model, targets, opts))
        assert written == predicted


def test_featurevis_cache_requests_are_what_render_stores(model, tmp_path):
    """The public featurevis helper the plan uses: its requests are the ones ``render`` stores
    (file names and the request saved in each file), with render-only arguments ignored."""
    from circuits.featurevis import FeatureVisCache, render
    from circuits.featurevis import cache_requests as fv_requests

    targets = ["mixed3a:5", "logits:2"]
    opts = {"steps": 1, "seed": 11, "size": 20, "resize_to": 28, "redirected_relu": 3, "param": "pixel"}
    cache = FeatureVisCache(tmp_path)
    render(model, targets, cache=cache, progress=False, batch_size=1, **opts)
    requests = fv_requests(model, targets, batch_size=1, progress=False, channels_last=True, **opts)
    assert [r["objective"] for r in requests] == targets
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.npz"))
    assert written == sorted(FeatureVisCache.relpath(r) for r in requests)
    for r in requests:
        assert cache.path(r) == tmp_path / FeatureVisCache.relpath(r)
        with np.load(cache.path(r), allow_pickle=False) as f:
            assert json.loads(str(f["request"])) == json.loads(json.dumps(r, default=str))
    # a single target, and the mixed-precision flag follows the device type
    assert fv_requests(model, "mixed3a:5", **opts) == requests[:1]
    assert fv_requests(model, "mixed3a:5", mixed_precision=True, device="cuda", **opts)[0]["mixed_precision"] is True
    from circuits.featurevis import bf16_autocast_supported

    assert fv_requests(model, "mixed3a:5", mixed_precision=True, **opts)[0]["mixed_precision"] is bf16_autocast_supported("cpu")
    with pytest.raises(TypeError, match="stepz"):
        fv_requests(model, targets, stepz=3)
    with pytest.raises(ValueError, match="steps"):
        fv_requests(model, targets, steps=-1)


def test_plan_covers_every_mixed_channel_once(model, plan):
    assert plan.layers == LAYERS
    assert {l: len(c) for l, c in plan.neurons.items()} == {"mixed3a": 112, "mixed3b": 160, "mixed4a": 224}
    assert plan.n_neurons == 496
    targets = plan.render_targets
    assert len(targets) == len(set(targets))
    # chosen neurons + every channel of the upstream layers (conv2d2 and the six bottlenecks)
    assert set(f"{l}:{c}" for l in LAYERS for c in range(len(plan.neurons[l]))) <= set(targets)
    assert sum(t.startswith("conv2d2:") for t in targets) == 64
    assert len(targets) == 496 + 64 + 32 + 8 + 48 + 12 + 48 + 12
    for task in plan.tasks_of("render"):
        assert len(task.targets) <= plan.batch_sizes[task.layer]
        assert all(t.split(":")[0] == task.layer for t in task.targets)
        assert len(task.outputs) == len(task.targets)
    assert [t.id for t in plan.tasks_of("tables")] == [f"tables-{l}" for l in LAYERS]
    assert len(plan.tasks_of("examples")) == (3 if plan.dataset else 0)
    assert len({t.id for t in plan.tasks}) == len(plan.tasks)
    # JSON round trip, deterministic fingerprint
    again = AtlasPlan.from_json(plan.to_json())
    assert again == plan and again.fingerprint() == plan.fingerprint()
    assert make_plan(model, LAYERS, **SETTINGS).fingerprint() == plan.fingerprint()
    assert make_plan(model, LAYERS, **dict(SETTINGS, seed=4)).fingerprint() != plan.fingerprint()
    only = make_plan(model, LAYERS, upstream_renders="none", dataset=None, **{k: v for k, v in SETTINGS.items() if k != "dataset_size"})
    assert len(only.render_targets) == 496 and not only.tasks_of("examples")


def test_plan_errors(model):
    with pytest.raises(UnknownLayerError):
        make_plan(model, ["mixed9z"])
    with pytest.raises(ValueError, match="unknown render option"):
        make_plan(model, ["mixed3a"], render={"colour": 1})
    with pytest.raises(ValueError, match="steps"):
        make_plan(model, ["mixed3a"], steps=-1)
    with pytest.raises(ValueError, match="dataset"):
        make_plan(model, ["mixed3a"], dataset="imagenet")
    with pytest.raises(ValueError, match="upstream_renders"):
        make_plan(model, ["mixed3a"], upstream_renders="some")


def test_batch_size_heuristic(model):
    per = {}
    for layer in ("conv2d2", "mixed3a", "mixed4a"):
        # the budget that fits exactly 10 images gives 10; CPU and GPU caps apply
        probe = batch_size_for(model, layer, "cpu", free_bytes=10**12)
        assert probe == 64
        per[layer] = batch_size_for(model, layer, "cpu", free_bytes=1)
        assert per[layer] == 1
    from circuits.atlas.plan import _floats_per_image

    floats = {l: _floats_per_image(model, l, (28, 28)) for l in ("conv2d2", "mixed3a", "mixed4a")}
    assert floats["conv2d2"] < floats["mixed3a"] < floats["mixed4a"]
    b = floats["mixed4a"] * 12
    assert batch_size_for(model, "mixed4a", "cpu", free_bytes=10 * b + 5) == 10
    assert batch_size_for(model, "mixed4a", "cuda", free_bytes=20 * b + 5) == 10  # half the free memory
    assert batch_size_for(model, "mixed4a", "cuda", free_bytes=10**15) == 256


# ----------------------------------------------------------------------------- store


def test_store_local_and_fsspec_url(tmp_path):
    local = ResultStore(tmp_path / "a")
    url = ResultStore((tmp_path / "b").as_uri())  # file:// goes through fsspec
    assert local.is_local and not url.is_local
    for s in (local, url):
        s.write_bytes("x/y/z.npz", b"hello")
        s.write_bytes("x/y/z.npz", b"hello again")  # replaced atomically
        assert s.read_bytes("x/y/z.npz") == b"hello again"
        assert s.exists("x/y/z.npz") and not s.exists("x/y/w.npz")
        assert s.existing(["x/y/z.npz", "x/y/w.npz", "q/r.npz"]) == {"x/y/z.npz"}
        clone = pickle.loads(pickle.dumps(s))
        assert clone.location == s.location and clone.read_bytes("x/y/z.npz") == b"hello again"
    leftovers = [p.name for p in tmp_path.rglob("*") if p.is_file() and p.name != "z.npz"]
    assert leftovers == []
    with pytest.raises(FileNotFoundError):
        url.read_bytes("nope.npz")


# ----------------------------------------------------------------------------- local engine, resumable


@pytest.fixture(scope="module")
def local_run(model, plan, tmp_path_factory):
    """The local atlas, built in four runs: stopped after 8 tasks, stopped by a failing task,
    finished, and run once more (nothing left)."""
    out = tmp_path_factory.mktemp("atlas-local")
    fail_dir = tmp_path_factory.mktemp("fail-local")
    runs = {}
    runs["stopped"] = build_atlas(model, LAYERS, out, max_tasks=8, progress=False, **SETTINGS)
    runs["pages_after_stop"] = (out / "pages").exists()
    victim = plan.tasks_of("render")[6].id
    with pytest.raises(AtlasTaskError, match=victim) as err, fail_once(f"{fail_dir}::{victim}"):
        build_atlas(model, LAYERS, out, progress=False, **SETTINGS)
    runs["failed_task"] = err.value.task_id
    runs["after_failure"] = make_plan(model, LAYERS, **SETTINGS).pending(ResultStore(out / "cache"))
    with fail_once(f"{fail_dir}::{victim}"):
        runs["finished"] = build_atlas(model, LAYERS, out, progress=False, **SETTINGS)
    runs["again"] = build_atlas(model, LAYERS, out, progress=False, **SETTINGS)
    return out, runs


def test_local_run_resumes_without_redoing_cached_work(plan, local_run):
    out, runs = local_run
    sizes = {t.id: (t.size if t.kind == "render" else 0) for t in plan.tasks}
    first = runs["stopped"]
    assert not first.report.completed and first.index is None and first.report.tasks_run == 8
    assert first.report.rendered == sum(sizes[t.id] for t in plan.tasks[:8]) > 0
    assert not runs["pages_after_stop"]
    # the failing run stopped at its task; every task before it was done and kept
    assert runs["failed_task"] == plan.tasks_of("render")[6].id
    left = [t.id for t in runs["after_failure"]]
    assert left[0] == runs["failed_task"] and set(left) < {t.id for t in plan.tasks}
    # the finished run did exactly what was left, and built the pages without rendering
    done = runs["finished"]
    assert done.report.completed and done.report.tasks_skipped == len(plan.tasks) - len(left)
    assert sorted(r["id"] for r in done.report.results) == sorted(left)
    assert done.report.rendered == sum(sizes[i] for i in left)
    assert first.report.rendered + done.report.rendered <= len(plan.render_targets)
    assert done.pages_built and done.pages_rendered == 0
    # every image rendered exactly once over all runs: the cache holds each one
    assert len(list((out / "cache").glob("*/*/*.npz"))) == len(plan.render_targets)
    # a last run finds nothing to do and leaves the pages alone
    again = runs["again"]
    assert again.report.tasks_run == 0 and again.report.rendered == 0 and not again.pages_built
    assert again.index == out / "pages" / "index.html"
    assert not list(out.rglob("*.tmp"))


def test_local_atlas_pages_for_every_neuron(plan, local_run):
    out, _runs = local_run
    pages = out / "pages"
    for layer, chs in plan.neurons.items():
        for c in chs:
            assert (pages / "layers" / layer / f"{c}.html").is_file()
        assert (pages / "img" / "vis" / layer / f"{chs[-1]}.png").is_file()
    page = (pages / "layers" / "mixed3b" / "60.html").read_text()  # a 3x3-branch neuron
    assert "mixed3a → mixed3b:60" in page and "mixed3b_3x3_bottleneck → mixed3b:60" in page
    for href in __import__("re").findall(r'href="([^"#]+\.html)"', page):
        assert (pages / "layers" / "mixed3b" / href).resolve().is_file(), href
    marker = json.loads((out / "atlas.json").read_text())
    assert marker["plan"] == plan.fingerprint() and marker["neurons"] == 496 and marker["pages_rendered"] == 0


def test_tables_and_examples(model, plan, local_run):
    out, _runs = local_run
    store = ResultStore(out / "cache")
    for layer in LAYERS:
        tables = read_tables(store, plan, layer)
        assert sorted(tables) == plan.neurons[layer]
        for c, secs in tables.items():
            assert {s.upstream for s in secs} <= set(plan.upstream[layer]) and secs
            for s in secs:
                assert len(s.channels) == min(plan.top_k, s.n_inputs) == len(s.norms) == len(s.slices)
                if not s.by_factor:
                    assert np.all(np.diff(s.norms) <= 1e-12)
                np.testing.assert_allclose(s.norms, np.sqrt((s.slices.reshape(len(s.slices), -1) ** 2).sum(1)), rtol=1e-5)
                if s.explained is not None:
                    assert -1e-6 <= s.explained <= 1 + 1e-6
    # the direct weights of one branch neuron are the conv kernel: mixed3a's 1x1 branch from conv2d2
    secs = {s.upstream: s for s in read_tables(store, plan, "mixed3a")[3]}
    w = model.mixed3a_1x1_pre_relu_conv.weight.detach()[3, :, :, :].numpy()
    s = secs["conv2d2"]
    np.testing.assert_allclose(s.slices, w[s.channels], rtol=1e-5, atol=1e-7)
    if plan.dataset:
        from circuits.datasets import load_dataset
        from circuits.featurevis import objective_values

        ex = read_examples(store, plan, "mixed4a")
        idx, vals = ex["mixed4a:100"]
        assert len(idx) == plan.n_examples and np.all(np.diff(vals) <= 0)
        all_vals = objective_values(model, ["mixed4a:100"], load_dataset(plan.dataset, plan.dataset_size))[0].numpy()
        np.testing.assert_allclose(vals, np.sort(all_vals)[::-1][: plan.n_examples], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- Ray engine


@pytest.fixture(scope="module")
def ray_run(model, plan, tmp_path_factory):
    """The same atlas on a local Ray cluster with 2 CPU slots; two tasks fail on their first try."""
    ray = pytest.importorskip("ray")
    out = tmp_path_factory.mktemp("atlas-ray")
    fail_dir = tmp_path_factory.mktemp("fail-ray")
    victims = [plan.tasks_of("render")[3].id, "tables-mixed3b"]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with fail_once(f"{fail_dir}::{','.join(victims)}"):
            result = build_atlas(model, LAYERS, out, engine="ray", max_retries=2, progress=False, **SETTINGS)
        # a worker process that dies (as on a lost machine) is replaced and its task retried
        crash_dir = tmp_path_factory.mktemp("crash-ray")
        with fail_once(f"{crash_dir}::render-*::exit"):  # with 2 torch threads (and 2 CPU slots) per task
            crash = build_atlas(model, ["mixed3a"], tmp_path_factory.mktemp("atlas-crash"), engine="ray", progress=False,
                                threads=2, neurons=4, upstream_renders="none", dataset=None, steps=1, top_k=2)
        crashed = sorted(p.stem for p in crash_dir.glob("*.failed"))
        with pytest.raises(ValueError, match="threads=3 CPU slots per task, but the Ray cluster has 2"):
            build_atlas(model, ["mixed3a"], tmp_path_factory.mktemp("atlas-3"), engine="ray", progress=False, threads=3,
                        neurons=4, upstream_renders="none", dataset=None, steps=1, top_k=2)
    finally:
        ray.shutdown()
    return out, result, fail_dir, victims, (crash, crashed)


def _npz_files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in root.rglob("*.npz")}


def test_ray_retries_failed_tasks_and_completes(plan, ray_run):
    out, result, fail_dir, victims, (crash, crashed) = ray_run
    assert sorted(p.stem for p in fail_dir.glob("*.failed")) == sorted(victims)  # each failed once
    assert result.report.engine == "ray" and result.report.completed
    assert result.report.tasks_run == len(plan.tasks) and result.report.rendered == len(plan.render_targets)
    assert sorted(r["id"] for r in result.report.results) == sorted(t.id for t in plan.tasks)
    assert plan.pending(result.store) == []
    assert result.pages_built and result.pages_rendered == 0 and result.index.is_file()
    assert len({r["pid"] for r in result.report.results}) >= 2  # ran on more than one worker
    assert crashed == ["render-mixed3a-000"] and crash.report.completed and crash.report.rendered == 4
    assert crash.report.threads == 2 and [r["threads"] for r in crash.report.results] == [2, 2]
    assert {r["threads"] for r in result.report.results} == {1}  # default: one slot and one thread per task
    assert crash.pages_built and crash.plan.pending(crash.store) == []


def test_ray_and_local_produce_the_same_results(plan, local_run, ray_run):
    local_out, _ = local_run
    ray_out, *_ = ray_run
    a, b = _npz_files(local_out / "cache"), _npz_files(ray_out / "cache")
    assert sorted(a) == sorted(b)  # same cache keys and task results
    fv = [k for k in a if not k.startswith("atlas-tasks")]
    assert len(fv) == len(plan.render_targets)
    for k in fv:
        with np.load(a[k]) as x, np.load(b[k]) as y:
            assert str(x["request"]) == str(y["request"])
            np.testing.assert_allclose(x["image"], y["image"], atol=1e-5)
    for layer in LAYERS:
        ta, tb = read_tables(ResultStore(local_out / "cache"), plan, layer), read_tables(ResultStore(ray_out / "cache"), plan, layer)
        for c in plan.neurons[layer][::37]:
            for sa, sb in zip(ta[c], tb[c]):
                assert sa.channels == sb.channels
                np.testing.assert_allclose(sa.slices, sb.slices, rtol=1e-5, atol=1e-7)
    pa = sorted(str(p.relative_to(local_out / "pages")) for p in (local_out / "pages").rglob("*.html"))
    pb = sorted(str(p.relative_to(ray_out / "pages")) for p in (ray_out / "pages").rglob("*.html"))
    assert pa == pb


# ----------------------------------------------------------------------------- small things


def test_url_store_and_dry_run(model, tmp_path):
    small = dict(neurons=3, upstream_renders="none", dataset=None, steps=1, top_k=2)
    dry = build_atlas(model, ["mixed3a"], tmp_path / "dry", dry_run=True, progress=False, calibration_steps=1, **small)
    est = dry.estimate
    assert est.tasks == {"tables": 1, "render": 1} and est.renders_pending == 3 and est.render_seconds > 0
    assert not list((tmp_path / "dry").rglob("*.npz")) and (tmp_path / "dry" / "plan.json").is_file()
    assert "estimated run time" in str(est) and est.total_seconds > est.render_seconds

    url = (tmp_path / "shared").as_uri()
    res = build_atlas(model, ["mixed3a"], tmp_path / "out", cache=url, progress=False, **small)
    assert res.report.completed and res.report.rendered == 3
    # upstream neurons were not planned (upstream_renders="none"): the pages rendered exactly those shown
    shown = {f"{s.upstream}:{i}" for secs in read_tables(res.store, res.plan, "mixed3a").values() for s in secs for i in s.channels}
    assert res.pages_rendered == len(shown - set(res.plan.render_targets)) > 0
    assert len(list((tmp_path / "shared").glob("*/*/*.npz"))) == 3
    assert (tmp_path / "out" / "pages" / "layers" / "mixed3a" / f"{res.plan.neurons['mixed3a'][0]}.html").is_file()


def test_cli(model, tmp_path, capsys):
    from safetensors.torch import save_file

    from circuits.cli import main

    weights = tmp_path / "fashion.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    common = ["atlas", "--model", str(weights), "--layers", "mixed3a", "--per-layer", "2", "--steps", "1", "--top-k", "2",
              "--no-dataset", "--no-upstream-renders", "--quiet", "--out", str(tmp_path / "a")]
    assert main(common + ["--max-tasks", "1"]) == 3
    assert "run the same command again" in capsys.readouterr().out
    assert main(common) == 0
    assert "Atlas pages: file://" in capsys.readouterr().out
    assert main(common[:3] + ["--layers", "mixed9z", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("circuits: error:") and "mixed9z" in err and len(err.strip().splitlines()) == 1
    assert main(common + ["--engine", "ray", "--max-tasks", "1"]) == 2
