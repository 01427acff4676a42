"""Expanded weights across torchvision blocks (METHODS.md §7), against independent references.

Each reference is a *hand-frozen copy* of the model, written here without the implementation's
freezing code: the original model runs on the reference images with hooks that store the
squeeze-excitation gates / LayerNorm inputs, a deep copy gets its ReLU-like activations replaced
by ``nn.Identity`` and each frozen op replaced by a multiplication with the stored constants,
and one autograd backward per output channel gives the Jacobian at the centre neuron, averaged
over the reference images. Small inputs (64 px) and random init keep it fast.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.models import get_model

from expanded_reference import (
    Constant,
    assert_close,
    frozen_layer_norm,
    per_channel_jacobian,
    replace_module,
    support,
)

import circuits.expanded as expanded_mod
from circuits.expanded import connection_weights, expanded_weights, per_example_connections

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64
RELU_LIKE = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU)


def _model(name: str, seed: int = 0) -> nn.Module:
    """Random-init torchvision model with non-trivial batch-norm statistics, layer scales and
    squeeze-excitation gates (at init they hardly depend on the input)."""
    torch.manual_seed(seed)
    model = get_model(name, weights=None)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            if hasattr(m, "layer_scale"):  # ConvNeXt: 1e-6 at init would hide the block's branch
                m.layer_scale.copy_(torch.rand(m.layer_scale.shape, generator=g) + 0.5)
            if type(m).__name__ == "SqueezeExcitation":  # gates that depend on the input
                m.fc1.weight.mul_(4)
                m.fc2.weight.mul_(4)
    return model.eval()


def _images(n: int, seed: int) -> torch.Tensor:
    """Noise with a random colour offset per image (the map means, hence the gates, differ)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, SIZE, SIZE, generator=g) + 2 * torch.randn(n, 3, 1, 1, generator=g)


def _recorded(model: nn.Module, images: torch.Tensor) -> tuple[dict, dict]:
    """SE gates ``{se_name: [R, C, 1, 1]}`` and LayerNorm inputs ``{ln_name: [R, ...]}`` of the
    original model on ``images``."""
    gates, ln_inputs, handles = {}, {}, []
    for name, m in model.named_modules():
        if type(m).__name__ == "SqueezeExcitation":
            handles.append(
                m.scale_activation.register_forward_hook(lambda _m, _i, out, n=name: gates.__setitem__(n, out.detach()))
            )
        if type(m) is nn.LayerNorm:
            handles.append(m.register_forward_pre_hook(lambda _m, inp, n=name: ln_inputs.__setitem__(n, inp[0].detach())))
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in handles:
            h.remove()
    return gates, ln_inputs


def _hand_frozen(model: nn.Module, gates: dict, ln_inputs: dict, r: int) -> nn.Module:
    """A copy linearised by hand at reference image ``r``."""
    frozen = copy.deepcopy(model)
    for name, m in list(frozen.named_modules()):
        if isinstance(m, RELU_LIKE):
            replace_module(frozen, name, nn.Identity())
    for name, gate in gates.items():  # SE: x * sigmoid(f(x)) → x * gate_ref
        replace_module(frozen, name, Constant(gate[r : r + 1]))
    for name, x in ln_inputs.items():  # LayerNorm over the last dim with the reference's mean and var
        ln = model.get_submodule(name)
        replace_module(frozen, name, frozen_layer_norm(ln, x[r : r + 1]))
    return frozen.eval()


def _reference_weights(model: nn.Module, from_layer: str, to_layer: str, images: torch.Tensor) -> torch.Tensor:
    gates, ln_inputs = _recorded(model, images)
    jac = [
        per_channel_jacobian(_hand_frozen(model, gates, ln_inputs, r), from_layer, to_layer, images[r : r + 1])
        for r in range(len(images))
    ]
    return support(torch.stack(jac).mean(0))


# ----------------------------------------------------------------------------- blocks


