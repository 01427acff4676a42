import pytest
import torch
from torch import nn

from circuits.layers import (
    AmbiguousLayerError,
    Target,
    UnknownLayerError,
    call_counts,
    capture,
    check_channel,
    get_layer,
    layer_names,
    list_layers,
    parse_target,
    replace_activation,
    run_until,
    split_call,
)
from circuits.models import FashionInception


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return FashionInception().eval()


def _n_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_unknown_layer_lists_close_matches(model):
    with pytest.raises(UnknownLayerError) as info:
        get_layer(model, "mixed3c")
    msg = str(info.value)
    assert "mixed3c" in msg and "mixed3a" in msg and "mixed3b" in msg
    assert "mixed3a" in info.value.close_matches


def test_layer_names_are_lucid_style(model):
    names = layer_names(model)
    for n in ["conv2d0", "conv2d2", "mixed3a", "mixed3b_3x3_bottleneck", "mixed3b_5x5", "mixed3b_pool_reduce", "logits"]:
        assert n in names


def test_capture_several_layers_in_one_forward(model):
    x = torch.rand(2, 1, 28, 28)
    with capture(model, ["conv2d2", "mixed3a", "mixed4a"]) as acts:
        out = model(x)
    assert acts["conv2d2"].shape == (2, 64, 14, 14)
    assert acts["mixed3a"].shape == (2, 112, 14, 14)
    assert acts["mixed4a"].shape == (2, 224, 7, 7)
    assert out.shape == (2, 10)
    assert _n_hooks(model) == 0
    # mixed3a is exactly the concatenation of its four branches
    with capture(model, ["mixed3a", "mixed3a_1x1", "mixed3a_3x3", "mixed3a_5x5", "mixed3a_pool_reduce"]) as a:
        model(x)
    cat = torch.cat([a["mixed3a_1x1"], a["mixed3a_3x3"], a["mixed3a_5x5"], a["mixed3a_pool_reduce"]], 1)
    assert torch.equal(cat, a["mixed3a"])


def test_hooks_removed_after_exception(model):
    with pytest.raises(RuntimeError, match="boom"):
        with capture(model, ["mixed3a", "mixed3b"]):
            model(torch.rand(1, 1, 28, 28))
            raise RuntimeError("boom")
    assert _n_hooks(model) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with replace_activation(model, "mixed3a", lambda t: t * 0):
            raise RuntimeError("boom")
    assert _n_hooks(model) == 0
    # an exception raised by the model itself inside run_until also leaves no hook
    with pytest.raises(RuntimeError):
        run_until(model, torch.rand(1, 3, 28, 28), "mixed3a")  # wrong channel count
    assert _n_hooks(model) == 0


def test_replace_activation_changes_downstream(model):
    x = torch.rand(1, 1, 28, 28)
    with capture(model, "mixed3a") as acts:
        model(x)
    zeros = torch.zeros_like(acts["mixed3a"])
    with replace_activation(model, "mixed3a", zeros), capture(model, "mixed3b_1x1_pre_relu_conv") as a2:
        model(x)
    bias = model.mixed3b_1x1_pre_relu_conv.bias
    assert torch.allclose(a2["mixed3b_1x1_pre_relu_conv"][0, :, 3, 3], bias)
    with pytest.raises(ValueError, match="shape"):
        with replace_activation(model, "mixed3a", torch.zeros(1, 5, 14, 14)):
            model(x)


def test_run_until_stops_early_and_matches_full_forward(model):
    calls = []
    handle = model.logits.register_forward_hook(lambda *a: calls.append(1))
    try:
        x = torch.rand(3, 1, 28, 28)
        # the first pass with bare names runs to the end: it makes sure each module runs once
        run_until(model, x, ["mixed3a", "conv2d2"])
        assert calls == [1]
        calls.clear()
        acts = run_until(model, x, ["mixed3a", "conv2d2"])
        assert not calls, "logits ran although only mixed3a was needed"
        with capture(model, ["mixed3a"]) as full:
            model(x)
        assert torch.equal(acts["mixed3a"], full["mixed3a"])
    finally:
        handle.remove()


