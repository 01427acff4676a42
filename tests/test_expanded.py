"""Expanded weights: linearisation, batched gradients vs. analytic compositions and per-channel loops."""

from __future__ import annotations

import io
from pathlib import Path
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from circuits.expanded import (
    Connection,
    UnsupportedNonlinearityError,
    connection_weights,
    expanded_weights,
    linearized,
    neuron_weights,
    per_example_connections,
    top_inputs,
)
from circuits.layers import UnknownLayerError, capture
from circuits.models import FASHION_WEIGHTS, FashionInception, InceptionV1
from circuits.models._blocks import MaxPool2dSame


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inception_model():
    torch.manual_seed(0)
    return InceptionV1().eval()


@pytest.fixture(scope="module")
def fashion_random():
    torch.manual_seed(1)
    return FashionInception().eval()


def _state_bytes(model: nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()


def _n_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ----------------------------------------------------------------------------- linearisation


class FunctionalReLUs(nn.Module):
    """Every ReLU spelling, called from forward, on tensors that need no grad."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        x = F.relu(self.conv(x))
        x = torch.relu(x - 1)
        x = (x - 1).relu()
        x = F.relu(x - 1, inplace=True)
        y = x - 1
        y.relu_()
        y = torch.relu_(y - 1)
        return self.act(y - 1)


def test_linearized_replaces_every_relu_spelling_without_grad():
    torch.manual_seed(0)
    model = FunctionalReLUs().eval()
    x = torch.randn(2, 2, 6, 6)
    with torch.no_grad():
        with linearized(model):
            out = model(x)
            assert torch.equal(F.relu(-x), -x)  # outside any module, no requires_grad
        expected = model.conv(x) - 6  # every ReLU is the identity
        plain = model(x)
    assert torch.allclose(out, expected, atol=1e-6)
    assert (plain >= 0).all() and not torch.allclose(plain, expected)


def test_maxpool_becomes_average_pool_same_window():
    x = torch.randn(2, 3, 9, 11)
    with linearized(nn.Identity()):
        a = nn.MaxPool2d(3, 2, padding=1, ceil_mode=True)(x)
        b = F.max_pool2d(x, kernel_size=2)
        c = torch.max_pool2d(x, 3, 1, 1)
        d = nn.AdaptiveMaxPool2d((2, 3))(x)
        e = F.max_pool1d(x[:, :, 0], 3, 2)
    assert torch.allclose(a, F.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=False))
    assert torch.allclose(b, F.avg_pool2d(x, 2))
    assert torch.allclose(c, F.avg_pool2d(x, 3, 1, 1, count_include_pad=False))
    assert torch.allclose(d, F.adaptive_avg_pool2d(x, (2, 3)))
    assert torch.allclose(e, F.avg_pool1d(x[:, :, 0], 3, 2))


def test_maxpool_same_with_neg_inf_padding_averages_real_inputs():
    pool = MaxPool2dSame(3, 2)
    x = torch.randn(1, 2, 8, 9)  # H pads (0, 1), W pads (1, 1): the -inf F.pad route
    with linearized(pool):
        out = pool(x)
    padded = F.pad(x, (1, 1, 0, 1))
    valid = F.pad(torch.ones_like(x), (1, 1, 0, 1))
    cols, counts = F.unfold(padded, 3, stride=2), F.unfold(valid, 3, stride=2)
    n = cols.shape[-1]
    mean = (cols.view(1, 2, 9, n).sum(2) / counts.view(1, 2, 9, n).sum(2)).view(1, 2, 4, 5)
    assert out.shape == pool(x).shape == (1, 2, 4, 5)
    assert torch.isfinite(out).all() and torch.allclose(out, mean, atol=1e-6)


def test_local_response_norm_identity_or_kept():
    lrn = nn.LocalResponseNorm(5, alpha=1e-2, k=2.0)
    x = torch.randn(1, 8, 4, 4)
    with linearized(lrn):
        assert torch.equal(lrn(x), x)
    with linearized(lrn, lrn="keep"):
        assert torch.equal(lrn(x), nn.LocalResponseNorm(5, alpha=1e-2, k=2.0)(x))
    with pytest.raises(ValueError, match="lrn must be"):
        with linearized(lrn, lrn="drop"):
            pass


class WithGELU(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, padding=1)
        self.act = nn.GELU()
        self.b = nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x):
        return self.b(self.act(self.a(x)))


def test_article_policy_names_the_op_and_module():
    model = WithGELU().eval()
    x = torch.randn(1, 2, 5, 5)
    with pytest.raises(UnsupportedNonlinearityError, match=r"gelu\(\).*'act'"):
        with linearized(model, policy="article"):
            model(x)
    with pytest.raises(UnsupportedNonlinearityError, match=r"sigmoid"):
        with linearized(model, policy="article"):
            torch.sigmoid(x)
    bn = nn.BatchNorm2d(2)
    with pytest.raises(UnsupportedNonlinearityError, match=r"batch_norm.*training mode.*eval"):
        with linearized(bn, policy="article"):
            bn.train()(x)
    assert int(bn.num_batches_tracked) == 0  # buffers restored
    with linearized(bn, policy="article"):  # affine in eval mode; dropout in eval mode is the identity
        assert torch.allclose(bn.eval()(x), F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias))
        assert torch.equal(nn.Dropout(0.5).eval()(x), x)


def test_model_unchanged_after_linearisation_and_exceptions(inception_model):
    before, hooks, training = _state_bytes(inception_model), _n_hooks(inception_model), inception_model.training
    x = torch.rand(1, 3, 64, 64) * 255 - 117
    with torch.no_grad():
        y0 = inception_model(x)
        with linearized(inception_model):
            inception_model(x)
        with pytest.raises(RuntimeError, match="boom"):
            with linearized(inception_model):
                inception_model(x)
                raise RuntimeError("boom")
        expanded_weights(inception_model, "mixed3a", "mixed3b", channels=[0, 1], input_shape=(3, 64, 64))
        with pytest.raises(UnknownLayerError):
            expanded_weights(inception_model, "mixed3a", "mixed3z")
        y1 = inception_model(x)
    assert _state_bytes(inception_model) == before
    assert _n_hooks(inception_model) == hooks and inception_model.training == training
    assert torch.equal(y0, y1)
    assert F.relu(-torch.ones(1)).item() == 0  # no mode left behind


# ----------------------------------------------------------------------------- identities


def _compose(kernels: list[torch.Tensor]) -> torch.Tensor:
    """Analytic composition of cross-correlation kernels applied in order: [out, in, k, k]."""
    total = kernels[0].double()
    for w in kernels[1:]:
        w = w.double()
        a, b = w.shape[-1], total.shape[-1]
        out = torch.zeros(w.shape[0], total.shape[1], a + b - 1, a + b - 1, dtype=torch.float64)
        for u in range(a):
            for v in range(a):
                out[:, :, u : u + b, v : v + b] += torch.einsum("om,mipq->oipq", w[:, :, u, v], total)
        total = out
    return total


@settings(max_examples=12, deadline=None)
@given(
    kernels=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    channels=st.lists(st.integers(1, 4), min_size=4, max_size=4),
    seed=st.integers(0, 2**16),
    same=st.booleans(),
)
def test_linear_conv_chain_equals_analytic_composition(kernels, channels, seed, same):
    torch.manual_seed(seed)
    layers: list[tuple[str, nn.Module]] = [("inp", nn.Identity())]
    for i, k in enumerate(kernels):  # "valid" or zero-padded convolutions, stride 1
        layers.append((f"c{i}", nn.Conv2d(channels[i], channels[i + 1], k, padding=k // 2 if same else 0)))
    model = nn.Sequential(OrderedDict(layers)).eval()
    size = 2 * sum(k - 1 for k in kernels) + 5
    E = expanded_weights(model, "inp", f"c{len(kernels) - 1}", input_shape=(channels[0], size, size))
    golden = _compose([m.weight.detach() for _, m in layers[1:]])
    assert E.shape == golden.shape
    assert torch.allclose(E.double(), golden, atol=1e-5 * float(golden.abs().max()), rtol=0)


def test_bottleneck_into_3x3_is_kernel_contraction():
    torch.manual_seed(3)
    model = nn.Sequential(
        OrderedDict(
            x=nn.Identity(), reduce=nn.Conv2d(6, 4, 1), relu=nn.ReLU(), conv=nn.Conv2d(4, 5, 3, padding=1), out=nn.ReLU()
        )
    ).eval()
    E = expanded_weights(model, "x", "out", input_shape=(6, 12, 12))
    golden = torch.einsum("omyx,mi->oiyx", model.conv.weight.double(), model.reduce.weight[:, :, 0, 0].double())
    assert E.shape == (5, 6, 3, 3)
    assert torch.allclose(E.double(), golden, atol=1e-6)
    wide = expanded_weights(model, "x", "out", crop=(5, 7), input_shape=(6, 12, 12))
    assert wide.shape == (5, 6, 5, 7) and torch.equal(wide[..., 1:4, 2:5], E)
    assert wide[..., 0, :].abs().max() == 0 and wide[..., :, :2].abs().max() == 0
    # adjacent layers: the direct kernel, and expanded weights agree with it
    c = connection_weights(model, "relu", "out", input_shape=(6, 12, 12))
    assert c.kind == "direct" and torch.equal(c.weights, model.conv.weight.detach())
    assert torch.allclose(expanded_weights(model, "relu", "out", input_shape=(6, 12, 12)), c.weights, atol=1e-6)
    assert connection_weights(model, "x", "out", input_shape=(6, 12, 12)).kind == "expanded"


def test_maxpool_path_equals_avgpool_model():
    torch.manual_seed(4)
    a, b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 2, 3, padding=1)

    def seq(pool: nn.Module) -> nn.Sequential:
        return nn.Sequential(OrderedDict(x=nn.Identity(), a=a, r=nn.ReLU(), p=pool, b=b)).eval()

    shape = (3, 16, 16)
    E_max = expanded_weights(seq(nn.MaxPool2d(3, 1, 1)), "x", "b", input_shape=shape)
    E_avg = expanded_weights(seq(nn.AvgPool2d(3, 1, 1, count_include_pad=False)), "x", "b", input_shape=shape)
    assert E_max.shape == (2, 3, 7, 7) and torch.allclose(E_max, E_avg, atol=1e-6)


def _loop_expanded(model: nn.Module, from_layer: str, to_layer: str, size: int) -> torch.Tensor:
    """One backward per output channel at the centre of a full-size input (linearised)."""
    x = torch.randn(1, 3, size, size) * 50
    with linearized(model), capture(model, [from_layer, to_layer]) as acts:
        model(x)
        a, out = acts[from_layer], acts[to_layer]
        cy, cx = (out.shape[-2] - 1) // 2, (out.shape[-1] - 1) // 2
        grads = [
            torch.autograd.grad(out[0, c, cy, cx], a, retain_graph=True)[0][0]
            for c in range(out.shape[1])
        ]
    g = torch.stack(grads)
    support = g.abs().amax((0, 1)) > 0
    ys, xs = support.any(1).nonzero().flatten(), support.any(0).nonzero().flatten()
    return g[:, :, ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1]


def test_inception_batched_equals_per_channel_loop(inception_model):
    E = expanded_weights(inception_model, "mixed3a", "mixed3b", input_shape=(3, 96, 96), batch_size=256)
    loop = _loop_expanded(inception_model, "mixed3a", "mixed3b", 96)
    assert E.shape == loop.shape == (480, 256, 5, 5)
    assert float((E - loop).abs().max()) <= 1e-5 * float(loop.abs().max())
    # channel subsets and chunking give the same rows
    sub = expanded_weights(
        inception_model, "mixed3a", "mixed3b", channels=[479, 0, 200], input_shape=(3, 96, 96), batch_size=2
    )
    assert torch.allclose(sub, E[[479, 0, 200]], atol=1e-6)


def test_inception_branch_endpoints_and_footprints(inception_model):
    E = expanded_weights(inception_model, "mixed3a", "mixed3b_5x5", channels=[0, 5])
    assert E.shape == (2, 256, 5, 5)
    E = expanded_weights(inception_model, "mixed3a", "mixed3b_pool_reduce", channels=[1])
    assert E.shape == (1, 256, 3, 3)  # the 3x3 pool in front of a 1x1 conv
    E = expanded_weights(inception_model, "conv2d2", "mixed3a", channels=[0], crop=7)
    assert E.shape == (1, 192, 7, 7)
    c = connection_weights(inception_model, "mixed3b_3x3_bottleneck", "mixed3b_3x3", channels=[3, 7])
    assert c.kind == "direct" and c.channels == (3, 7)
    assert torch.equal(c.weights, inception_model.mixed3b_3x3_pre_relu_conv.weight.detach()[[3, 7]])
    c = connection_weights(inception_model, "mixed3b_3x3_bottleneck", "mixed3b_3x3_pre_relu_conv", channels=0)
    assert c.kind == "direct" and c.weights.shape == (1, 128, 3, 3)


# ----------------------------------------------------------------------------- bad input


def test_bad_layers_raise_clear_errors(inception_model, fashion_random):
    with pytest.raises(ValueError, match="not downstream.*parallel branch"):
        expanded_weights(inception_model, "mixed3b_3x3", "mixed3b_5x5")
    with pytest.raises(ValueError, match="not downstream.*computes 'mixed3a' before 'mixed3b'"):
        expanded_weights(inception_model, "mixed3b", "mixed3a")
    with pytest.raises(UnknownLayerError, match="mixed3b"):
        expanded_weights(inception_model, "mixed3bb", "mixed4a")
    with pytest.raises(ValueError, match="same layer"):
        expanded_weights(inception_model, "mixed3b", "mixed3b")
    tokens = nn.Sequential(OrderedDict(a=nn.Conv2d(2, 3, 3), t=nn.Flatten(2))).eval()  # [B, C, h*w]
    with pytest.raises(ValueError, match=r"'t' has no activation layout.*nchw \[batch, channels, h, w\].*set_layout"):
        expanded_weights(tokens, "a", "t", input_shape=(2, 9, 9))
    with pytest.raises(ValueError, match="channel 160 is out of range"):
        expanded_weights(fashion_random, "mixed3a", "mixed3b", channels=[160])
    with pytest.raises(ValueError, match="names a layer, not a neuron"):
        neuron_weights(fashion_random, "mixed3a", "mixed3b")
    with pytest.raises(ValueError, match="position"):
        neuron_weights(fashion_random, "mixed3a", "mixed3b:3@2,2")


def test_unsupported_model_errors():
    model = WithGELU().eval()
    with pytest.raises(UnsupportedNonlinearityError, match=r"gelu\(\)"):
        expanded_weights(model, "a", "b", input_shape=(2, 9, 9), policy="article")

    class Square(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x):
            x = self.a(x)
            return self.b(x * x)  # a product of activations: caught by the linearity check

    with pytest.raises(UnsupportedNonlinearityError, match="not linear"):
        expanded_weights(Square().eval(), "a", "b", input_shape=(2, 9, 9))


def test_batch_fallback_when_prefix_cannot_broadcast():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.s, self.b = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(2, 3, 1), nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            a = self.a(x)
            skip = self.s(x).reshape(a.shape[0], 3, x.shape[-2], x.shape[-1])  # fails for batch 1 vs n
            return self.b(a + skip)

    torch.manual_seed(5)
    model = Skip().eval()
    E = expanded_weights(model, "a", "b", input_shape=(2, 10, 10))
    assert torch.allclose(E, model.b.weight.detach(), atol=1e-6)


# ----------------------------------------------------------------------------- helpers


def test_top_inputs_orders_by_l2():
    w = torch.zeros(4, 3, 3)
    w[2, 0, 0], w[0] = 10.0, 1.0
    w[3, 1, 1] = -5.0
    top = top_inputs(w, 2)
    assert top.indices.tolist() == [2, 3] and torch.allclose(top.norms, torch.tensor([10.0, 5.0]))
    both = top_inputs(torch.stack([w, -w]), 10)
    assert both.indices.shape == (2, 4) and both.indices[1, :3].tolist() == [2, 3, 0]
    conn = Connection(torch.stack([w]), "direct", "a", "b")
    assert top_inputs(conn, 1).indices.tolist() == [[2]]
    with pytest.raises(ValueError, match="positive integer"):
        top_inputs(w, 0)
    with pytest.raises(ValueError, match=r"\[in, kh, kw\]"):
        top_inputs(w[0], 1)


def test_neuron_weights_match_expanded_rows(fashion_random):
    row = neuron_weights(fashion_random, "mixed3a", "mixed3b:20")
    E = expanded_weights(fashion_random, "mixed3a", "mixed3b", channels=[20])
    assert row.shape == (112, 5, 5) and torch.equal(row, E[0])


def test_per_example_gradient_matches_autograd(fashion_random):
    torch.manual_seed(0)
    x = torch.randn(2, 1, 28, 28)
    grad = per_example_connections(fashion_random, x, "mixed3a", "mixed3b:7", method="gradient")
    gxa = per_example_connections(fashion_random, x, "mixed3a", "mixed3b:7", method="gradient_x_activation")
    with capture(fashion_random, ["mixed3a", "mixed3b"]) as acts:
        fashion_random(x)
    a, out = acts["mixed3a"], acts["mixed3b"]  # 14x14 maps, centre (6, 6)
    g = torch.autograd.grad(out[:, 7, 6, 6].sum(), a, retain_graph=True)[0]
    assert grad.shape == gxa.shape == (2, 112, 5, 5)
    assert torch.allclose(grad, g[:, :, 4:9, 4:9], atol=1e-6)
    assert torch.allclose(gxa, (g * a)[:, :, 4:9, 4:9].detach(), atol=1e-6)
    assert g[:, :, :4].abs().max() == 0  # the footprint holds the whole gradient
    # a given position at the border: same footprint, zeros outside the map
    corner = per_example_connections(fashion_random, x[0], "mixed3a", "mixed3b:7@0,0")
    g0 = torch.autograd.grad(out[0, 7, 0, 0], a)[0][0]
    assert corner.shape == (112, 5, 5)
    assert torch.allclose(corner[:, 2:, 2:], g0[:, :3, :3], atol=1e-6) and corner[:, :2].abs().max() == 0
    with pytest.raises(ValueError, match="method must be"):
        per_example_connections(fashion_random, x, "mixed3a", "mixed3b:7", method="saliency")


# ----------------------------------------------------------------------------- trained model


def _check_fashion_connections(model: nn.Module) -> None:
    E = expanded_weights(model, "conv2d2", "mixed3b")
    assert E.shape == (160, 64, 9, 9)  # 5x5 (mixed3a) then 5x5 (mixed3b), stride 1
    E = expanded_weights(model, "mixed3a", "mixed3b_5x5")
    assert E.shape == (24, 112, 5, 5)
    c = connection_weights(model, "mixed3b_5x5_bottleneck", "mixed3b_5x5")
    assert c.kind == "direct" and torch.equal(c.weights, model.mixed3b_5x5_pre_relu_conv.weight.detach())
    assert torch.allclose(expanded_weights(model, "mixed3b_5x5_bottleneck", "mixed3b_5x5"), c.weights, atol=1e-6)
    assert connection_weights(model, "mixed3a", "mixed3b_5x5", channels=[0]).kind == "expanded"


def test_fashion_connections_random_init(fashion_random):
    _check_fashion_connections(fashion_random)


@pytest.mark.skipif(not FASHION_WEIGHTS.is_file(), reason="trained FashionInception weights not built yet")
def test_trained_fashion_connections():
    from circuits.models import load_model

    _check_fashion_connections(load_model())


def test_inconsistent_fast_path_falls_back_to_plain(monkeypatch):
    import circuits.expanded as ex

    torch.manual_seed(6)
    model = nn.Sequential(OrderedDict(x=nn.Identity(), a=nn.Conv2d(3, 4, 3), b=nn.Conv2d(4, 2, 3))).eval()
    good = expanded_weights(model, "x", "b", input_shape=(3, 12, 12))
    ex._GEOMETRY_CACHE.clear()
    monkeypatch.setattr(ex, "_lazy_conv2d", lambda args, kwargs: F.conv2d(*args, **kwargs) * 0)
    assert torch.allclose(expanded_weights(model, "x", "b", input_shape=(3, 12, 12)), good, atol=1e-6)


# ----------------------------------------------------------------------------- ReLU-only models: unchanged

GOLDEN = Path(__file__).parent / "data" / "expanded_golden.pt"


@pytest.mark.skipif(not FASHION_WEIGHTS.is_file(), reason="trained FashionInception weights not built yet")
def test_relu_only_models_give_the_numbers_from_before_policies(inception_model):
    """``tests/data/expanded_golden.pt`` was computed with the code before linearisation policies
    (commit stored in the file); the default and the article policy must reproduce it to the bit,
    and a reference must not matter where nothing is frozen."""
    from circuits.models import load_model

    golden = torch.load(GOLDEN)["weights"]
    fashion = load_model()
    cases = [
        (fashion, "fashion:conv2d2>mixed3b", [5, 77], {}),
        (fashion, "fashion:mixed3b>mixed4a", [9], {}),
        (inception_model, "inception:mixed3a>mixed3b", [100, 479], {"input_shape": (3, 96, 96)}),
        (inception_model, "inception:conv2d1>mixed3a", [1], {"input_shape": (3, 96, 96)}),
    ]
    for model, key, channels, kw in cases:
        src, dst = key.split(":")[1].split(">")
        for policy in ("default", "article"):
            assert torch.equal(expanded_weights(model, src, dst, channels=channels, policy=policy, **kw), golden[key]), key
        shape = kw.get("input_shape", (1, 28, 28))
        conn = connection_weights(model, src, dst, channels, reference=torch.randn(2, *shape), **kw)
        assert torch.equal(conn.weights, golden[key]) and conn.frozen == () and conn.reference is None


def test_dense_to_layer_and_per_example_on_a_frozen_path(fashion_random):
    # logits = Linear(avg pool(mixed4a)): E[f, c, y, x] = W[f, c] / (h * w) over the whole 7x7 map
    E = expanded_weights(fashion_random, "mixed4a", "logits")
    assert E.shape == (10, 224, 7, 7)
    golden = (fashion_random.logits.weight.detach() / 49)[:, :, None, None].expand(-1, -1, 7, 7)
    assert torch.allclose(E, golden, atol=1e-6 * float(golden.abs().max()))
    assert torch.allclose(E[:, :, 1:-1, 1:-1], expanded_weights(fashion_random, "mixed4a", "logits", crop=5), atol=0)
    x = torch.randn(2, 1, 28, 28)
    pe = per_example_connections(fashion_random, x, "mixed4a", "logits:3")
    with capture(fashion_random, ["mixed4a", "logits"]) as acts:
        fashion_random(x)
    g = torch.autograd.grad(acts["logits"][:, 3].sum(), acts["mixed4a"])[0]
    assert pe.shape == (2, 224, 7, 7) and torch.allclose(pe, g, atol=1e-7)
    with pytest.raises(ValueError, match=r"layer .logits. is dense \(\[batch, 10\]\); it has no positions: drop .@y,x."):
        per_example_connections(fashion_random, x, "mixed4a", "logits:3@1,1")

    class Gate(nn.Module):  # per-example connections where the plan freezes a gate
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 2, 3, padding=1)

        def forward(self, x):
            a = self.a(x)
            return self.b(a * torch.sigmoid(a.mean((2, 3), keepdim=True)))

    torch.manual_seed(8)
    gate = Gate().eval()
    x = torch.randn(1, 2, 9, 9)
    pe = per_example_connections(gate, x, "a", "b:1")
    with capture(gate, ["a", "b"]) as acts:
        gate(x)
    g = torch.autograd.grad(acts["b"][0, 1, 4, 4], acts["a"])[0][0]  # the real gradient, gate path included
    assert pe.shape == (1, 3, 3, 3) and torch.allclose(pe[0], g[:, 3:6, 3:6], atol=1e-6)


def test_non_finite_weights_on_the_path_are_named_not_misread() -> None:
    """A NaN weight between the layers is an error that says so (it used to read as 'not downstream')."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1))
    with torch.no_grad():
        model[2].weight[1, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="contain NaN or Inf"):
        expanded_weights(model, "0", "2", input_shape=(2, 9, 9))
