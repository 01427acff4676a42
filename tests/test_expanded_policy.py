"""Linearisation policies, freezing at a reference, and functional calls (METHODS.md §7).

The toy models below call everything functionally (``F.gelu``, ``x * torch.sigmoid(s)``,
``F.layer_norm`` on a channels-last view, ``F.scaled_dot_product_attention``, ``torch.softmax``,
batch norm in training mode, ...). Each test writes the frozen model by hand — the statistics,
gates and attention patterns computed here from the reference input, the ops replaced by
multiplications with those constants — and compares per-output-channel autograd through it
with the batched result.
"""

from __future__ import annotations

import io
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from expanded_reference import assert_close, function_jacobian, support

from circuits.expanded import (
    LinearisationPolicy,
    Reference,
    UnsupportedNonlinearityError,
    connection_weights,
    expanded_weights,
    linearized,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _state_bytes(model: nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()


# ----------------------------------------------------------------------------- gates and norms


class Gated(nn.Module):
    """GELU, a squeeze-excitation gate, channels-last layer norm, group norm, hardswish."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.squeeze = nn.Conv2d(8, 8, 1)
        self.ln_weight = nn.Parameter(torch.rand(8) + 0.5)
        self.ln_bias = nn.Parameter(torch.randn(8))
        self.gn = nn.GroupNorm(2, 8)
        self.b = nn.Conv2d(8, 6, 3, padding=1)

    def forward(self, x):
        x = F.gelu(self.a(x))
        x = x * torch.sigmoid(self.squeeze(F.adaptive_avg_pool2d(x, 1)) * 3)
        x = F.layer_norm(x.permute(0, 2, 3, 1), (8,), self.ln_weight, self.ln_bias).permute(0, 3, 1, 2)
        x = F.hardswish(self.gn(x))
        return self.b(x)


def _gated_by_hand(model: Gated, x_ref: torch.Tensor):
    """The linearised model from ``a``'s output, frozen at ``x_ref`` (one image)."""
    with torch.no_grad():
        h = F.gelu(model.a(x_ref))
        gate = torch.sigmoid(model.squeeze(h.mean((2, 3), keepdim=True)) * 3)
        h = h * gate
        ln_mean, ln_var = h.mean(1, keepdim=True), h.var(1, unbiased=False, keepdim=True)
        h = (h - ln_mean) / torch.sqrt(ln_var + 1e-5) * model.ln_weight[:, None, None] + model.ln_bias[:, None, None]
        hg = h.reshape(1, 2, 4, *h.shape[2:])
        gn_mean, gn_var = hg.mean((2, 3, 4), keepdim=True), hg.var((2, 3, 4), unbiased=False, keepdim=True)

    def f(z):
        z = z * gate  # GELU → identity, the gate a constant
        z = (z - ln_mean) / torch.sqrt(ln_var + 1e-5) * model.ln_weight[:, None, None] + model.ln_bias[:, None, None]
        zg = (z.reshape(1, 2, 4, *z.shape[2:]) - gn_mean) / torch.sqrt(gn_var + model.gn.eps)
        z = zg.reshape(z.shape) * model.gn.weight[:, None, None] + model.gn.bias[:, None, None]
        return model.b(z)  # hardswish → identity

    return f


@pytest.fixture(scope="module")
def gated():
    torch.manual_seed(0)
    model = Gated().eval()
    with torch.no_grad():
        model.gn.weight.uniform_(0.5, 1.5)
        model.gn.bias.normal_()
    return model


def test_functional_gate_and_norms_equal_hand_frozen(gated):
    refs = torch.randn(3, 3, 10, 10) + torch.randn(3, 3, 1, 1)
    conn = connection_weights(gated, "a", "b", reference=refs)
    hand = torch.stack([function_jacobian(_gated_by_hand(gated, refs[r : r + 1]), torch.zeros(1, 8, 10, 10), 6) for r in range(3)])
    assert_close(conn.weights, support(hand.mean(0)))
    assert conn.weights.shape == (6, 8, 3, 3)
    assert [str(f) for f in conn.frozen] == [
        "Gated: sigmoid()#0 output", "Gated: layer_norm()#0 statistics", "gn: group_norm()#0 statistics"
    ]
    # one given image: the per-example connection of the linearised model
    one = expanded_weights(gated, "a", "b", reference=refs[1])
    assert_close(one, support(hand[1]))


def test_linearized_block_replays_frozen_values(gated):
    x_ref = torch.randn(1, 3, 10, 10)
    with torch.no_grad(), linearized(gated, reference=x_ref):
        out = gated(torch.zeros(1, 3, 10, 10))
        twice = gated(torch.zeros(2, 3, 10, 10))  # one reference image broadcasts over any batch
    with torch.no_grad():
        expected = _gated_by_hand(gated, x_ref)(gated.a(torch.zeros(1, 3, 10, 10)))
    assert torch.allclose(out, expected, atol=1e-5) and torch.allclose(twice, expected.expand(2, -1, -1, -1), atol=1e-5)
    with pytest.raises(UnsupportedNonlinearityError, match=r"sigmoid\(\).*frozen at a reference.*no reference was given"):
        with linearized(gated):
            gated(x_ref)
    with pytest.raises(ValueError, match="recorded for 2 reference images but .* batch of 3"):
        with linearized(gated, reference=torch.randn(2, 3, 10, 10)):
            gated(torch.zeros(3, 3, 10, 10))
    with pytest.raises(ValueError, match=r"layer_norm\(\).*gets input \(6, 6, 8\).*but \(10, 10, 8\) on the reference pass"):
        with linearized(gated, reference=x_ref):
            gated(torch.zeros(1, 3, 6, 6))


# ----------------------------------------------------------------------------- attention


class Attend(nn.Module):
    """Scaled dot-product attention (2 heads) plus an explicit softmax attention over positions."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.qkv = nn.Linear(8, 24)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.a(x)
        n, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        q, k, v = (z.reshape(n, h * w, 2, 4).transpose(1, 2) for z in self.qkv(t).chunk(3, -1))
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, h * w, c)
        o = o + torch.softmax(t @ t.transpose(1, 2) / 8**0.5, -1) @ t
        return self.b(o.transpose(1, 2).reshape(n, c, h, w))


def test_attention_patterns_frozen_value_path_live():
    torch.manual_seed(1)
    model = Attend().eval()
    x_ref = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        t = model.a(x_ref).flatten(2).transpose(1, 2)
        q, k, _ = (z.reshape(1, 25, 2, 4).transpose(1, 2) for z in model.qkv(t).chunk(3, -1))
        pattern = torch.softmax(q @ k.transpose(-2, -1) / 2.0, -1)  # [1, 2, 25, 25], scale 1/sqrt(4)
        mixing = torch.softmax(t @ t.transpose(1, 2) / 8**0.5, -1)

    def by_hand(z):
        t = z.flatten(2).transpose(1, 2)
        v = model.qkv(t).chunk(3, -1)[2].reshape(1, 25, 2, 4).transpose(1, 2)
        o = (pattern @ v).transpose(1, 2).reshape(1, 25, 8) + mixing @ t
        return model.b(o.transpose(1, 2).reshape(1, 8, 5, 5))

    conn = connection_weights(model, "a", "b", reference=x_ref)
    hand = function_jacobian(by_hand, torch.zeros(1, 8, 5, 5), 4)
    assert_close(conn.weights, support(hand))
    assert conn.weights.shape == (4, 8, 5, 5)  # attention reaches every position
    assert [f.frozen for f in conn.frozen] == ["attention pattern", "output"]


class MHAttend(nn.Module):
    """nn.MultiheadAttention (batch first, 2 heads) over the positions of a conv map."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.a(x)
        n, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        o, _ = self.attn(t, t, t, need_weights=False)
        return self.b((t + o).transpose(1, 2).reshape(n, c, h, w))


def test_multihead_attention_module_frozen_pattern():
    torch.manual_seed(5)
    model = MHAttend().eval()
    refs = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        t = model.a(refs).flatten(2).transpose(1, 2)
        _, pattern = model.attn(t, t, t, need_weights=True, average_attn_weights=False)  # [2, 2, 16, 16]
    w_v, b_v = model.attn.in_proj_weight[16:], model.attn.in_proj_bias[16:]

    def by_hand(r):
        def f(z):
            t = z.flatten(2).transpose(1, 2)
            v = (t @ w_v.T + b_v).reshape(1, 16, 2, 4).transpose(1, 2)
            o = (pattern[r : r + 1] @ v).transpose(1, 2).reshape(1, 16, 8)
            o = model.attn.out_proj(o)
            return model.b((t + o).transpose(1, 2).reshape(1, 8, 4, 4))

        return f

    conn = connection_weights(model, "a", "b", reference=refs)
    hand = torch.stack([function_jacobian(by_hand(r), torch.zeros(1, 8, 4, 4), 4) for r in range(2)]).mean(0)
    assert_close(conn.weights, support(hand))
    assert [str(f) for f in conn.frozen] == ["attn: multi_head_attention_forward()#0 attention pattern"]
    with pytest.raises(UnsupportedNonlinearityError, match="not linear"):
        expanded_weights(model, "a", "b", input_shape=(3, 4, 4), policy={nn.MultiheadAttention: "keep"})


# ----------------------------------------------------------------------------- statistics


class Stats(nn.Module):
    """Batch norm in training mode, instance norm, RMS norm (channels last), F.normalize."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.inorm = nn.InstanceNorm2d(6, affine=True)
        self.rms = nn.RMSNorm(6)
        self.b = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x):
        x = self.inorm(self.bn(self.a(x)))
        x = self.rms(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.b(F.normalize(x, dim=1))


def test_batch_statistics_and_norms_frozen_model_unchanged():
    torch.manual_seed(2)
    model = Stats().eval()
    model.bn.train()
    with torch.no_grad():
        for p in (model.bn.weight, model.inorm.weight, model.rms.weight):
            p.uniform_(0.5, 1.5)
    refs = torch.randn(2, 3, 8, 8) + torch.randn(2, 3, 1, 1)
    before = _state_bytes(model)
    conn = connection_weights(model, "a", "b", reference=refs)
    assert _state_bytes(model) == before and model.bn.training and not model.b.training

    with torch.no_grad():
        h = model.a(refs)
        bn_mean, bn_var = h.mean((0, 2, 3), keepdim=True), h.var((0, 2, 3), unbiased=False, keepdim=True)
        h = (h - bn_mean) / torch.sqrt(bn_var + 1e-5) * model.bn.weight[:, None, None] + model.bn.bias[:, None, None]
        in_mean, in_var = h.mean((2, 3), keepdim=True), h.var((2, 3), unbiased=False, keepdim=True)
        h = (h - in_mean) / torch.sqrt(in_var + 1e-5) * model.inorm.weight[:, None, None] + model.inorm.bias[:, None, None]
        rms = torch.sqrt((h * h).mean(1, keepdim=True) + torch.finfo(h.dtype).eps)
        h = h / rms * model.rms.weight[:, None, None]
        norm = h.norm(dim=1, keepdim=True)

    def by_hand(r):
        def f(z):
            z = (z - bn_mean) / torch.sqrt(bn_var + 1e-5) * model.bn.weight[:, None, None]
            z = (z - in_mean[r]) / torch.sqrt(in_var[r] + 1e-5) * model.inorm.weight[:, None, None]
            z = z / rms[r] * model.rms.weight[:, None, None]
            return model.b(z / norm[r])

        return f

    hand = torch.stack([function_jacobian(by_hand(r), torch.zeros(1, 6, 8, 8), 4) for r in range(2)]).mean(0)
    assert_close(conn.weights, support(hand))
    assert {f.op for f in conn.frozen} == {"batch_norm", "instance_norm", "rms_norm", "normalize"}
    model.eval()  # in eval mode batch norm is affine: only the other three are frozen
    assert {f.op for f in connection_weights(model, "a", "b", reference=refs).frozen} == {"instance_norm", "rms_norm", "normalize"}


# ----------------------------------------------------------------------------- policies


class Chain(nn.Module):
    def __init__(self, act: nn.Module):
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, padding=1)
        self.act = act
        self.b = nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x):
        return self.b(self.act(self.a(x)))


def _composed(model: Chain, scale: float = 1.0) -> torch.Tensor:
    """a → (act as ``scale`` × identity) → b, composed by hand: [2, 2, 5, 5] (``a``'s input to b)."""
    wa, wb = model.a.weight.detach().double(), model.b.weight.detach().double()
    out = torch.zeros(2, 2, 5, 5, dtype=torch.float64)
    for u in range(3):
        for v in range(3):
            out[:, :, u : u + 3, v : v + 3] += torch.einsum("om,mipq->oipq", wb[:, :, u, v], wa)
    return (out * scale).float()


def _chain_input(model: nn.Module) -> nn.Module:
    return nn.Sequential(OrderedDict(x=nn.Identity(), m=model)).eval()


@pytest.mark.parametrize(
    "act, scale",
    [
        (nn.GELU(), 1.0), (nn.SiLU(inplace=True), 1.0), (nn.Hardswish(), 1.0), (nn.Mish(), 1.0), (nn.ELU(), 1.0),
        (nn.CELU(), 1.0), (nn.LeakyReLU(0.2), 1.0), (nn.ReLU6(), 1.0), (nn.Softplus(), 1.0), (nn.PReLU(), 1.0),
        (nn.SELU(), 1.0507009873554805), (nn.Threshold(0.1, 0.0), 1.0), (nn.RReLU(), 1.0),
    ],
)
def test_relu_like_activations_become_identity(act, scale):
    torch.manual_seed(3)
    model = _chain_input(Chain(act))
    E = expanded_weights(model, "x", "m.b", input_shape=(2, 12, 12))
    assert_close(E, _composed(model.m, scale))
    with pytest.raises(UnsupportedNonlinearityError, match="cannot linearise the model"):
        expanded_weights(model, "x", "m.b", input_shape=(2, 12, 12), policy="article")


class ScaledByParameter(nn.Module):
    """A nonlinear function of a parameter scales the activations (Swin V2's attention scale:
    ``torch.clamp(logit_scale, max=log(100)).exp()``): a constant of the model."""

    def __init__(self):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor([0.7]))

    def forward(self, x):
        return x * torch.tanh(torch.clamp(self.logit_scale, max=0.5).exp())


@pytest.mark.parametrize("policy", ["default", "article"])
def test_ops_on_parameters_alone_are_constants_under_every_policy(policy):
    torch.manual_seed(5)
    model = _chain_input(Chain(ScaledByParameter()))
    E = expanded_weights(model, "x", "m.b", input_shape=(2, 12, 12), policy=policy)
    scale = float(torch.tanh(torch.tensor(0.5).exp()))
    assert_close(E, _composed(model.m, scale))
    # the same ops on the input are still refused (tanh of an activation is not linear)
    with pytest.raises(UnsupportedNonlinearityError, match="tanh"):
        expanded_weights(_chain_input(Chain(nn.Tanh())), "x", "m.b", input_shape=(2, 12, 12), policy=policy)


def test_policy_mappings_and_their_errors():
    torch.manual_seed(4)
    model = _chain_input(Chain(nn.Tanh()))
    with pytest.raises(UnsupportedNonlinearityError, match=r"tanh\(\).*'m.act'.*policy=\{'tanh': 'identity' \| 'freeze' \| 'keep'\}") as err:
        expanded_weights(model, "x", "m.b", input_shape=(2, 12, 12))
    assert "\n" not in str(err.value)
    assert_close(expanded_weights(model, "x", "m.b", input_shape=(2, 12, 12), policy={"tanh": "identity"}), _composed(model.m))
    assert_close(expanded_weights(model, "x", "m.b", input_shape=(2, 12, 12), policy={nn.Tanh: "identity"}), _composed(model.m))
    with pytest.raises(UnsupportedNonlinearityError, match="not linear"):  # kept: the result would depend on the input
        expanded_weights(model, "x", "m.b", input_shape=(2, 12, 12), policy={"tanh": "keep"})

    gelu = _chain_input(Chain(nn.GELU()))
    with pytest.raises(UnsupportedNonlinearityError, match=r"gelu\(\).*'m.act'"):
        expanded_weights(gelu, "x", "m.b", input_shape=(2, 12, 12), policy={nn.GELU: "error", "gelu": "identity"})
    with pytest.raises(UnsupportedNonlinearityError, match=r"rule 'avg_pool' for module type GELU does not apply to gelu\(\)"):
        expanded_weights(gelu, "x", "m.b", input_shape=(2, 12, 12), policy={nn.GELU: "avg_pool"})

    for bad, message in [
        ({"gelux": "identity"}, r"unknown op 'gelux' in policy \(did you mean gelu.*\); valid op names: .*layer_norm.*sigmoid"),
        ({"gelu": "avg_pool"}, r"rule 'avg_pool' does not apply to 'gelu'; valid rules for 'gelu': identity, freeze, keep, error"),
        ({"gelu": "linear"}, r"unknown rule 'linear' for 'gelu' in policy; valid rules: identity, avg_pool, freeze, keep, error"),
        ({3: "identity"}, r"unknown op 3 in policy"),
        ("lucid", r"policy must be 'default', 'article' or a mapping"),
    ]:
        with pytest.raises(ValueError, match=message) as err:
            expanded_weights(gelu, "x", "m.b", input_shape=(2, 12, 12), policy=bad)
        assert "\n" not in str(err.value)

    policy = LinearisationPolicy.of({"gelu": "freeze", nn.LayerNorm: "keep"})
    assert policy.rules()["gelu"] == "freeze" and policy.rules()["sigmoid"] == "freeze"
    assert policy.describe() == "default with {gelu: freeze, LayerNorm: keep}"
    assert LinearisationPolicy.of("article").rules()["silu"] == "error"
    assert LinearisationPolicy.of("article").rules()["max_pool2d"] == "avg_pool"


def test_sigmoid_as_activation_and_unfrozen_gates_are_reported(gated):
    model = _chain_input(Chain(nn.Sigmoid()))
    with pytest.raises(ValueError, match=r"not downstream.*frozen outputs pass no gradient.*m.act: sigmoid\(\)#0 output"):
        expanded_weights(model, "x", "m.b", input_shape=(2, 12, 12))
    assert expanded_weights(model, "x", "m.b", input_shape=(2, 12, 12), policy={"sigmoid": "identity"}).shape == (2, 2, 5, 5)
    with pytest.raises(UnsupportedNonlinearityError, match="not linear.*gate that is not frozen"):
        expanded_weights(gated, "a", "b", input_shape=(3, 10, 10), policy={"sigmoid": "identity"})
    with pytest.raises(UnsupportedNonlinearityError, match="not linear"):
        expanded_weights(gated, "a", "b", input_shape=(3, 10, 10), policy={nn.GroupNorm: "keep"})


def test_training_mode_dropout_is_refused():
    model = _chain_input(Chain(nn.Dropout(0.5))).train()
    with pytest.raises(UnsupportedNonlinearityError, match=r"dropout\(\).*training mode"):
        expanded_weights(model, "x", "m.b", input_shape=(2, 12, 12))


# ----------------------------------------------------------------------------- references


def test_default_reference_is_seeded_smooth_noise(gated):
    a, b = Reference.noise(gated, n=3, seed=0, shape=(3, 32, 32)), Reference.noise(gated, n=3, seed=0, shape=(3, 32, 32))
    c = Reference.noise(gated, n=3, seed=1, shape=(3, 32, 32))
    assert torch.equal(a.images, b.images) and a.key == b.key and not torch.equal(a.images, c.images) and a.key != c.key
    x = a.images  # no preprocess_input on this model: pixels in [0, 1]
    assert x.shape == (3, 3, 32, 32) and x.min() >= 0 and x.max() <= 1 and abs(float(x.mean()) - 0.5) < 0.05
    step = (x[..., 1:] - x[..., :-1]).abs().mean() / x.std()
    assert step < 0.5  # low-frequency: neighbours are close (white noise: 1.13, 1/f noise: 0.68)
    assert a.description == "smooth noise: 3 images 3x32x32, seed 0" and len(a) == 3

    from circuits.models import load_model

    fashion = load_model()
    ref = Reference.noise(fashion, n=2)
    assert ref.shape == (1, 28, 28)
    assert torch.allclose(ref.images, fashion.preprocess_input(Reference.noise(gated, n=2, shape=(1, 28, 28)).images))
    # the default reference of expanded weights: the model's input shape
    conn = connection_weights(gated, "a", "b", input_shape=(3, 12, 12))
    assert conn.reference.description == "smooth noise: 4 images 3x12x12, seed 0"


def test_loader_reference_is_the_mean_of_per_image_jacobians(gated):
    images = torch.randn(5, 3, 10, 10) + torch.randn(5, 3, 1, 1)
    loader = DataLoader(TensorDataset(images, torch.zeros(5)), batch_size=3)
    ref = Reference.from_loader(loader, max_images=4)
    assert torch.equal(ref.images, images[:4]) and ref.description == "4 images of a data loader 3x10x10"
    E = expanded_weights(gated, "a", "b", reference=ref)
    per_image = torch.stack([expanded_weights(gated, "a", "b", reference=images[i]) for i in range(4)])
    assert_close(E, per_image.mean(0))
    all_images = expanded_weights(gated, "a", "b", reference=loader)  # a DataLoader directly: its first 32 images
    assert_close(all_images, torch.stack([expanded_weights(gated, "a", "b", reference=images[i]) for i in range(5)]).mean(0))


def test_reference_errors_and_cache_keys(gated):
    r1, r2 = torch.randn(1, 3, 10, 10), torch.randn(1, 3, 10, 10) + 2
    e1, e2 = expanded_weights(gated, "a", "b", reference=r1), expanded_weights(gated, "a", "b", reference=r2)
    assert not torch.allclose(e1, e2)  # not a stale cached plan
    assert torch.equal(expanded_weights(gated, "a", "b", reference=r1), e1)
    with pytest.raises(ValueError, match=r"reference images are \(3, 10, 10\) but input_shape is \(3, 12, 12\)"):
        expanded_weights(gated, "a", "b", reference=r1, input_shape=(3, 12, 12))
    with pytest.raises(ValueError, match="reference must be a circuits.expanded.Reference"):
        expanded_weights(gated, "a", "b", reference=[r1])
    with pytest.raises(ValueError, match="NaN or Inf"):
        Reference.from_images(torch.full((1, 3, 4, 4), float("nan")))
    with pytest.raises(ValueError, match=r"\[R, C, H, W\] or \[C, H, W\]"):
        Reference.from_images(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="no images"):
        Reference.from_loader([])
