"""The numbers of the neuron pages, on the bundled trained model: which weights are factored,
how cells are ordered, outgoing connections from all downstream weights, no silent NaN."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from circuits.expanded import connection_weights
from circuits.figures import sections as sections_module
from circuits.figures.pages import PageData, PageSettings, default_neurons, outgoing_connections, write_pages
from circuits.figures.sections import (
    distinct_positions,
    group_by_factor,
    layer_connections,
    output_connections,
)
from circuits.wiring import default_upstream

UP4A = ["mixed3b", "mixed4a_3x3_bottleneck", "mixed4a_5x5_bottleneck"]


@pytest.fixture(scope="module")
def mixed4a(fashion_model, one_thread):
    return layer_connections(fashion_model, "mixed4a", [0, 70, 100, 200], UP4A, top_k=12)


def test_distinct_positions():
    rng = np.random.default_rng(0)
    assert distinct_positions(rng.normal(size=(5, 1, 1))) == 1
    assert distinct_positions(np.repeat(np.repeat(rng.normal(size=(5, 1, 1)), 2, 1), 2, 2)) == 1  # pool-blocked 2x2
    assert distinct_positions(rng.normal(size=(5, 3, 3))) == 9
    assert distinct_positions(np.repeat(np.repeat(rng.normal(size=(5, 3, 3)), 2, 1), 2, 2)) == 9  # 3x3 through a 2x2 pool
    assert distinct_positions(np.zeros((4, 3, 3))) == 1


def test_no_nmf_on_one_by_one_or_pool_blocked_weights(mixed4a, fashion_model):
    """mixed4a:0 (1x1 branch) gets 2x2 expanded weights from mixed3b through maxpool4, all four
    positions equal: not factored (3 factors would 'explain' 100%), drawn as bars. The 3x3
    branch (mixed4a:100) has 6x6 weights with 9 distinct positions: factored."""
    (sec0,) = mixed4a.sections[0]
    assert sec0.upstream == "mixed3b" and sec0.slices.shape[1:] == (2, 2) and distinct_positions(sec0.slices) == 1
    assert sec0.explained is None and sec0.rgb is None and not sec0.by_factor and "1 distinct position" in sec0.note
    by_up = {s.upstream: s for s in mixed4a.sections[100]}
    assert by_up["mixed3b"].slices.shape[1:] == (6, 6) and by_up["mixed3b"].explained is not None
    assert 0 < by_up["mixed3b"].explained <= 1 and by_up["mixed4a_3x3_bottleneck"].explained is not None
    pool = mixed4a.sections[200][0]
    assert pool.explained is None and distinct_positions(pool.slices) == 1
    secs = layer_connections(fashion_model, "mixed3b", [5], default_upstream(fashion_model, "mixed3b"), top_k=4).sections[5]
    assert [s.slices.shape[1:] for s in secs] == [(1, 1)] and secs[0].note.startswith("1×1 kernel")


def test_factor_groups_are_sorted_as_the_header_says(mixed4a):
    """Grouped by dominant factor (F0 first), by L2 (largest first) within a group."""
    factored = [s for c in mixed4a.sections for s in mixed4a.sections[c] if s.by_factor]
    assert factored, "the bundled model has sections with >= 80% explained"
    for sec in factored:
        assert sec.factors == sorted(sec.factors)
        for f in set(sec.factors):
            norms = [n for n, g in zip(sec.norms, sec.factors) if g == f]
            assert norms == sorted(norms, reverse=True)


def test_group_by_factor_is_a_permutation_of_the_chosen():
    rng = np.random.default_rng(1)
    norms = rng.random(10)
    chosen = np.argsort(-norms)[:6]
    order, dominant = group_by_factor(norms, rng.normal(size=(3, 10)), rng.random((3, 2, 2)), chosen)
    assert sorted(order) == sorted(chosen) and list(dominant) == sorted(dominant)


def test_norms_cover_every_downstream_neuron(mixed4a, fashion_model):
    """The L2 matrix is over all 224 mixed4a neurons (not only the 4 asked for) and equals the
    L2 of the expanded weights computed directly; the sections agree with it."""
    nm = mixed4a.norms["mixed3b"]
    assert nm.shape == (224, 160)
    ref = connection_weights(fashion_model, "mixed3b", "mixed4a").weights.double()
    np.testing.assert_allclose(nm, ref.flatten(2).norm(dim=2).numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(mixed4a.sums["mixed3b"], ref.flatten(2).sum(2).numpy(), rtol=1e-4, atol=1e-6)
    sec = mixed4a.sections[70][0]
    np.testing.assert_allclose(sec.norms, nm[70, sec.channels], rtol=1e-6)
    assert (mixed4a.norms["mixed4a_3x3_bottleneck"][:64] == 0).all()  # the 1x1 branch is not reached


def test_outgoing_connections_come_from_all_weights(fashion_model, mixed4a):
    """mixed3b:60's outgoing connections are its strongest in all of mixed4a, whichever
    mixed4a neurons have pages; mixed4a's go to the logits (linear weights through the pool)."""
    full = {"mixed4a": [0]}
    ups = {"mixed4a": UP4A}
    out = outgoing_connections(fashion_model, full, ups, {"mixed3b": [60], "mixed4a": [0]}, n=5)
    col = mixed4a.norms["mixed3b"][:, 60]
    assert [l.channel for l in out[("mixed3b", 60)]] == list(np.argsort(-col)[:5])
    assert all(l.layer == "mixed4a" for l in out[("mixed3b", 60)])
    logits = out[("mixed4a", 0)]
    w = fashion_model.logits.weight.detach().numpy()[:, 0]
    assert {l.layer for l in logits} == {"logits"} and [l.channel for l in logits] == list(np.argsort(-np.abs(w))[:5])
    np.testing.assert_allclose([l.total for l in logits], w[[l.channel for l in logits]], rtol=1e-5)
    norms, sums = output_connections(fashion_model, "mixed4a", "logits")
    np.testing.assert_allclose(sums, fashion_model.logits.weight.detach().numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(norms, np.abs(sums) / 7.0, rtol=1e-5, atol=1e-7)  # uniform over 7x7
    with pytest.raises(ValueError, match="spatial grid"):
        output_connections(fashion_model, "mixed3b", "mixed4a")


def test_default_neurons_rule(fashion_model):
    assert default_neurons(fashion_model, ["mixed3a", "mixed3b", "mixed4a"]) is None  # 496 <= 1000: all
    assert default_neurons({"a": 600, "b": 600}, ["a", "b"]) == 16
    assert default_neurons({"a": 600, "b": 600}, ["a"]) is None


def test_nmf_failure_is_a_visible_warning(fashion_model, monkeypatch, tmp_path):
    """A NaN from the NMF is flagged on the section and on the page, never drawn as a number."""
    real = sections_module._factor

    def nan_factor(weights, k):
        spatial, loadings, explained, rgb = real(weights, k)
        explained = explained.copy()
        explained[0] = np.nan
        return spatial, loadings, explained, rgb

    monkeypatch.setattr(sections_module, "_factor", nan_factor)
    lc = layer_connections(fashion_model, "mixed3a", [40, 41], ["mixed3a_3x3_bottleneck"], top_k=3)
    first, second = lc.sections[40][0], lc.sections[41][0]
    assert first.warning == "NMF returned non-finite values" and first.explained is None and first.rgb is None
    assert second.warning == "" and second.explained is not None and np.isfinite(second.explained)

    def failing(weights, k):
        raise ValueError("NMF produced non-finite factors for matrix 0")

    monkeypatch.setattr(sections_module, "_factor", failing)
    lc2 = layer_connections(fashion_model, "mixed3a", [40], ["mixed3a_3x3_bottleneck"], top_k=3)
    assert lc2.sections[40][0].warning.startswith("NMF failed: NMF produced non-finite")

    data = PageData.build(fashion_model, {"mixed3a": [40]}, {"mixed3a": ["mixed3a_3x3_bottleneck"]},
                          {("mixed3a", 40): lc.sections[40]}, PageSettings(top_k=3),
                          vis_values={"mixed3a:40": float("nan")}, images={"mixed3a:40": np.full((28, 28), 0.5)})
    write_pages(data, tmp_path, progress=False)
    page = (tmp_path / "layers/mixed3a/40.html").read_text()
    assert "NMF returned non-finite values" in page and 'class="flag"' in page
    assert "its objective value is non-finite" in page
    visible = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert not re.search(r"\b(nan|inf)\b", visible, re.IGNORECASE)


def test_non_finite_weights_are_an_error(fashion_model):
    conv = fashion_model.mixed3a_3x3_pre_relu_conv
    saved = conv.weight.detach().clone()
    try:
        with torch.no_grad():
            conv.weight[3, 0, 1, 1] = float("nan")
        with pytest.raises(ValueError, match="non-finite weights|contain NaN or Inf"):
            layer_connections(fashion_model, "mixed3a", [35], ["mixed3a_3x3_bottleneck"], top_k=3)
    finally:
        with torch.no_grad():
            conv.weight.copy_(saved)


def test_a_visualization_below_the_data_is_flagged_on_its_page(fashion_model, tmp_path):
    """Issue 15 item 4, on the pages: a render that does not beat the best data set image says so."""
    from circuits.figures.pages import render_pages_images
    from circuits.datasets import load_dataset

    data_images = load_dataset("fashion-mnist-test", 64)
    with pytest.warns(UserWarning, match="do not beat the best data set example"):
        # 0 steps: the random starting images, which the data beats
        images, values, best = render_pages_images(
            fashion_model, {"mixed3a": [40, 41]}, None, {"steps": 0, "seed": 0}, False, reference=data_images)
    assert set(best) == {"mixed3a:40", "mixed3a:41"} and all(np.isfinite(v) for v in best.values())
    assert all(values[k] <= best[k] for k in best)
    lc = layer_connections(fashion_model, "mixed3a", [40, 41], ["mixed3a_3x3_bottleneck"], top_k=3)
    beaten = {"mixed3a:40": best["mixed3a:40"], "mixed3a:41": values["mixed3a:41"] - 1.0}
    data = PageData.build(fashion_model, {"mixed3a": [40, 41]}, {"mixed3a": ["mixed3a_3x3_bottleneck"]},
                          {("mixed3a", c): lc.sections[c] for c in (40, 41)}, PageSettings(top_k=3),
                          images=images, vis_values=values, vis_data_best=beaten, dataset_name="Fashion-MNIST")
    write_pages(data, tmp_path, progress=False)
    below = (tmp_path / "layers/mixed3a/40.html").read_text()
    above = (tmp_path / "layers/mixed3a/41.html").read_text()
    assert "does not beat the best Fashion-MNIST image" in below
    assert "does not beat" not in above and "best Fashion-MNIST image" in above


def test_all_channel_connections_are_remembered_until_the_model_changes(fashion_model, monkeypatch):
    """The pages and the atlas ask for the same all-channel connections several times: the
    second ask is answered from memory, but any change a result depends on (an in-place weight
    update, ``.train()``, a hook) computes it again, and the memory dies with the model."""
    import gc
    import weakref

    calls = []
    real = sections_module.connections_to

    def counted(*args, **kwargs):
        calls.append(args[1:3])
        return real(*args, **kwargs)

    monkeypatch.setattr(sections_module, "connections_to", counted)
    sections_module._ALL_CONNECTIONS_MEMO.pop(fashion_model, None)
    up, layer = "mixed3a_3x3_bottleneck", "mixed3a"
    first = sections_module.all_connections_to(fashion_model, up, layer)
    again = sections_module.all_connections_to(fashion_model, up, layer)
    assert len(calls) == 1 and again.keys() == first.keys() and all(again[c][0] is first[c][0] for c in first)
    c = next(iter(first))
    with pytest.raises(ValueError, match="read-only"):
        first[c][0][0, 0, 0] = 1.0
    conv = fashion_model.mixed3a_3x3_pre_relu_conv
    saved = conv.weight.detach().clone()
    try:
        with torch.no_grad():
            conv.weight.mul_(2.0)
        doubled = sections_module.all_connections_to(fashion_model, up, layer)
        assert len(calls) == 2
        np.testing.assert_allclose(doubled[c][0], 2 * first[c][0], rtol=1e-6)
    finally:
        with torch.no_grad():
            conv.weight.copy_(saved)
    restored = sections_module.all_connections_to(fashion_model, up, layer)
    assert len(calls) == 3
    np.testing.assert_allclose(restored[c][0], first[c][0], rtol=1e-6)
    handle = fashion_model.mixed3a.register_forward_hook(lambda *a: None)
    try:
        sections_module.all_connections_to(fashion_model, up, layer)
    finally:
        handle.remove()
    assert len(calls) == 4
    # only the current state's results are kept, and at most _MEMO_PER_MODEL of them
    assert len(sections_module._ALL_CONNECTIONS_MEMO[fashion_model]) == 1

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 5, 3)).eval()
    model.input_shape = (3, 16, 16)
    sections_module.all_connections_to(model, "1", "2")
    assert model in sections_module._ALL_CONNECTIONS_MEMO
    model.train()
    sections_module.all_connections_to(model, "1", "2")
    assert len(calls) == 6
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None  # the memory held no strong reference: the model and its entry are gone
