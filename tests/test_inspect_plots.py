"""Plots return their arrays: check the numbers, not the pixels. Also the traced graph."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from circuits.inspect import (  # noqa: E402
    block_pool,
    graph_to_dot,
    normalize_filters,
    plot_activations,
    plot_conv_filters,
    plot_graph,
    plot_heatmap,
    plot_histograms,
    plot_neuron_embedding,
    plot_weight_norms,
    trace_graph,
    weight_stats,
)
from circuits.layers import capture  # noqa: E402
from circuits.models import FashionInception  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return FashionInception().eval()


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_histograms_count_every_finite_value(model):
    fig, data = plot_histograms(model, bins=20)
    weights = {n: p for n, p in model.named_parameters() if p.dim() >= 2}
    assert set(data) == set(weights)
    for name, p in weights.items():
        counts, edges = data[name]["counts"], data[name]["edges"]
        assert counts.sum() == p.numel() and len(edges) == 21
        assert edges[0] == pytest.approx(p.min().item()) and edges[-1] == pytest.approx(p.max().item())
    assert len([ax for ax in fig.axes if ax.has_data()]) == len(weights)
    w = torch.tensor([[1.0, float("nan"), 2.0, 3.0]])
    _, d = plot_histograms({"w": w}, bins=3)
    assert d["w"]["counts"].tolist() == [1, 1, 1]


def test_block_pool_and_heatmap():
    m = np.arange(12, dtype=float).reshape(3, 4)
    pooled, factor = block_pool(m, max_size=2)
    assert factor == (2, 2)
    assert pooled.tolist() == [[np.mean([0, 1, 4, 5]), np.mean([2, 3, 6, 7])], [np.mean([8, 9]), np.mean([10, 11])]]
    w = torch.randn(1000, 300)
    fig, data = plot_heatmap(w, "fc.weight", max_size=256)
    assert data["factor"] == (4, 2) and data["matrix"].shape == (250, 150)
    assert data["matrix"][0, 0] == pytest.approx(w[:4, :2].mean().item(), rel=1e-5)
    assert "block-mean pooled 4x2" in fig.axes[0].get_title()
    conv = torch.randn(8, 3, 3, 3)
    _, data = plot_heatmap(conv)
    np.testing.assert_allclose(data["matrix"], conv.reshape(8, 27).numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="2 dimensions"):
        plot_heatmap(torch.randn(5))


def test_conv_filter_grid_normalisation():
    torch.manual_seed(0)
    rgb = torch.randn(6, 3, 5, 5)
    fig, data = plot_conv_filters(rgb, "conv1", mode="per_filter")
    img = data["images"]
    assert img.shape == (6, 5, 5, 3)
    assert np.allclose(img.min(axis=(1, 2, 3)), 0) and np.allclose(img.max(axis=(1, 2, 3)), 1)
    # channel order: image[..., c] is input channel c
    f0 = rgb[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(img[0], (f0 - f0.min()) / (f0.max() - f0.min()), rtol=1e-5, atol=1e-6)
    shared = normalize_filters(rgb, "shared")
    m = rgb.abs().max().item()
    np.testing.assert_allclose(shared[0], f0 / (2 * m) + 0.5, rtol=1e-5, atol=1e-6)
    grey = normalize_filters(torch.randn(4, 2, 3, 3), "per_filter")
    assert grey.shape == (4, 3, 3, 1)
    assert len([ax for ax in fig.axes if ax.images]) == 6


def test_weight_norm_bars(model):
    _, data = plot_weight_norms(model)
    weights = [(n, p) for n, p in model.named_parameters() if p.dim() >= 2]
    assert data["names"] == [n for n, _ in weights]
    np.testing.assert_allclose(data["values"], [p.norm().item() for _, p in weights], rtol=1e-5)
    table = weight_stats(model)
    _, data = plot_weight_norms(table, norm="spectral")
    ref = [torch.linalg.matrix_norm(p.detach().reshape(p.shape[0], -1), ord=2).item() for _, p in weights]
    np.testing.assert_allclose(data["values"], ref, rtol=1e-4)


def test_neuron_embedding_tsne_is_seeded():
    torch.manual_seed(0)
    w = torch.cat([torch.randn(15, 20) + 5, torch.randn(15, 20) - 5])
    _, a = plot_neuron_embedding(w, "fc", method="tsne", seed=0, perplexity=5)
    _, b = plot_neuron_embedding(w, "fc", method="tsne", seed=0, perplexity=5)
    assert a["embedding"].shape == (30, 2) and a["method"] == "tsne"
    np.testing.assert_allclose(a["embedding"], b["embedding"])
    e = a["embedding"]  # the two planted clusters separate
    within = np.linalg.norm(e[:15].mean(0) - e[15:].mean(0))
    assert within > 3 * max(e[:15].std(0).max(), e[15:].std(0).max())
    np.testing.assert_allclose(a["color"], w.norm(dim=1).numpy(), rtol=1e-6)


def test_activation_grid_matches_capture(model):
    torch.manual_seed(0)
    image = torch.rand(1, 28, 28)
    fig, data = plot_activations(model, "mixed3a", image, max_channels=16)
    with torch.no_grad(), capture(model, ["mixed3a"]) as acts:
        model(model.preprocess_input(image[None]))
    np.testing.assert_allclose(data["activations"], acts["mixed3a"][0].numpy(), rtol=1e-5, atol=1e-6)
    assert data["activations"].shape == (112, 14, 14)
    assert len([ax for ax in fig.axes if ax.images]) == 16


def test_graph_of_inception_block(model):
    g = trace_graph(model, color_by="std")
    names = [n.name for n in g.nodes]
    assert names[0] == "input" and names[-1] == "output"
    assert names.index("conv2d0_pre_relu_conv") < names.index("mixed3a") < names.index("logits")
    edges = set(g.edges)
    for branch in ("mixed3a_1x1", "mixed3a_3x3", "mixed3a_5x5", "mixed3a_pool_reduce"):
        assert (branch, "mixed3a") in edges  # the concat gets all four branches
    assert ("conv2d2", "mixed3a_pool") in edges and ("conv2d2", "mixed3a_1x1_pre_relu_conv") in edges
    assert ("avgpool0", "logits") in edges  # through torch.flatten, a functional op
    assert ("logits", "output") in edges
    conv = g.node("conv2d2_pre_relu_conv")
    assert conv.output_shape == (1, 64, 14, 14) and conv.params == 64 * 32 * 9 + 64
    assert conv.value == pytest.approx(model.conv2d2_pre_relu_conv.weight.std(unbiased=False).item(), rel=1e-5)
    dot = graph_to_dot(g)
    assert dot.startswith("digraph") and '"mixed3a_5x5" -> "mixed3a";' in dot
    assert dot.count("->") == len(g.edges)
    fig, data = plot_graph(g)
    assert set(data["positions"]) == set(names)
    ys = data["positions"]
    assert ys["mixed3a"][1] < ys["mixed3a_5x5"][1] < ys["conv2d2"][1]  # deeper = lower


def test_graph_residual_edges():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.act = nn.ReLU()

        def forward(self, x):
            h = self.a(x)
            out = self.b(h)
            out += h  # in-place residual add, not a module
            return self.act(out)

    g = trace_graph(Res(), torch.zeros(2, 4), color_by=None)
    assert set(g.edges) == {("input", "a"), ("a", "b"), ("a", "act"), ("b", "act"), ("act", "output")}


def test_histogram_and_pooling_work_block_by_block():
    from circuits.inspect import histogram, pool_matrix

    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 11, generator=g)
    w[3, 4] = float("nan")
    w[30, 0] = float("inf")
    whole, blocked = histogram(w, bins=13), histogram(w, bins=13, block_elems=7)
    np.testing.assert_array_equal(whole["counts"], blocked["counts"])
    assert whole["n"] == w.numel() - 2 and whole["n_nonfinite"] == 2
    finite = w[torch.isfinite(w)]
    assert whole["edges"][0] == pytest.approx(finite.min().item()) and whole["edges"][-1] == pytest.approx(finite.max().item())
    pooled, factor = pool_matrix(w, max_size=5, block_elems=3)
    assert factor == (8, 3) and pooled.shape == (5, 4)
    m = w.double().numpy()
    cell = m[0:8, 3:6]
    cell = cell[np.isfinite(cell)]
    assert pooled[0, 1] == pytest.approx(cell.mean())
    np.testing.assert_allclose(pooled, pool_matrix(w, max_size=5)[0])  # any block size, same cells


def test_embedding_caps_units_and_reduces_with_pca():
    from circuits.inspect import embedding_input

    g = torch.Generator().manual_seed(0)
    w = torch.randn(600, 300, generator=g)
    prep = embedding_input(w, max_units=200, pca_dims=20, seed=1)
    assert prep["x"].shape == (200, 20) and prep["n_total"] == 600 and prep["pca_dims"] == 20
    assert len(set(prep["units"].tolist())) == 200 and (np.diff(prep["units"]) > 0).all()
    np.testing.assert_array_equal(prep["units"], embedding_input(w, 200, 20, seed=1)["units"])  # seeded
    np.testing.assert_allclose(prep["norms"], w[torch.as_tensor(prep["units"])].norm(dim=1).numpy(), rtol=1e-6)
    assert embedding_input(w, max_units=5000, max_values=30_000)["x"].shape[0] == 100  # a memory cap too
    fig, data = plot_neuron_embedding(w, "big", method="tsne", max_units=150, pca_dims=10, perplexity=10)
    assert data["embedding"].shape == (150, 2) and data["pca_dims"] == 10 and data["n_total"] == 600
    title = fig.axes[0].get_title()
    assert "150 of 600 units (seeded sample)" in title and "PCA to 10 dims" in title


def test_spectra_and_alpha_plots_show_the_fits():
    from circuits.inspect import plot_alphas, plot_spectra
    from circuits.models import load_model

    table = weight_stats(load_model())
    _, data = plot_alphas(table)
    fitted = [r for r in table if r.spectrum is not None and r.spectrum.alpha == r.spectrum.alpha]
    assert data["names"] == [r.name for r in fitted]
    np.testing.assert_allclose(data["alphas"], [r.spectrum.alpha for r in fitted])
    fig, data = plot_spectra(table, max_layers=4)
    assert len(data) == 4 and all(len(d["evals"]) > 0 for d in data.values())
    with pytest.raises(ValueError, match="no layer has a spectrum"):
        plot_spectra(weight_stats({"w": torch.ones(3, 3)}, spectral="none"))


def test_plot_is_a_deprecated_alias_of_figure_result():
    import circuits.inspect.plots as plots_module
    from circuits.figures import FigureResult

    with pytest.warns(DeprecationWarning, match="FigureResult"):
        alias = plots_module.Plot
    assert alias is FigureResult
    res = plot_heatmap(torch.randn(4, 4))
    assert isinstance(res, FigureResult)
    fig, data = res  # still unpacks like the old NamedTuple
    assert fig is res.figure and data is res.data