def test_list_layers_shapes_and_params(model):
    rows = {r.name: r for r in list_layers(model)}
    assert rows["mixed3b"].output_shape == (160, 14, 14)
    assert rows["logits"].output_shape == (10,)
    assert rows["conv2d0_pre_relu_conv"].n_params == 32 * 1 * 3 * 3 + 32
    assert sum(r.n_params for r in rows.values()) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("mixed4a", Target("mixed4a")),
        ("mixed4a:476", Target("mixed4a", 476)),
        ("mixed4a:476@3,4", Target("mixed4a", 476, (3, 4))),
        ("features.3:7", Target("features.3", 7)),
        ("layer1.0.relu#2", Target("layer1.0.relu#2")),
        ("layer1.0.relu#2:5@1,1", Target("layer1.0.relu#2", 5, (1, 1))),
    ],
)
def test_parse_target(spec, expected):
    assert parse_target(spec) == expected
    assert str(parse_target(spec)) == spec


@pytest.mark.parametrize("bad", ["", ":3", "mixed4a:x", "mixed4a:-1", "mixed4a:3@1", "relu#0:1", "relu#x", "#2:1"])
def test_parse_target_errors(bad):
    with pytest.raises(ValueError):
        parse_target(bad)


def test_check_channel_states_range():
    with pytest.raises(ValueError, match=r"0\.\.111"):
        check_channel("mixed3a", 112, 112)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    import os
    from circuits._io import atomic_path, atomic_write_text

    target = tmp_path / "out.txt"
    atomic_write_text(target, "first")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    assert os.stat(target).st_mode & 0o044, "results must be readable by others, like any other file"


# --------------------------------------------------------------------------- per-call names


@pytest.fixture(scope="module")
def bottleneck_resnet():
    """torchvision's Bottleneck ResNet: each block calls its one ``relu`` three times."""
    from torchvision.models.resnet import Bottleneck, ResNet

    torch.manual_seed(0)
    model = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10).eval()
    model.input_shape = (3, 32, 32)
    return model


RELU = "layer1.0.relu"


def test_split_call():
    assert split_call("layer1.0.relu#3") == ("layer1.0.relu", 3)
    assert split_call("mixed3a") == ("mixed3a", None)
    with pytest.raises(ValueError, match="module#k"):
        split_call("relu#0")


def test_each_call_of_a_module_is_its_own_layer(bottleneck_resnet):
    model = bottleneck_resnet
    assert call_counts(model)[RELU] == 3
    x = torch.rand(2, 3, 32, 32)
    block = "layer1.0"
    with capture(model, [f"{RELU}#1", f"{RELU}#2", f"{RELU}#3", f"{block}.bn1", f"{block}.bn2", block]) as a:
        model(x)
    assert torch.equal(a[f"{RELU}#1"], torch.relu(a[f"{block}.bn1"]))
    assert torch.equal(a[f"{RELU}#2"], torch.relu(a[f"{block}.bn2"]))
    assert torch.equal(a[f"{RELU}#3"], a[block])  # the block's output is its last ReLU
    acts = run_until(model, x, [f"{RELU}#2"])
    assert torch.equal(acts[f"{RELU}#2"], a[f"{RELU}#2"])
    ran = []
    handle = model.layer1[0].conv3.register_forward_hook(lambda *args: ran.append(1))
    try:
        run_until(model, x, [f"{RELU}#2"])
        assert not ran, "run_until went past the second call"
    finally:
        handle.remove()
    # replacing the second call only: conv3 (no bias) then sees zeros; the first call is untouched
    with replace_activation(model, f"{RELU}#2", torch.zeros_like(a[f"{RELU}#2"])):
        with capture(model, [f"{block}.conv3", f"{RELU}#1"]) as b:
            model(x)
    assert torch.equal(b[f"{block}.conv3"], torch.zeros_like(b[f"{block}.conv3"]))
    assert torch.equal(b[f"{RELU}#1"], a[f"{RELU}#1"])
    assert _n_hooks(model) == 0


def test_resnet18_relu_calls_through_capture_and_run_until():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.rand(1, 3, 64, 64)
    with capture(model, [f"{RELU}#1", f"{RELU}#2", "layer1.0.bn1", "layer1.0"]) as a:
        model(x)
    assert torch.equal(a[f"{RELU}#1"], torch.relu(a["layer1.0.bn1"]))
    assert torch.equal(a[f"{RELU}#2"], a["layer1.0"])
    assert torch.equal(run_until(model, x, f"{RELU}#1")[f"{RELU}#1"], a[f"{RELU}#1"])
    with capture(model, ["relu", "bn1"]) as stem:  # the stem's ReLU runs once: its bare name is fine
        model(x)
    assert torch.equal(stem["relu"], torch.relu(stem["bn1"]))


