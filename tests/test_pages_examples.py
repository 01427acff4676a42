"""Dataset examples of the neuron pages: receptive-field crops ranked by max activation, and the
most negative examples of the pre-activation, on the bundled trained model and real images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from circuits.datasets import load_dataset
from circuits.featurevis import neuron_examples, pre_activation, receptive_fields
from circuits.featurevis.examples import crop_boxes
from circuits.layers import run_until

NEURONS = {"conv2d2": [3], "mixed3a": [0, 40, 90, 100], "mixed3b": [60], "mixed4a": [5, 100]}


@pytest.fixture(scope="module")
def images():
    try:
        return load_dataset("fashion-mnist-test", 96)
    except Exception as e:  # pragma: no cover - the data set is part of the machine
        pytest.skip(f"Fashion-MNIST is not installed: {e}")


@pytest.fixture(scope="module")
def examples(fashion_model, images, one_thread):
    return neuron_examples(fashion_model, NEURONS, images, k=4, progress=False)


def test_pre_activation_follows_branches_to_the_relu_input(fashion_model):
    assert pre_activation(fashion_model, "mixed3b", 60) == ("mixed3b_3x3_pre_relu_conv", 12)
    assert pre_activation(fashion_model, "mixed3a", 100) == ("mixed3a_pool_reduce_pre_relu_conv", 4)
    assert pre_activation(fashion_model, "conv2d2", 7) == ("conv2d2_pre_relu_conv", 7)
    assert pre_activation(fashion_model, "mixed3a_3x3_bottleneck", 5) == ("mixed3a_3x3_bottleneck_pre_relu_conv", 5)
    assert pre_activation(fashion_model, "conv2d2_pre_relu_conv", 7) is None  # no ReLU: its own values
    assert pre_activation(fashion_model, "mixed3a_3x3_bottleneck", 99) is None  # no such channel


def test_receptive_field_sizes_match_the_architecture(fashion_model, one_thread):
    """At the centre (no border): conv 3x3 → pool 2/2 → 1x1 → conv 3x3 is 8 px; each branch of
    mixed3a adds its kernel at stride 2 (3x3: +4, 5x5: +8, 3x3 pool: +4)."""
    rf = receptive_fields(fashion_model, "mixed3a", [0, 40, 90, 100], [(7, 7)] * 4)
    sizes = [(b[1] - b[0], b[3] - b[2]) for b in rf.boxes]
    assert rf.exact and sizes == [(8, 8), (12, 12), (16, 16), (12, 12)]
    # at a corner the field is clipped by the image border
    corner = receptive_fields(fashion_model, "mixed3a", [40], [(0, 0)]).boxes[0]
    assert corner[0] == 0 and corner[2] == 0 and corner[1] < 12
    with pytest.raises(ValueError, match="outside"):
        receptive_fields(fashion_model, "mixed3a", [112], [(0, 0)])


@pytest.mark.parametrize("layer,channels", [("mixed3a", [0, 40, 90, 100]), ("conv2d2", [3]), ("mixed4a", [5, 100, 200])])
def test_translated_fields_equal_fields_measured_everywhere(fashion_model, one_thread, layer, channels):
    """The default (each channel measured at the centre, moved by the stride, clipped) gives the
    same boxes as measuring every position, border positions included."""
    grid = {"mixed3a": 14, "conv2d2": 14, "mixed4a": 7}[layer]
    chs = [c for c in channels for _ in range(grid * grid)]
    pos = [(y, x) for _ in channels for y in range(grid) for x in range(grid)]
    fast = receptive_fields(fashion_model, layer, chs, pos)
    slow = receptive_fields(fashion_model, layer, chs, pos, measure_all=True)
    assert fast.exact and slow.exact
    np.testing.assert_array_equal(fast.boxes, slow.boxes)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 28), st.integers(1, 28), st.data())
def test_crop_boxes_contain_the_box_and_have_one_size(h, w, data):
    y0 = data.draw(st.integers(0, 28 - h))
    x0 = data.draw(st.integers(0, 28 - w))
    size = (data.draw(st.integers(h, 28)), data.draw(st.integers(w, 28)))
    box = np.array([[y0, y0 + h, x0, x0 + w]])  # any box no larger than the crop, anywhere in the image
    crop = crop_boxes(box, size, (28, 28))[0]
    assert crop[1] - crop[0] == size[0] and crop[3] - crop[2] == size[1]
    assert 0 <= crop[0] and crop[1] <= 28 and 0 <= crop[2] and crop[3] <= 28
    assert crop[0] <= box[0, 0] and box[0, 1] <= crop[1] and crop[2] <= box[0, 2] and box[0, 3] <= crop[3]


def _activation_map(model, layer, channel, images):
    with torch.no_grad():
        return run_until(model, model.preprocess_input(images), [layer])[layer][:, channel]


def test_examples_are_the_top_images_by_max_activation(fashion_model, images, examples):
    """Brute force over the data set: the top values are the largest maxima over positions, in
    order, at the recorded positions; the negative ones the smallest minima of the pre-activation."""
    for layer, chs in NEURONS.items():
        for c in chs:
            ex = examples[f"{layer}:{c}"]
            acts = _activation_map(fashion_model, layer, c, images)  # [N, H, W]
            maxima = acts.flatten(1).max(1).values
            want = torch.sort(maxima, descending=True).values[:4].numpy()
            np.testing.assert_allclose(ex.values, want, rtol=1e-5, atol=1e-6)
            for i, v, (y, x) in zip(ex.indices, ex.values, ex.positions):
                assert float(acts[i, y, x]) == pytest.approx(float(v), rel=1e-5, abs=1e-6)
            src, sc = pre_activation(fashion_model, layer, c) or (layer, c)
            assert ex.negative_target == f"{src}:{sc}"
            pre = _activation_map(fashion_model, src, sc, images)
            minima = pre.flatten(1).min(1).values
            np.testing.assert_allclose(ex.neg_values, torch.sort(minima).values[:4].numpy(), rtol=1e-5, atol=1e-6)
            assert (ex.neg_values < 0).all()  # a trained ReLU neuron is pushed below zero by some images


def test_each_crop_contains_the_receptive_field(fashion_model, images, examples):
    """The real (nonlinear) model's input gradient of the neuron at the example's position is zero
    outside the crop, for every top and negative example, and every crop of a neuron has one size."""
    for key, ex in examples.items():
        layer, c = key.split(":")
        c = int(c)
        src, sc = ex.negative_target.split(":")
        runs = [(layer, c, ex.indices, ex.positions, ex.crops), (src, int(sc), ex.neg_indices, ex.neg_positions, ex.neg_crops)]
        sizes = {(int(b[1] - b[0]), int(b[3] - b[2])) for b in np.concatenate([ex.crops, ex.neg_crops])}
        assert sizes == {ex.rf_size}, key
        for name, ch, idx, pos, crops in runs:
            x = images[torch.as_tensor(idx)].clone().requires_grad_(True)
            act = run_until(fashion_model, fashion_model.preprocess_input(x), [name])[name]
            picked = act[torch.arange(len(idx)), ch, torch.as_tensor(pos[:, 0]), torch.as_tensor(pos[:, 1])]
            (grad,) = torch.autograd.grad(picked.sum(), x)
            for j, (y0, y1, x0, x1) in enumerate(crops):
                g = grad[j].abs().sum(0)
                assert float(g.sum()) > 0, (key, name, j)  # the neuron does depend on this image
                outside = g.clone()
                outside[y0:y1, x0:x1] = 0
                assert float(outside.max()) == 0.0, (key, name, j, (y0, y1, x0, x1))
        crops = ex.crop_images(images)
        assert all(tuple(t.shape[-2:]) == ex.rf_size for t in crops)


def test_mixed4a_sees_almost_the_whole_image(examples):
    assert examples["mixed4a:5"].rf_size == (26, 26)
    assert examples["mixed3a:0"].rf_size == (8, 8)


def test_non_finite_activations_are_an_error(fashion_model, images):
    bad = images[:8].clone()
    bad[3, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="non-finite activations"):
        neuron_examples(fashion_model, {"mixed3a": [0]}, bad, k=2, progress=False)


def test_bad_requests(fashion_model, images):
    with pytest.raises(ValueError, match="layer:channel"):
        neuron_examples(fashion_model, ["mixed3a:1@3,3"], images, progress=False)
    with pytest.raises(ValueError, match="k must be"):
        neuron_examples(fashion_model, {"mixed3a": [0]}, images, k=0, progress=False)