@pytest.mark.parametrize(
    "name, from_layer, to_layer, frozen, searched",
    [
        ("efficientnet_b0", "features.2.0", "features.2.1", ["features.2.1.block.2.scale_activation: sigmoid()#0 output"], True),
        ("mobilenet_v3_small", "features.3", "features.4", ["features.4.block.2.scale_activation: hardsigmoid()#0 output"], True),
        ("regnet_y_400mf", "trunk_output.block1", "trunk_output.block2.block2-0", ["trunk_output.block2.block2-0.f.se.scale_activation: sigmoid()#0 output"], True),
        ("convnext_tiny", "features.1.0", "features.1.1", ["features.1.1.block.2: layer_norm()#0 statistics"], False),
    ],
)
def test_block_equals_hand_frozen_per_channel_reference(name, from_layer, to_layer, frozen, searched):
    """SE gates are one value per channel, so a smaller input replaying them gives the reference's
    result (the size search is on); ConvNeXt's layer norm statistics vary with the position."""
    model = _model(name)
    images = _images(2, seed=3)
    conn = connection_weights(model, from_layer, to_layer, reference=images)
    ref = _reference_weights(model, from_layer, to_layer, images)
    assert_close(conn.weights, ref)
    assert conn.kind == "expanded" and conn.policy == "default"
    assert [str(f) for f in conn.frozen] == frozen
    assert torch.equal(conn.reference.images, images) and conn.reference.shape == (3, SIZE, SIZE)
    plan = expanded_mod._plan_for(model, from_layer, to_layer, None, None, "default", images)
    assert (plan.geometry.hw[0] < SIZE) == searched and plan.frozen.n == 2
    # the frozen values matter: another reference gives weights that differ by more than the tolerance
    other = expanded_weights(model, from_layer, to_layer, reference=_images(1, seed=4))
    assert other.shape == ref.shape and float((other - ref).abs().max()) > 2e-5 * float(ref.abs().max())


def test_efficientnet_two_blocks_with_stride_and_default_noise_reference():
    model = _model("efficientnet_b0")
    conn = connection_weights(model, "features.1", "features.2.1", channels=[0, 5, 23], input_shape=(3, SIZE, SIZE))
    assert [f.module for f in conn.frozen] == ["features.2.0.block.2.scale_activation", "features.2.1.block.2.scale_activation"]
    assert conn.reference.description == f"smooth noise: 4 images 3x{SIZE}x{SIZE}, seed 0"
    assert conn.channels == (0, 5, 23)
    ref = _reference_weights(model, "features.1", "features.2.1", conn.reference.images)
    assert_close(conn.weights, ref[[0, 5, 23]])


@pytest.mark.filterwarnings("ignore:the receptive field")  # 64 px: layer2's field reaches layer1's border
def test_resnet_stage_and_bottleneck_block_nothing_frozen():
    for name, src, dst in [("resnet18", "layer1", "layer2"), ("resnet50", "layer1.2", "layer2.0")]:
        model = _model(name)
        default = connection_weights(model, src, dst, input_shape=(3, SIZE, SIZE))
        article = expanded_weights(model, src, dst, input_shape=(3, SIZE, SIZE), policy="article")
        assert torch.equal(default.weights, article)
        assert default.frozen == () and default.reference is None  # the reference does not matter
        images = _images(1, seed=5)
        assert torch.equal(expanded_weights(model, src, dst, reference=images, input_shape=(3, SIZE, SIZE)), article)
        ref = _reference_weights(model, src, dst, images)
        assert_close(default.weights, ref)


# ----------------------------------------------------------------------------- dense heads


