"""circuits.wiring: the layer graph of one probe pass, and what is read off it, on the bundled
model and on torchvision models of several families (random init, small inputs)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from circuits import wiring
from circuits.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fashion():
    return load_model()


def _tv(name: str, size: int, **kw) -> nn.Module:
    torch.manual_seed(0)
    m = torchvision.models.get_model(name, weights=None, **kw).eval()
    m.input_shape = (3, size, size)
    return m


def test_graph_records_calls_and_is_cached(fashion):
    g = wiring.layer_graph(fashion)
    assert g is wiring.layer_graph(fashion)  # cached per model and input shape
    assert g.output_shape("mixed3b") == (160, 14, 14)
    assert g.call("mixed3b").inputs and g.n_calls("mixed3b") == 1
    assert g.order.index("mixed3a") < g.order.index("mixed3b")
    assert wiring.layer_graph(fashion, (1, 32, 32)).output_shape("mixed3b") == (160, 16, 16)
    assert wiring.layer_graph(fashion, refresh=True) is not g


def test_channel_counts_and_branches(fashion):
    counts = wiring.channel_counts(fashion)
    assert counts["mixed3a"] == 112 and counts["mixed3b"] == 160 and counts["mixed4a"] == 224
    branches = wiring.concat_branches(fashion, "mixed3b")
    assert [b for b, _, _ in branches] == ["mixed3b_1x1", "mixed3b_3x3", "mixed3b_5x5", "mixed3b_pool_reduce"]
    assert sum(n for _, _, n in branches) == 160 and [f for _, f, _ in branches] == [0, 48, 112, 136]
    assert wiring.concat_branches(fashion, "mixed3b_3x3") is None


def test_adjacent_conv(fashion):
    modules = dict(fashion.named_modules())
    # a conv and the ReLU after it are both adjacent to the conv's input layer
    conv = modules["mixed3b_3x3_pre_relu_conv"]
    assert wiring.adjacent_conv(fashion, "mixed3b_3x3_bottleneck", "mixed3b_3x3") is conv
    assert wiring.adjacent_conv(fashion, "mixed3b_3x3_bottleneck", "mixed3b_3x3_pre_relu_conv") is conv
    # across a concatenation, a bottleneck, or in the wrong direction: not adjacent
    assert wiring.adjacent_conv(fashion, "mixed3a", "mixed3b") is None
    assert wiring.adjacent_conv(fashion, "mixed3a", "mixed3b_3x3") is None
    assert wiring.adjacent_conv(fashion, "mixed3b_3x3", "mixed3b_3x3_bottleneck") is None


def test_per_call_names_on_a_reused_module():
    m = _tv("resnet18", 64)
    g = wiring.layer_graph(m)
    assert g.n_calls("layer1.0.relu") == 2  # a BasicBlock applies its one ReLU twice
    assert g.call("layer1.0.relu") is None  # a bare name of a reused module means no single call
    first, second = g.call("layer1.0.relu#1"), g.call("layer1.0.relu#2")
    assert first.output_shape == second.output_shape == (1, 64, 16, 16) and first is not second
    assert g.call("layer1.0.relu#3") is None
    with pytest.raises(ValueError, match="module#k"):
        g.call("layer1.0.relu#0")
    assert "layer1.0.relu" not in wiring.channel_counts(m)


@pytest.mark.parametrize("name, size, first_blocks, n_blocks", [
    ("resnet18", 64, ["layer1.0", "layer1.1", "layer2.0"], 8),
    ("mobilenet_v3_small", 64, ["features.0", "features.1", "features.2"], 13),
    ("efficientnet_b0", 64, ["features.0", "features.1", "features.2.0"], 18),
    ("vgg11", 32, ["features.1", "features.4", "features.7"], 8),  # no blocks: the ReLU after each conv
    ("squeezenet1_0", 64, ["features.3", "features.4", "features.5"], 9),
])
def test_blocks_of_any_cnn(name, size, first_blocks, n_blocks):
    m = _tv(name, size)
    blocks = wiring.block_outputs(m)
    assert blocks[:3] == first_blocks and len(blocks) == n_blocks
    layers = wiring.interesting_layers(m)
    assert len(layers) == 3 and all(l in blocks[1:] for l in layers)
    assert layers == sorted(layers, key=blocks.index)
    for layer in layers:  # every paged layer shows the block before it
        assert wiring.default_upstream(m, layer) == [blocks[blocks.index(layer) - 1]]


def test_blocks_of_transformers():
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=4, num_heads=2,
                                                hidden_dim=16, mlp_dim=32).eval()
    vit.input_shape = (3, 32, 32)
    assert wiring.block_outputs(vit) == [f"encoder.layers.encoder_layer_{i}" for i in range(4)]
    assert wiring.default_upstream(vit, "encoder.layers.encoder_layer_2") == ["encoder.layers.encoder_layer_1"]
    assert wiring.channel_counts(vit)["encoder.layers.encoder_layer_0"] == 16  # the feature axis, not the 17 tokens
    swin = _tv("swin_t", 64)
    blocks = wiring.block_outputs(swin)
    assert blocks[:4] == ["features.0", "features.1.0", "features.1.1", "features.2"]
    assert "features.5.5" in blocks and len(blocks) == 16


def test_lucid_defaults(fashion):
    assert wiring.interesting_layers(fashion) == ["mixed3a", "mixed3b", "mixed4a"]
    assert wiring.default_upstream(fashion, "mixed3b") == ["mixed3a", "mixed3b_3x3_bottleneck", "mixed3b_5x5_bottleneck"]
    assert wiring.default_upstream(fashion, "mixed3a") == ["conv2d2", "mixed3a_3x3_bottleneck", "mixed3a_5x5_bottleneck"]


def test_errors_speak_both_cli_and_python():
    m = _tv("resnet18", 64)
    with pytest.raises(ValueError, match=r"--upstream LAYER") as err:
        wiring.default_upstream(m, "layer1.0")
    assert "first block" in str(err.value)
    flat = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).eval()
    flat.input_shape = (1, 2, 2)
    with pytest.raises(ValueError, match=r"--layers LAYER"):
        wiring.interesting_layers(flat)


def test_select_neurons(fashion):
    assert wiring.select_neurons(fashion, ["mixed3b"], 4) == {"mixed3b": [20, 60, 100, 140]}
    assert wiring.select_neurons(fashion, ["mixed3a"], ["mixed3b:7", "mixed3a:1"]) == {"mixed3a": [1], "mixed3b": [7]}
    with pytest.raises(ValueError, match="0..159"):
        wiring.select_neurons(fashion, ["mixed3b"], ["mixed3b:160"])
    with pytest.raises(ValueError, match="has a position"):  # a position is refused, never dropped
        wiring.select_neurons(fashion, ["mixed3b"], ["mixed3b:12@3,4"])
    with pytest.raises(ValueError, match="names a layer, not a neuron"):
        wiring.select_neurons(fashion, ["mixed3b"], ["mixed3b"])


class _PositionBias(nn.Module):
    """A block whose attention-like bias comes from an MLP on a buffer (Swin V2's ``cpb_mlp``):
    that MLP runs in the forward pass but does not depend on the input."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bias_mlp = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, c))
        self.register_buffer("coords", torch.randn(1, 2))

    def forward(self, x):
        return torch.relu(self.conv(x) + self.bias_mlp(self.coords)[0][None, :, None, None])


def test_modules_that_ignore_the_input_are_not_on_the_data_path():
    from circuits.figures.pages import _next_layer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _PositionBias(4), _PositionBias(4), nn.Flatten(),
                          nn.LazyLinear(5))
    model(torch.rand(1, 3, 8, 8))
    model.eval().input_shape = (3, 8, 8)
    graph = wiring.layer_graph(model)
    assert graph.input_free == {"1.bias_mlp", "1.bias_mlp.0", "1.bias_mlp.1", "1.bias_mlp.2",
                                "2.bias_mlp", "2.bias_mlp.0", "2.bias_mlp.1", "2.bias_mlp.2"}
    assert "1.conv" not in graph.input_free and "0" not in graph.input_free
    # the layer after block 1 is block 2 (not the position MLP that runs first inside it)
    assert _next_layer(model, "1") == "2"
    assert not any("bias_mlp" in u for u in wiring.default_upstream(model, "2"))


def test_next_layer_is_never_a_container_returning_the_same_tensor():
    """``layer1`` returns ``layer1.1``'s own output tensor: the outgoing connections of the last
    block of a stage go to the next stage's first layer, not to an identity "connection"."""
    from circuits.figures.pages import _next_layer

    m = _tv("resnet18", 64)
    graph = wiring.layer_graph(m)
    assert graph.call("layer1").output == graph.call("layer1.1").output
    assert _next_layer(m, "layer1.1") == "layer2.0"  # the next block
    for block in wiring.block_outputs(m, graph):
        nxt = _next_layer(m, block)
        assert nxt is not None and graph.call(nxt).output != graph.call(block).output, (block, nxt)
