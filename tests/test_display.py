"""Notebook display (issue 19 item 3): every result type a researcher looks at has a
``_repr_html_`` with inlined PNG thumbnails, stays under the size budget, and flags NaN.

The reprs are checked on the bundled trained model's real weights; NaN cases are built by
putting a NaN into real results."""

from __future__ import annotations

import base64
import dataclasses
import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from circuits import _display as D

ROOT = Path(__file__).resolve().parents[1]
IMG = re.compile(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def _pngs(html: str) -> list[np.ndarray]:
    """Every inlined PNG of ``html``, decoded (so a broken image fails the test)."""
    found = IMG.findall(html)
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))) for b in found]


def _check(html: str, type_name: str, min_images: int = 1) -> list[np.ndarray]:
    assert f'data-circuits-type="{type_name}"' in html
    images = _pngs(html)
    assert len(images) >= min_images, f"{type_name}: {len(images)} inlined PNGs"
    assert len(html.encode()) < D.MAX_HTML_BYTES
    return images


@pytest.fixture(scope="module")
def model(one_thread):
    import circuits

    return circuits.load_model()


# ----------------------------------------------------------------------------- helpers


def test_import_circuits_loads_no_matplotlib():
    code = "import sys, circuits, circuits._display; print('matplotlib' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_thumbnails_are_sized_and_crisp():
    small = D.thumbnail(np.arange(25, dtype=np.uint8).reshape(5, 5), 48)
    assert small.shape == (50, 50)  # 5x5 weights upscaled by an integer factor
    assert (small[:10, :10] == 0).all() and (small[-10:, -10:] == 24).all()  # one value = one square
    big = D.thumbnail(np.zeros((300, 150, 3), np.uint8), 96)
    assert big.shape == (96, 48, 3)
    html = D.image_html(torch.rand(3, 28, 28))
    (png,) = _pngs(html)
    assert png.shape == (84, 84, 3)
    assert "circuits-nan" not in html


def test_nan_is_a_visible_flag():
    image = torch.rand(1, 8, 8)
    image[0, 2, 3] = float("nan")
    assert "1 NaN in image" in D.image_html(image)
    w = np.ones((3, 3))
    w[1, 1] = np.inf
    assert "1 Inf in weights" in D.weights_html(w)
    table = D.table_html(["a", "b"], [["x", float("nan")], ["y", 1.5]])
    assert table.count("circuits-nan") == 1 and ">NaN<" in table and "1.5" in table
    assert D.nan_flag(0, 0) == ""


def test_budget_leaves_items_out_and_says_so():
    noise = [np.random.default_rng(i).random((3, 128, 128)) for i in range(80)]  # incompressible
    budget = D.HtmlBudget()
    added = sum(budget.add(D.image_html(x, size=128)) for x in noise)
    assert 0 < added < 80 and budget.left_out == 80 - added
    html = D.container("Test", "noise", budget)
    assert len(html) < D.MAX_HTML_BYTES and f"{80 - added} more item(s) not shown" in html


def test_figure_png_lowers_dpi_to_fit():
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 12))
    fig.add_subplot().imshow(np.random.default_rng(0).random((400, 400)))
    data = D.figure_png(fig, dpi=150, max_bytes=60_000)
    assert len(data) * 4 // 3 <= 60_000
    assert Image.open(io.BytesIO(data)).size[0] < 12 * 150


# ----------------------------------------------------------------------------- result types


def test_render_result_html(model):
    from circuits.featurevis import RenderResult

    r = RenderResult(torch.rand(3, 1, 28, 28), torch.tensor([1.0, 2.0, 0.5]), ["conv2d2:0", "conv2d2:1", "conv2d2:2"],
                     from_cache=[False] * 3, beats_data=[True, True, False])
    html = r._repr_html_()
    images = _check(html, "RenderResult", 3)
    assert all(im.shape == (84, 84) for im in images)  # grey 28x28, thumbnail-sized
    assert "conv2d2:2" in html and "below data" in html and "circuits-nan" not in html
    r.images[1, 0, 0, 0] = float("nan")
    assert "1 NaN in images" in r._repr_html_()
    many = RenderResult(torch.rand(200, 3, 128, 128), torch.ones(200), [f"x:{i}" for i in range(200)])
    html = many._repr_html_()
    assert len(html) < D.MAX_HTML_BYTES and "not shown" in html
    text = repr_pretty(r)
    assert text.startswith("RenderResult(3 image(s)") and "\n" not in text


def repr_pretty(obj) -> str:
    from IPython.lib.pretty import pretty

    return pretty(obj)


