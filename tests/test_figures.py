"""Figures: the numbers behind the pictures (scales, rankings, cell contents), and saving."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from circuits.figures import (
    DIVERGING,
    diverging_rgb,
    factor_order,
    factor_ordered_multiples,
    family_grid,
    nmf_rgb_figure,
    rank_inputs,
    save_figure,
    small_multiples,
    spatial_directions,
    spatial_position_grid,
    symmetric_limit,
    weight_heatmap,
)
from circuits.figures.raster import save_heatmap_png, save_image_png, tile_images


def _weights(seed: int = 0, shape=(20, 3, 3)) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape)


def _weight_images(result) -> list:
    """The AxesImages drawn with the diverging palette."""
    return [im for ax in result.figure.axes for im in ax.get_images() if im.get_cmap() is DIVERGING]


def test_heatmap_scale_is_symmetric_and_shared():
    w = _weights(1, (4, 5, 5))
    w[2, 1, 1] = -7.5  # the largest magnitude is negative
    res = weight_heatmap(w, colorbar=True)
    assert res.data["vmin"] == -7.5 and res.data["vmax"] == 7.5
    ims = _weight_images(res)
    assert len(ims) == 4
    for im in ims:
        assert im.get_clim() == (-7.5, 7.5)
    # a colour bar axis exists in addition to the 4 maps
    assert len(res.figure.axes) == 5


def test_diverging_palette_zero_is_white_and_signs_differ():
    rgb = diverging_rgb(np.array([-1.0, 0.0, 1.0]), 1.0).astype(int)
    assert np.all(rgb[1] > 240)  # white-ish at zero
    assert rgb[2, 0] > rgb[2, 2]  # positive: red
    assert rgb[0, 2] > rgb[0, 0]  # negative: blue
    # symmetric: +x and -x are equally far from white
    assert abs((255 - rgb[0]).sum() - (255 - rgb[2]).sum()) < 30


@given(arrays(np.float64, st.tuples(st.integers(1, 6), st.integers(1, 4), st.integers(1, 4)),
              elements=st.floats(-100, 100)))
@settings(max_examples=40, deadline=None)
def test_symmetric_limit_is_max_abs(w):
    m = symmetric_limit(w)
    if np.abs(w).max() == 0:
        assert m == 1.0
    else:
        assert m == np.abs(w).max()


@given(st.integers(0, 10_000), st.integers(1, 30), st.integers(1, 12))
@settings(max_examples=40, deadline=None)
def test_rank_inputs_top_n_are_the_largest_l2(seed, n_in, top_n):
    w = _weights(seed, (n_in, 3, 3))
    order, norms = rank_inputs(w, top_n)
    expected = np.linalg.norm(w.reshape(n_in, -1), axis=1)
    np.testing.assert_allclose(norms, expected)
    k = min(top_n, n_in)
    assert len(order) == k
    assert np.all(np.diff(norms[order]) <= 0)
    others = np.setdiff1d(np.arange(n_in), order)
    if others.size:
        assert norms[order].min() >= norms[others].max()


def test_small_multiples_cells_are_top_n_by_l2():
    w = _weights(3, (30, 3, 3))
    images = np.random.default_rng(0).random((30, 1, 8, 8))
    res = small_multiples(torch.tensor(w), images, top_n=7, title="test")
    order = res.data["order"]
    norms = np.linalg.norm(w.reshape(30, -1), axis=1)
    assert set(order.tolist()) == set(np.argsort(-norms)[:7].tolist())
    np.testing.assert_array_equal(res.data["slices"], w[order])
    # every weight cell shows its slice, with the figure's one symmetric scale
    m = np.abs(w[order]).max()
    ims = _weight_images(res)
    assert len(ims) == 7
    for k, im in enumerate(ims):
        np.testing.assert_array_equal(np.asarray(im.get_array()), w[order[k]])
        assert im.get_clim() == (-m, m)
    # image cells show the matching input's feature visualization
    gray = [im for ax in res.figure.axes for im in ax.get_images() if im.get_cmap().name == "gray"]
    np.testing.assert_allclose(np.asarray(gray[0].get_array()), images[order[0], 0])


def test_small_multiples_validates_inputs():
    with pytest.raises(ValueError, match=r"\[in, kh, kw\]"):
        small_multiples(np.zeros((2, 3, 3, 3, 1)))
    with pytest.raises(ValueError, match="expected 5 images"):
        small_multiples(np.ones((5, 3, 3)), np.zeros((4, 1, 8, 8)))


def test_family_grid_cell_ij_is_weight_slice_ij():
    w = _weights(4, (6, 5, 3, 3))  # [out, in, kh, kw]
    res = family_grid(w, in_images=np.random.rand(5, 8, 8), out_images=np.random.rand(6, 8, 8, 3))
    cells = res.data["cells"]
    assert cells.shape == (5, 6, 3, 3)
    for i in range(5):
        for j in range(6):
            np.testing.assert_array_equal(cells[i, j], w[j, i])
    ims = _weight_images(res)
    assert len(ims) == 30
    # drawn row-major: row i (input), column j (output)
    np.testing.assert_array_equal(np.asarray(ims[2 * 6 + 4].get_array()), w[4, 2])
    assert res.data["vmax"] == -res.data["vmin"] == np.abs(w).max()
    # a selection of rows and columns
    sel = family_grid(w, inputs=[4, 0], outputs=[5, 1, 2])
    np.testing.assert_array_equal(sel.data["cells"][0, 1], w[1, 4])
    np.testing.assert_array_equal(sel.data["cells"][1, 2], w[2, 0])
    with pytest.raises(ValueError, match="input indices"):
        family_grid(w, inputs=[7])


def test_spatial_position_grid_directions_and_fading():
    w = _weights(5, (10, 3, 3))
    dirs, norms = spatial_directions(w)
    assert dirs.shape == (9, 10)
    np.testing.assert_array_equal(dirs[1 * 3 + 2], w[:, 1, 2])
    res = spatial_position_grid(w, np.random.rand(9, 1, 6, 6))
    np.testing.assert_allclose(res.data["norms"], np.linalg.norm(w, axis=0))
    np.testing.assert_allclose(res.data["alpha"], norms / norms.max())
    assert res.data["alpha"].max() == 1.0
    # tile (dy, dx) is faded towards white by its alpha
    ax = res.figure.axes[0 * 3 + 1]
    shown = np.asarray(ax.get_images()[0].get_array())
    assert shown.min() >= 1.0 - res.data["alpha"][0, 1] - 1e-9
    assert len(res.figure.axes) == 9


def test_factor_order_groups_by_dominant_factor():
    n_in = 12
    loadings = np.zeros((3, n_in))
    # channels 0-3 load on factor 2, 4-7 on factor 0, 8-11 on factor 1
    for c in range(n_in):
        loadings[(2, 0, 1)[c // 4], c] = (c % 4 + 1) * (1 if c % 2 else -1)
    w = np.stack([np.full((3, 3), c + 1.0) for c in range(n_in)])
    order, factor = factor_order(w, loadings)
    assert factor.tolist() == sorted(factor.tolist())
    assert set(order[factor == 0].tolist()) == {4, 5, 6, 7}
    assert set(order[factor == 2].tolist()) == {0, 1, 2, 3}
    # within a group: signed loading descending
    grp = order[factor == 1]
    assert np.all(np.diff(loadings[1, grp]) <= 0)
    # top_n first selects by L2 (largest channels are 8..11)
    order_top, _ = factor_order(w, loadings, top_n=4)
    assert set(order_top.tolist()) == {8, 9, 10, 11}
    res = factor_ordered_multiples(w, loadings, top_n=6)
    np.testing.assert_array_equal(res.data["slices"], w[res.data["order"]])
    titles = [ax.get_title() for ax in res.figure.axes if ax.get_title()]
    assert len(titles) == 6 and all(t.startswith(f"F{f} ") for t, f in zip(titles, res.data["factor"]))
    with pytest.raises(ValueError, match=r"\[k, in\]"):
        factor_order(w, loadings[:, :5])


def test_nmf_rgb_figure():
    rgb = np.random.rand(4, 5, 5, 3)
    res = nmf_rgb_figure(rgb, labels=list("abcd"))
    np.testing.assert_array_equal(res.data["rgb"], rgb)
    single = nmf_rgb_figure(rgb[0], factor_images=np.random.rand(3, 1, 8, 8))
    assert len([ax for ax in single.figure.axes if ax.get_images()]) == 4
    with pytest.raises(ValueError):
        nmf_rgb_figure(np.zeros((5, 5, 4)))


@pytest.mark.parametrize("suffix,magic", [(".png", b"\x89PNG"), (".svg", b"<?xml"), (".pdf", b"%PDF")])
def test_save_figure_by_suffix(tmp_path, suffix, magic):
    res = weight_heatmap(_weights(0, (3, 3)))
    path = res.save(tmp_path / f"fig{suffix}")
    assert path.read_bytes().startswith(magic)
    assert [p.name for p in tmp_path.iterdir()] == [f"fig{suffix}"]  # no temporary left


def test_save_figure_rejects_unknown_suffix(tmp_path):
    with pytest.raises(ValueError, match=".png, .svg or .pdf"):
        save_figure(weight_heatmap(np.ones((2, 2))), tmp_path / "fig.bmp")
    assert not any(tmp_path.iterdir())


def test_raster_pngs(tmp_path):
    from PIL import Image

    p = save_heatmap_png(np.array([[-2.0, 0.0], [1.0, 2.0]]), tmp_path / "w.png", limit=2.0, scale=3)
    img = np.asarray(Image.open(p).convert("RGB"))
    assert img.shape == (6, 6, 3)
    assert img[0, 0, 2] > img[0, 0, 0] and img[5, 5, 0] > img[5, 5, 2]
    np.testing.assert_array_equal(img[0, 0], img[2, 2])  # nearest-neighbour upscaling
    q = save_image_png(np.full((1, 4, 5), 0.5), tmp_path / "g.png")
    assert np.asarray(Image.open(q)).shape == (4, 5)
    strip = tile_images([np.zeros((4, 4)), np.ones((3, 4, 4))], pad=2)
    assert strip.shape == (4, 10, 3)