def test_dense_heads_cover_the_whole_map():
    resnet = _model("resnet18")
    E = expanded_weights(resnet, "layer4", "fc", input_shape=(3, SIZE, SIZE))
    golden = resnet.fc.weight.detach()[:, :, None, None].expand(-1, -1, 2, 2) / 4  # avg pool over 2x2, then fc
    assert E.shape == (1000, 512, 2, 2)
    assert_close(E, golden)

    mobile = _model("mobilenet_v3_small")  # Linear, Hardswish (→ identity), Dropout, Linear
    E = expanded_weights(mobile, "features.12", "classifier.3", channels=[0, 7], input_shape=(3, SIZE, SIZE))
    w = (mobile.classifier[3].weight @ mobile.classifier[0].weight).detach()[[0, 7]]
    assert_close(E, w[:, :, None, None].expand(-1, -1, 2, 2) / 4)
    dense = expanded_weights(mobile, "classifier.0", "classifier.3", channels=[0, 7], input_shape=(3, SIZE, SIZE))
    assert_close(dense, mobile.classifier[3].weight.detach()[[0, 7], :, None, None])  # [out, in, 1, 1]


def test_convnext_head_freezes_layernorm2d_statistics():
    model = _model("convnext_tiny")
    images = _images(2, seed=6)
    conn = connection_weights(model, "features.7", "classifier.2", channels=[3, 999], reference=images)
    assert [str(f) for f in conn.frozen] == ["classifier.0: layer_norm()#0 statistics"]
    store = {}
    h = model.classifier[0].register_forward_pre_hook(lambda _m, inp: store.__setitem__("x", inp[0].detach()))
    with torch.no_grad():
        model(images)
    h.remove()
    ln, fc = model.classifier[0], model.classifier[2]
    var = store["x"].var(1, unbiased=False).flatten()[:, None]  # per image: over the 768 channels of the pooled map
    rstd = 1 / torch.sqrt(var + ln.eps)  # [R, 1]
    per_image = fc.weight.detach()[[3, 999]][None] * ln.weight.detach() * rstd[:, None, :]  # [R, 2, 768]
    assert_close(conn.weights, (per_image.mean(0) / 4)[:, :, None, None].expand(-1, -1, 2, 2))
    assert conn.weights.shape == (2, 768, 2, 2)


def test_per_call_layers_of_a_module_that_runs_twice():
    """ResNet blocks call one ``relu`` twice: ``relu#1 → relu#2`` is conv2 and eval-mode bn2, so the
    expanded weights are conv2's kernel times bn2's scale; the bare name is refused with the choices."""
    model = _model("resnet18")
    block = model.layer1[0]
    E = expanded_weights(model, "layer1.0.relu#1", "layer1.0.relu#2", input_shape=(3, SIZE, SIZE))
    bn = block.bn2
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    assert_close(E, block.conv2.weight.detach() * scale[:, None, None, None])
    conn = connection_weights(model, "layer1.0.relu#1", "layer1.0.relu#2", channels=[3], input_shape=(3, SIZE, SIZE))
    assert conn.kind == "expanded" and torch.equal(conn.weights, E[[3]])
    with pytest.raises(ValueError, match=r"'layer1.0.relu' runs 2 times in one forward pass; name one call: layer1.0.relu#1, layer1.0.relu#2"):
        expanded_weights(model, "layer1.0.relu", "layer1.1", input_shape=(3, SIZE, SIZE))
    # per example, with the real nonlinearities: the gradient at the first call's output, not the second's
    x = _images(1, seed=7)
    calls = []

    def second_call_is_free(_m, _i, out):
        calls.append(out)
        if len(calls) == 1:
            calls[0] = out.detach().requires_grad_(True)
            return calls[0]
        return None

    h = block.relu.register_forward_hook(second_call_is_free)
    try:
        with torch.enable_grad():
            model(x)
            c = int(calls[1][0, :, 8, 8].argmax())  # a unit that is on there
            (g,) = torch.autograd.grad(calls[1][0, c, 8, 8], calls[0])
    finally:
        h.remove()
    pe = per_example_connections(model, x, "layer1.0.relu#1", f"layer1.0.relu#2:{c}@8,8")
    assert pe.shape == (1, 64, 3, 3)
    assert_close(pe[0], g[0, :, 7:10, 7:10])
