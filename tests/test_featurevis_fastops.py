"""The faster local response normalisation used while rendering equals PyTorch's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from circuits.featurevis import render
from circuits.featurevis import rendering as render_mod
from circuits.featurevis.fastops import fast_ops, local_response_norm

pytestmark = pytest.mark.usefixtures("one_thread")


@settings(max_examples=30, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 3), st.integers(1, 12), st.integers(1, 5), st.integers(1, 5)),
    size=st.integers(1, 10), alpha=st.floats(1e-5, 1.0), beta=st.floats(0.1, 1.5), k=st.floats(0.5, 3.0),
    channels_last=st.booleans(), seed=st.integers(0, 2**16),
)
def test_equals_torch_forward_and_backward(shape, size, alpha, beta, k, channels_last, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(*shape, generator=g, dtype=torch.float64) * 3
    if channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(*shape, generator=g, dtype=torch.float64)
    ours, ref = x0.clone().requires_grad_(True), x0.clone().requires_grad_(True)
    y = local_response_norm(ours, size, alpha, beta, k)
    y_ref = F.local_response_norm(ref, size, alpha, beta, k)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-9, atol=1e-11)


def test_gradcheck() -> None:
    x = (torch.randn(2, 7, 3, 4, dtype=torch.float64) * 2).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: local_response_norm(t, 4, 1e-2, 0.75, 2.0), (x,))


def test_mode_routes_lrn_modules_and_is_scoped() -> None:
    lrn = nn.LocalResponseNorm(5, alpha=1e-2, beta=0.75, k=1.0)
    x = torch.randn(2, 9, 4, 4, requires_grad=True)
    with fast_ops():
        y = lrn(x)
        y3 = F.local_response_norm(torch.randn(2, 9, 4, requires_grad=True), 3)  # 3-D input: PyTorch's own
    assert "LocalResponseNormFunction" in type(y.grad_fn).__name__
    assert "LocalResponseNormFunction" not in type(y3.grad_fn).__name__
    z = lrn(x)
    assert "LocalResponseNormFunction" not in type(z.grad_fn).__name__  # ordinary outside the block
    torch.testing.assert_close(y, z, rtol=1e-6, atol=1e-7)
    with fast_ops(enabled=False):
        assert "LocalResponseNormFunction" not in type(lrn(x).grad_fn).__name__


def test_render_with_fast_lrn_matches_plain(monkeypatch) -> None:
    """InceptionV1-style model (LRN after the first conv): the same images with and without the fast path."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.ReLU(), nn.LocalResponseNorm(5, 1e-2, 0.5, 1.0),
                          nn.Conv2d(12, 6, 3, padding=1)).eval()
    model.input_shape = (3, 24, 24)  # type: ignore[assignment]
    fast = render(model, ["1:2", "3:4"], steps=6, progress=False)
    plan = render_mod._plan(model, fast.settings, None)
    assert plan.fast_lrn
    monkeypatch.setattr(render_mod, "fast_ops", lambda enabled=True: fast_ops(False))
    plain = render(model, ["1:2", "3:4"], steps=6, progress=False)
    torch.testing.assert_close(fast.images, plain.images, atol=1e-4, rtol=0)