def test_neuron_factors_html_on_trained_weights(model):
    import circuits

    f = circuits.neuron_factors(circuits.get_layer(model, "mixed3b_3x3_pre_relu_conv"), 3)  # all 64 neurons
    assert len(f.neurons) == 64
    html = f._repr_html_()
    images = _check(html, "NeuronFactors", 32)
    assert len(images) == 32 and "32 more item(s) not shown" in html  # at most 32 rows
    assert images[0].shape[-1] == 3  # the RGB picture
    assert f"{float(f.explained[0]):.4g}" in html
    bad = dataclasses.replace(f, loadings=f.loadings.clone())
    bad.loadings[0, 0, 0] = float("nan")
    assert "1 NaN in loadings" in bad._repr_html_()
    assert len(repr_pretty(f)) < 200


def test_family_factors_html_on_trained_weights(model):
    import circuits

    fam = circuits.family_factors(circuits.get_layer(model, "mixed3b_3x3_pre_relu_conv"), 2, neurons=range(6))
    html = fam._repr_html_()
    _check(html, "FamilyFactors", 12)  # 6 neurons x 2 loading maps
    assert "dominant" in html and "circuits-nan" not in html


def test_connection_html_on_trained_weights(model):
    import circuits

    conn = circuits.connection_weights(model, "mixed3a", "mixed3b", [0, 1])
    html = conn._repr_html_()
    images = _check(html, "Connection", 16)  # 2 channels x top 8 inputs
    assert "mixed3b:1" in html and "expanded" in html
    assert images[0].shape[-1] == 3  # on the diverging palette
    bad = dataclasses.replace(conn, weights=conn.weights.clone())
    bad.weights[0, 0, 0, 0] = float("nan")
    assert "1 NaN in weights" in bad._repr_html_()
    assert "\n" not in repr_pretty(conn)


def test_figure_result_html(model):
    import circuits
    from circuits.figures import small_multiples

    w = circuits.neuron_weights(model, "mixed3b_3x3_bottleneck", "mixed3b_3x3:5")
    fig = small_multiples(w, None, top_n=6)
    html = fig._repr_html_()
    (png,) = _check(html, "FigureResult", 1)
    assert png.shape[0] > 20 and "slices [6, 3, 3]" in html
    fig.data["slices"] = np.array([1.0, np.nan])
    assert "1 NaN in data" in fig._repr_html_()


def test_stats_table_and_diff_html(model):
    from circuits.inspect import diff_checkpoints, weight_stats

    state = {k: v.clone() for k, v in model.state_dict().items()}
    table = weight_stats(state)
    html = table._repr_html_()
    assert 'data-circuits-type="StatsTable"' in html and "<table>" in html
    assert "logits.weight" in html and "circuits-nan" not in html and len(html) < D.MAX_HTML_BYTES
    state["conv2d2_pre_relu_conv.weight"][3, 0, 0, 0] = float("nan")
    state["conv2d2_pre_relu_conv.weight"][7] = 0.0
    broken = weight_stats(state)._repr_html_()
    assert "1 NaN in the weights" in broken and "1/64" in broken  # the NaN count and the dead filter
    assert 'class="flag"' in broken
    diff = diff_checkpoints(model.state_dict(), state)._repr_html_()
    assert 'data-circuits-type="CheckpointDiff"' in diff and "NaN/Inf pattern changed" in diff
    assert "conv2d2_pre_relu_conv.weight" in diff


def test_neuron_card(model):
    import circuits
    from circuits.datasets import load_fashion_mnist

    images, _ = load_fashion_mnist("test")
    card = circuits.neuron_card(model, "conv2d2:7", top=4, images=images[:300], n_examples=5,
                                render={"steps": 2}, cache=None)
    assert card.target == "conv2d2:7" and card.upstream == "conv2d1" and card.kind == "direct"
    w = circuits.get_layer(model, "conv2d2_pre_relu_conv").weight.detach()[7]
    expected = w.flatten(1).norm(dim=1).argsort(descending=True)[:4].tolist()
    assert card.inputs == expected
    np.testing.assert_allclose(card.weights, w[expected].numpy(), rtol=1e-6)
    assert card.examples.shape == (5, 1, 28, 28) and (np.diff(card.example_values) <= 0).all()
    html = card._repr_html_()
    images_html = _check(html, "NeuronCard", 1 + 4 * 2 + 5)  # variable name, inputs (image + weights), examples
    assert "Fashion" not in html and "top 5 data set examples" in html
    assert len(images_html) == 14 and "circuits-nan" not in html
    card.weights[0, 0, 0] = float("nan")
    assert "1 NaN in weights" in card._repr_html_()
    assert repr(card).startswith("NeuronCard('conv2d2:7'")
    with pytest.raises(ValueError, match="position"):
        circuits.neuron_card(model, "conv2d2:7@3,3")
