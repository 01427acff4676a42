"""Activation layouts: detection on every family, overrides, canonical views, objectives."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.swin_transformer import SwinTransformer

from circuits import layouts
from circuits.featurevis.examples import objective_values
from circuits.featurevis.objectives import as_objective, channel, direction, evaluate_batch, neuron
from circuits.layers import UnknownLayerError, capture, replace_activation
from circuits.layouts import KINDS, Layout, clear_layout, get_layout, get_layouts, set_layout

pytestmark = pytest.mark.usefixtures("one_thread")

VIT_BLOCK = "encoder.layers.encoder_layer_1"


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
    ).eval()


@pytest.fixture(scope="module")
def swin():
    torch.manual_seed(0)
    return SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=[2, 2], num_classes=10
    ).eval()


@pytest.fixture(scope="module")
def convnext():
    torch.manual_seed(0)
    return ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=10).eval()


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


class RegisterViT(nn.Module):
    """A one-block ViT with a class token and 4 register tokens before the 3×5 patch grid."""

    def __init__(self, dim: int = 24):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls_and_registers = nn.Parameter(torch.randn(1, 5, dim))
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_and_registers.expand(x.shape[0], -1, -1), tokens], 1)
        tokens = tokens + self.mlp(self.norm(tokens))
        return self.head(tokens[:, 0])


# --------------------------------------------------------------------------- detection


def test_resnet_is_channels_first_and_its_head_dense(resnet18):
    lays = get_layouts(resnet18, ["layer1", "layer2.0.conv1", "layer4", "avgpool", "fc"], input_shape=(3, 64, 64))
    assert lays["layer1"] == Layout("nchw", 64, 16, 16)
    assert lays["layer2.0.conv1"] == Layout("nchw", 128, 8, 8)
    assert lays["layer4"] == Layout("nchw", 512, 2, 2)
    assert lays["avgpool"] == Layout("nchw", 512, 1, 1)
    assert lays["fc"] == Layout("dense", 10)


def test_convnext_block_internals_are_channels_last(convnext):
    lays = get_layouts(convnext, input_shape=(3, 32, 32))
    block = "features.1.0.block"
    assert lays[f"{block}.0"].kind == "nchw"  # depthwise conv
    for i in (1, 2, 3, 4, 5):  # Permute, LayerNorm, Linear, GELU, Linear
        assert lays[f"{block}.{i}"].kind == "nhwc", i
    assert lays[f"{block}.3"] == Layout("nhwc", 64, 8, 8)
    assert lays[f"{block}.6"].kind == "nchw"  # permuted back
    assert lays["features.1.0"] == Layout("nchw", 16, 8, 8)
    assert lays["features.0.1"].kind == "nchw"  # LayerNorm2d normalises the channels of NCHW


def test_swin_stages_are_channels_last(swin):
    lays = get_layouts(swin, input_shape=(3, 32, 32))
    assert lays["features.0"] == Layout("nhwc", 16, 8, 8)
    assert lays["features.1"] == Layout("nhwc", 16, 8, 8)
    assert lays["features.1.0.mlp.0"] == Layout("nhwc", 64, 8, 8)
    assert lays["features.2"] == Layout("nhwc", 32, 4, 4)  # patch merging
    assert lays["features.3"] == Layout("nhwc", 32, 4, 4)
    assert lays["permute"] == Layout("nchw", 32, 4, 4)
    assert lays["head"] == Layout("dense", 10)


def test_vit_blocks_are_tokens_with_one_class_token(vit):
    lays = get_layouts(vit)  # the input size comes from the model's image_size
    assert lays["conv_proj"] == Layout("nchw", 32, 4, 4)
    for name in ("encoder.dropout", "encoder.layers.encoder_layer_0", VIT_BLOCK, "encoder.ln"):
        assert lays[name] == Layout("tokens", 32, 4, 4, n_prefix=1), name
    assert lays[f"{VIT_BLOCK}.mlp.0"] == Layout("tokens", 64, 4, 4, n_prefix=1)
    assert lays[f"{VIT_BLOCK}.self_attention"].kind == "tokens"  # a tuple output: its first tensor
    assert lays["heads.head"] == Layout("dense", 1000)
    assert layouts.channels(vit, VIT_BLOCK) == 32
    assert layouts.grid_size(vit, VIT_BLOCK) == (4, 4)


def test_register_tokens_are_prefix_tokens():
    torch.manual_seed(0)
    model = RegisterViT().eval()
    lays = get_layouts(model, input_shape=(3, 12, 20))  # a 3×5 patch grid, not square
    assert lays["norm"] == Layout("tokens", 24, 3, 5, n_prefix=5)
    assert lays["mlp.0"] == Layout("tokens", 48, 3, 5, n_prefix=5)
    assert lays["mlp"] == Layout("tokens", 24, 3, 5, n_prefix=5)
    x = torch.rand(2, 3, 12, 20)
    with capture(model, "mlp") as acts:
        model(x)
    lay = lays["mlp"]
    assert lay.prefix(acts["mlp"]).shape == (2, 5, 24)
    assert torch.equal(lay.canonical(acts["mlp"])[:, :, 1, 2], acts["mlp"][:, 5 + 1 * 5 + 2])


def test_trained_model_layouts_are_all_nchw_or_dense(fashion_model):
    from circuits.layers import list_layers

    lays = get_layouts(fashion_model)
    assert {lay.kind for lay in lays.values()} == {"nchw", "dense"}
    shapes = {r.name: r.output_shape for r in list_layers(fashion_model)}
    for name, lay in lays.items():
        assert lay.shape == shapes[name], name
    assert lays["mixed4a"] == Layout("nchw", 224, 7, 7)
    assert lays["logits"] == Layout("dense", 10)


def test_detection_is_cached_on_the_model_and_follows_structure_changes():
    model = torchvision.models.resnet18(num_classes=10).eval()
    calls = []
    handle = model.conv1.register_forward_hook(lambda *a: calls.append(1))
    try:
        get_layouts(model, ["layer1"], input_shape=(3, 64, 64))
        get_layouts(model, ["layer2"], input_shape=(3, 64, 64))
        assert len(calls) == 1, "the probe forward ran again for the same model and input shape"
        get_layout(model, "layer1", input_shape=(3, 32, 32))
        assert len(calls) == 2
        model.fc = nn.Sequential(nn.Linear(512, 4))  # the module tree changed: detect again
        assert get_layout(model, "fc.0", input_shape=(3, 64, 64)) == Layout("dense", 4)
        assert len(calls) == 3
    finally:
        handle.remove()


# --------------------------------------------------------------------------- overrides


def test_set_layout_overrides_and_downstream_follows(swin):
    model = copy.deepcopy(swin)
    model.input_shape = (3, 32, 32)
    assert get_layout(model, "features.1.0").kind == "nhwc"
    set_layout(model, "features.0", "nchw")
    lay = get_layout(model, "features.0")
    assert lay == Layout("nchw", 8, 8, 16) and lay.source == "user"
    # the next block only hands on features.0's activation (plus a residual): it follows
    assert get_layout(model, "features.1.0") == Layout("nchw", 8, 8, 16)
    assert get_layout(model, "features.1.0.norm1").kind == "nhwc"  # a LayerNorm: the last axis, still
    clone = copy.deepcopy(model)  # the override travels with the model
    assert get_layout(clone, "features.0").source == "user"
    clear_layout(model, "features.0")
    assert get_layout(model, "features.0") == Layout("nhwc", 16, 8, 8)
    assert get_layout(model, "features.1.0") == Layout("nhwc", 16, 8, 8)


def test_set_layout_tokens_with_prefix_and_grid(vit):
    model = copy.deepcopy(vit)
    set_layout(model, VIT_BLOCK, "tokens", n_prefix=1, grid=(2, 8))
    assert get_layout(model, VIT_BLOCK) == Layout("tokens", 32, 2, 8, n_prefix=1)
    set_layout(model, VIT_BLOCK, Layout("tokens", 32, 4, 4, n_prefix=1))
    assert get_layout(model, VIT_BLOCK) == Layout("tokens", 32, 4, 4, n_prefix=1)
    clear_layout(model)
    assert get_layout(model, VIT_BLOCK).source == "detected"


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_bad_layouts_are_one_line_errors_that_say_what_is_valid(vit, resnet18):
    model = copy.deepcopy(vit)
    with pytest.raises(ValueError) as e:
        set_layout(model, VIT_BLOCK, "nwhc")
    assert "nchw, nhwc, tokens, dense" in _one_line(e)
    with pytest.raises(UnknownLayerError) as e:
        set_layout(model, "encoder.layers.encoder_layer_9", "tokens")
    assert "encoder_layer_1" in _one_line(e)
    set_layout(model, VIT_BLOCK, "nhwc")  # a 3-D activation cannot be channels-last
    with pytest.raises(ValueError) as e:
        get_layout(model, VIT_BLOCK)
    assert "[batch, h, w, channels]" in _one_line(e) and "[batch, 17, 32]" in _one_line(e)
    with pytest.raises(ValueError) as e:
        set_layout(model, VIT_BLOCK, "nchw", n_prefix=1)
    _one_line(e)
    lay = get_layout(resnet18, "fc", input_shape=(3, 64, 64))
    with pytest.raises(ValueError) as e:
        lay.check_position("fc", (0, 0))
    assert "dense" in _one_line(e) and "'fc:0'" in _one_line(e)
    with pytest.raises(ValueError) as e:
        get_layout(vit, VIT_BLOCK).check_channel(VIT_BLOCK, 32)
    assert "0..31" in _one_line(e)
    with pytest.raises(ValueError) as e:
        get_layout(vit, VIT_BLOCK).check_position(VIT_BLOCK, (4, 0))
    assert "patch grid is 4x4" in _one_line(e)


# --------------------------------------------------------------------------- views


@st.composite
def _layout_and_tensor(draw):
    kind = draw(st.sampled_from(KINDS))
    c = draw(st.integers(1, 5))
    h, w = (1, 1) if kind == "dense" else (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    p = draw(st.integers(0, 3)) if kind == "tokens" else 0
    lay = Layout(kind, c, h, w, p)
    b = draw(st.integers(1, 3))
    return lay, torch.randn(b, *lay.shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))


@settings(max_examples=60, deadline=None)
@given(_layout_and_tensor())
def test_canonical_round_trip(case):
    lay, t = case
    canon = lay.canonical(t)
    assert canon.shape == (t.shape[0], lay.channels, lay.height, lay.width)
    assert torch.equal(lay.from_canonical(canon, prefix=lay.prefix(t) if lay.n_prefix else None), t)
    assert torch.equal(lay.positions(t), canon.flatten(2))
    y, x = lay.centre()
    assert torch.equal(lay.at(t, "center"), canon[:, :, y, x])
    assert lay.fit(t.shape[1:]) == lay


def test_canonical_is_a_view_and_knows_each_kind():
    t = torch.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5)
    nhwc = Layout.from_shape(t.shape[1:], "nhwc")  # h=3, w=4, c=5
    assert torch.equal(nhwc.canonical(t), t.permute(0, 3, 1, 2))
    assert nhwc.canonical(t).data_ptr() == t.data_ptr()
    tok = torch.arange(2 * 10 * 6.0).reshape(2, 10, 6)  # 1 prefix + 3×3
    lay = Layout.from_shape(tok.shape[1:], "tokens")
    assert (lay.n_prefix, lay.grid) == (1, (3, 3))
    assert torch.equal(lay.canonical(tok)[:, :, 2, 1], tok[:, 1 + 2 * 3 + 1])
    assert lay.canonical(tok).data_ptr() == tok[:, 1:].data_ptr()
    with pytest.raises(ValueError, match="pass prefix"):
        lay.from_canonical(lay.canonical(tok))
    dense = Layout.from_shape((7,), "dense")
    assert dense.canonical(torch.ones(2, 7)).shape == (2, 7, 1, 1)
    assert Layout.from_shape((17, 24), "tokens").fit((50, 24)) == Layout("tokens", 24, 7, 7, 1)  # another input size
    assert Layout("tokens", 24, 3, 5, 1).fit((1 + 12 * 20, 24)) == Layout("tokens", 24, 12, 20, 1)


def test_from_canonical_replaces_a_vit_block_exactly(vit):
    x = torch.rand(2, 3, 32, 32)
    lay = get_layout(vit, VIT_BLOCK)
    with capture(vit, [VIT_BLOCK, "encoder.ln"]) as acts:
        vit(x)
        act, out = acts[VIT_BLOCK], acts["encoder.ln"]
        same = lay.from_canonical(lay.canonical(act), prefix=lay.prefix(act))
        with replace_activation(vit, VIT_BLOCK, same):
            vit(x)
        assert torch.equal(acts["encoder.ln"], out)
        canon = lay.canonical(act).clone()
        canon[:, :, 1, 2] = 0  # one patch zeroed
        with replace_activation(vit, VIT_BLOCK, lay.from_canonical(canon, prefix=lay.prefix(act))):
            vit(x)
        assert torch.equal(acts["encoder.ln"][:, 0], out[:, 0])  # the class token kept
        # the last block feeds a per-token LayerNorm: the zeroed token (y=1, x=2) comes out as its bias
        bias = vit.encoder.ln.bias.detach().expand(2, -1)
        torch.testing.assert_close(acts["encoder.ln"][:, 1 + 1 * 4 + 2], bias)
        assert not torch.allclose(acts["encoder.ln"][:, 1 + 2 * 4 + 1], bias)


# --------------------------------------------------------------------------- objectives


def test_vit_channel_objective_is_the_mean_over_patch_tokens(vit):
    x = torch.rand(3, 3, 32, 32)
    lays = get_layouts(vit, [VIT_BLOCK])
    with capture(vit, VIT_BLOCK) as acts:
        vit(x)
    act = acts[VIT_BLOCK]  # [3, 1 + 16, 32]
    d = 5
    obj = as_objective(f"{VIT_BLOCK}:{d}")
    obj.validate(lays)
    expected = act[:, 1:, d].mean(1)  # patch tokens only, class token left out
    torch.testing.assert_close(obj(acts, lays), expected)
    assert not torch.allclose(expected, act[:, 0].mean(-1))  # not "token 0" as the shape-blind read
    # the same through dataset examples, end to end (layouts detected inside)
    torch.testing.assert_close(objective_values(vit, [f"{VIT_BLOCK}:{d}"], x)[0], expected)
    # neurons are patches on the 4×4 grid; the default one is the centre patch (2, 2)
    torch.testing.assert_close(neuron(VIT_BLOCK, d, (1, 3))(acts, lays), act[:, 1 + 1 * 4 + 3, d])
    torch.testing.assert_close(neuron(VIT_BLOCK, d)(acts, lays), act[:, 1 + 2 * 4 + 2, d])
    vec = torch.randn(32)
    torch.testing.assert_close(direction(VIT_BLOCK, vec)(acts, lays), (act[:, 1:] @ vec).mean(1))
    with pytest.raises(ValueError, match=r"0\.\.31"):  # channels are the 32 features, not 17 tokens
        as_objective(f"{VIT_BLOCK}:32").validate(lays)


def test_swin_channel_objective_reads_the_last_axis(swin):
    x = torch.rand(2, 3, 32, 32)
    lays = get_layouts(swin, ["features.1"], input_shape=(3, 32, 32))
    with capture(swin, "features.1") as acts:
        swin(x)
    act = acts["features.1"]  # [2, 8, 8, 16]
    torch.testing.assert_close(channel("features.1", 11)(acts, lays), act[..., 11].mean((1, 2)))
    torch.testing.assert_close(neuron("features.1", 11, (2, 5))(acts, lays), act[:, 2, 5, 11])
    torch.testing.assert_close(objective_values(swin, ["features.1:11"], x)[0], act[..., 11].mean((1, 2)))
    objs = [as_objective("features.1:3"), as_objective("features.1:7@1,1")]
    expected = torch.stack([act[0, ..., 3].mean(), act[1, 1, 1, 7]])
    torch.testing.assert_close(evaluate_batch(objs, acts, lays), expected)
    with pytest.raises(ValueError, match=r"0\.\.15"):
        as_objective("features.1:16").validate(lays)


def test_dense_target_with_a_position_is_refused(resnet18):
    lays = get_layouts(resnet18, ["fc"], input_shape=(3, 64, 64))
    with pytest.raises(ValueError, match="dense") as e:
        as_objective("fc:3@0,0").validate(lays)
    _one_line(e)
    as_objective("fc:3").validate(lays)


# --------------------------------------------------------------------------- timm (optional)


def test_timm_models_when_installed():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, reg_tokens=4, num_classes=5
    ).eval()
    assert get_layout(vit, "blocks.0") == Layout("tokens", 32, 4, 4, n_prefix=5)  # class + 4 registers
    assert get_layout(vit, "patch_embed") == Layout("tokens", 32, 4, 4, n_prefix=0)
    pooled = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, class_token=False, global_pool="avg"
    ).eval()
    assert get_layout(pooled, "blocks.0") == Layout("tokens", 32, 4, 4, n_prefix=0)
    cnx = timm.models.convnext.ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), conv_mlp=False, num_classes=5).eval()
    lays = get_layouts(cnx, input_shape=(3, 64, 64))
    assert lays["stages.1.blocks.0.norm"] == Layout("nhwc", 16, 8, 8)
    assert lays["stages.1.blocks.0.mlp.fc1"] == Layout("nhwc", 64, 8, 8)
    assert lays["stages.1.blocks.0"] == Layout("nchw", 16, 8, 8)
    swin = timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=64, window_size=2, embed_dim=24,
        depths=(1, 1), num_heads=(1, 2), num_classes=5,
    ).eval()
    lays = get_layouts(swin)
    assert lays["layers.0"] == Layout("nhwc", 24, 16, 16)
    assert lays["layers.1"] == Layout("nhwc", 48, 8, 8)
    assert lays["layers.1.blocks.0.mlp.fc1"] == Layout("tokens", 192, 8, 8)  # the block flattens its map