def test_a_bare_name_of_a_repeated_module_is_refused_everywhere(bottleneck_resnet):
    model = bottleneck_resnet
    x = torch.rand(1, 3, 32, 32)
    expected = f"layer {RELU!r} runs 3 times in one forward pass; name one call: {RELU}#1, {RELU}#2, {RELU}#3"
    with pytest.raises(AmbiguousLayerError) as e:
        with capture(model, RELU):
            model(x)
    assert str(e.value) == expected
    with pytest.raises(AmbiguousLayerError) as e:
        run_until(model, x, [RELU])
    assert str(e.value) == expected
    with pytest.raises(AmbiguousLayerError) as e:
        with replace_activation(model, RELU, lambda t: t):
            model(x)
    assert str(e.value) == expected
    from circuits.layouts import get_layout

    with pytest.raises(AmbiguousLayerError) as e:
        get_layout(model, RELU)
    assert str(e.value) == expected
    with pytest.raises(UnknownLayerError) as e:
        run_until(model, x, [f"{RELU}#4"])
    assert f"valid: {RELU}#1, {RELU}#2, {RELU}#3" in str(e.value) and "\n" not in str(e.value)
    assert _n_hooks(model) == 0


def test_a_bare_name_is_refused_on_a_fresh_model_too():
    """Without remembered call counts the ambiguity shows on the first forward pass."""
    import torchvision

    model = torchvision.models.resnet18(num_classes=10).eval()
    with pytest.raises(AmbiguousLayerError, match=r"runs 2 times.*layer1\.0\.relu#2"):
        run_until(model, torch.rand(1, 3, 64, 64), [RELU])
    fresh = torchvision.models.resnet18(num_classes=10).eval()
    with pytest.raises(AmbiguousLayerError, match="runs 2 times"):
        with capture(fresh, RELU):
            fresh(torch.rand(1, 3, 64, 64))


def test_list_layers_and_layer_names_show_each_call(bottleneck_resnet):
    rows = {r.name: r for r in list_layers(bottleneck_resnet)}
    assert RELU not in rows
    assert [rows[f"{RELU}#{k}"].output_shape for k in (1, 2, 3)] == [(64, 8, 8), (64, 8, 8), (256, 8, 8)]
    assert rows["relu"].output_shape == (64, 16, 16)  # the stem's ReLU runs once: no '#'
    assert sum(r.n_params for r in rows.values()) == sum(p.numel() for p in bottleneck_resnet.parameters())
    names = layer_names(bottleneck_resnet, (3, 32, 32))
    assert f"{RELU}#3" in names and RELU not in names
    assert RELU in layer_names(bottleneck_resnet)  # without a forward pass: module names


def test_trace_leaves_the_model_as_it_was():
    from circuits.layers import example_input, trace

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    model.train()
    model[1].eval()  # a frozen batch norm inside a training model stays frozen
    assert example_input(model).shape == (1, 1, 224, 224)  # channels from the first convolution
    calls = trace(model, torch.rand(2, 1, 8, 8))
    assert [c.name for c in calls] == ["0", "1", "2", "3", "4"]
    assert calls[2].output.shape == (2, 4, 6, 6) and calls[2].inputs[0] is calls[1].output
    assert model.training and model[0].training and not model[1].training
    assert torch.equal(model[1].running_mean, torch.zeros(4))  # eval mode: no statistics updated
    assert _n_hooks(model) == 0


def test_parse_neuron_one_rule_for_weights_pages_and_figures() -> None:
    from circuits.layers import parse_neuron

    assert parse_neuron("layer1.0.relu#2:5") == ("layer1.0.relu#2", 5)
    with pytest.raises(ValueError, match="names a layer, not a neuron"):
        parse_neuron("mixed3b")
    with pytest.raises(ValueError, match="has a position, but pages differ"):
        parse_neuron("mixed3b:1@2,2", "pages differ")
