"""RenderSettings (one object for every render setting), how render/cache_requests take it,
activation memory per image, learning-rate schedules and the data-comparison flag."""

from __future__ import annotations

import inspect
import json
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import circuits.featurevis as fv
from circuits.featurevis import (
    RenderSettings,
    RenderWarning,
    Transforms,
    activation_floats_per_image,
    cache_requests,
    learning_rate,
    render,
    variable_names,
)
from circuits.featurevis.settings import SCHEDULES
from circuits.layers import capture, layer_names
from circuits.models import FashionInception

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fashion(fashion_random: nn.Module) -> nn.Module:
    return fashion_random


# --- the dataclass ----------------------------------------------------------------------

def test_defaults_and_normalisation() -> None:
    s = RenderSettings()
    assert (s.steps, s.size, s.param, s.seed, s.transforms, s.lr, s.schedule) == (512, None, "fft", 0, "default", None, None)
    t = RenderSettings(size=28, resize_to=[30, 32], transforms=None, redirected_relu=8)
    assert t.size == (28, 28) and t.resize_to == (30, 32) and t.transforms == "default" and t.redirected_relu == 8
    assert RenderSettings(transforms=False).transforms == "none"
    d = RenderSettings(transforms={"pad": 2, "jitter": 2})
    assert d.transforms == Transforms(pad=2, jitter=2)
    assert set(RenderSettings.IMAGE_FIELDS) | set(RenderSettings.SPEED_FIELDS) == set(RenderSettings.field_names())
    assert not set(RenderSettings.IMAGE_FIELDS) & set(RenderSettings.SPEED_FIELDS)
    assert fv.RenderSettings is RenderSettings
    with pytest.raises(dataclasses_frozen_error()):
        s.steps = 3  # type: ignore[misc]


def dataclasses_frozen_error() -> type:
    import dataclasses

    return dataclasses.FrozenInstanceError


@pytest.mark.parametrize("bad, match", [
    (dict(steps=-1), "steps must be a non-negative integer"),
    (dict(steps=2.5), "steps must be a non-negative integer"),
    (dict(size=0), "size must be positive"),
    (dict(size=(1, 2, 3)), r"size must be an int or \(height, width\)"),
    (dict(resize_to="big"), r"resize_to must be an int or \(height, width\)"),
    (dict(param="dct"), "param must be one of"),
    (dict(lr=0), "lr must be a positive finite number or None"),
    (dict(lr=float("nan")), "lr must be a positive finite number or None"),
    (dict(schedule="step"), "schedule must be one of"),
    (dict(transforms="wild"), "transforms must be one of"),
    (dict(transforms={"pad": 1, "wobble": 2}), r"unknown Transforms field\(s\) \['wobble'\]"),
    (dict(redirected_relu=-2), "redirected_relu must be"),
    (dict(decorrelate="yes"), "decorrelate must be True or False"),
    (dict(seed="0"), "seed must be an integer"),
])
def test_validation(bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RenderSettings(**bad)


_transforms = st.one_of(
    st.sampled_from(["default", "lucid", "none"]),
    st.builds(Transforms, pad=st.integers(0, 12), jitter=st.integers(1, 8), jitter2=st.integers(1, 4),
              scales=st.lists(st.floats(0.5, 2.0), min_size=1, max_size=4).map(tuple),
              angles=st.lists(st.floats(-30, 30), min_size=1, max_size=4).map(tuple)),
)


@settings(max_examples=60, deadline=None)
@given(
    steps=st.integers(0, 4096), size=st.one_of(st.none(), st.integers(1, 512), st.tuples(st.integers(1, 512), st.integers(1, 512))),
    param=st.sampled_from(["fft", "pixel"]), decorrelate=st.booleans(), seed=st.integers(-2**40, 2**40),
    transforms=_transforms, lr=st.one_of(st.none(), st.floats(1e-5, 10.0)), schedule=st.one_of(st.none(), st.sampled_from(SCHEDULES)),
    redirected_relu=st.one_of(st.booleans(), st.integers(0, 100)),
    resize_to=st.one_of(st.none(), st.integers(1, 512)), mixed_precision=st.booleans(),
    channels_last=st.one_of(st.none(), st.booleans()),
)
def test_json_round_trip(**kw: object) -> None:
    s = RenderSettings(**kw)  # type: ignore[arg-type]
    text = json.dumps(s.to_dict())
    back = RenderSettings.from_dict(json.loads(text))
    assert back == s
    assert back.to_dict() == s.to_dict()


def test_from_dict_and_replace_name_the_valid_keys() -> None:
    with pytest.raises(ValueError, match=r"unknown render setting\(s\) \['stpes'\]; valid: \['steps', 'size'"):
        RenderSettings.from_dict({"stpes": 3})
    s = RenderSettings(steps=7)
    assert s.replace(seed=3) == RenderSettings(steps=7, seed=3) and s.steps == 7
    with pytest.raises(TypeError, match=r"unknown render setting\(s\) \['colour'\]; valid: \[.*'lr'"):
        s.replace(colour=True)
    with pytest.raises(ValueError, match="lr must be"):
        s.replace(lr=-1.0)
    assert set(s.image_dict()) == set(RenderSettings.IMAGE_FIELDS)


# --- render and cache_requests take it --------------------------------------------------

def test_signatures_are_real() -> None:
    for fn in (render, cache_requests, variable_names):
        params = inspect.signature(fn).parameters
        assert list(params)[:3] == ["model", "targets", "settings"], fn
        assert params["settings"].default is None
    assert {"cache", "progress", "device", "batch_size", "reference"} <= set(inspect.signature(render).parameters)


def test_settings_and_keywords_are_the_same_render(fashion: nn.Module) -> None:
    s = RenderSettings(steps=3, seed=4, lr=0.1, schedule="cosine")
    a = render(fashion, ["mixed4a:1", "logits:2"], s, progress=False)
    b = render(fashion, ["mixed4a:1", "logits:2"], steps=3, seed=4, lr=0.1, schedule="cosine", progress=False)
    c = render(fashion, ["mixed4a:1", "logits:2"], {"steps": 3, "seed": 4, "lr": 0.1, "schedule": "cosine"}, progress=False)
    d = render(fashion, ["mixed4a:1", "logits:2"], RenderSettings(steps=9, seed=4), steps=3, lr=0.1, schedule="cosine",
               progress=False)
    for other in (b, c, d):
        assert torch.equal(a.images, other.images)
    assert a.settings == s
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['stpes'\]; valid: \[.*'batch_size'.*'steps'"):
        render(fashion, "mixed4a:1", stpes=3)
    with pytest.raises(TypeError, match="settings must be a RenderSettings"):
        variable_names(fashion, ["mixed4a:1"], "/tmp/cache")  # type: ignore[arg-type]


def test_cache_requests_follow_the_image_fields(fashion: nn.Module) -> None:
    base = cache_requests(fashion, ["mixed4a:1"], RenderSettings(steps=8))[0]
    assert base == cache_requests(fashion, ["mixed4a:1"], steps=8)[0]
    assert base["version"] >= 2 and base["steps"] == 8 and base["objective"] == "mixed4a:1"
    # speed-only settings and call arguments leave the request alone
    same = cache_requests(fashion, ["mixed4a:1"], RenderSettings(steps=8, channels_last=False), batch_size=3,
                          progress=False, cache=True)[0]
    assert same == base
    changes = dict(steps=9, size=24, param="pixel", seed=1, transforms="none", lr=0.2, schedule="onecycle",
                   redirected_relu=False, resize_to=32)
    for name, value in changes.items():
        other = cache_requests(fashion, ["mixed4a:1"], RenderSettings(steps=8).replace(**{name: value}))[0]
        assert other != base, name
    assert set(changes) | {"decorrelate", "mixed_precision"} == set(RenderSettings.IMAGE_FIELDS)
    # unset lr and schedule take the defaults for the image size (28 px: 0.1, cosine)
    assert base["lr"] == 0.1 and base["schedule"] == "cosine"
    assert cache_requests(fashion, ["mixed4a:1"], steps=8, lr=0.1, schedule="cosine")[0] == base
    big = cache_requests(fashion, ["mixed4a:1"], steps=8, size=128, resize_to=28)[0]
    assert (big["lr"], big["schedule"]) == (0.05, "constant") == fv.default_optimizer(128)
    # decorrelation does not apply to a grayscale model: same image, same request
    assert cache_requests(fashion, ["mixed4a:1"], steps=8, decorrelate=False)[0] == base
    # mixed precision only where the device has bfloat16
    amp = cache_requests(fashion, ["mixed4a:1"], steps=8, mixed_precision=True)[0]
    assert (amp != base) == fv.bf16_autocast_supported("cpu") == amp["mixed_precision"]
    assert cache_requests(fashion, ["mixed4a:1"], steps=8, mixed_precision=True, device="cuda")[0]["mixed_precision"]
    with pytest.raises(TypeError, match="cache_requests"):
        cache_requests(fashion, ["mixed4a:1"], colour=1)


def test_cache_request_is_what_render_stores(fashion: nn.Module, tmp_path) -> None:
    from circuits.featurevis import FeatureVisCache

    s = RenderSettings(steps=2, seed=5, schedule="onecycle")
    cache = FeatureVisCache(tmp_path)
    render(fashion, ["mixed3b:4", "logits:1"], s, cache=cache, progress=False)
    for req in cache_requests(fashion, ["mixed3b:4", "logits:1"], s):
        assert cache.get(req) is not None


# --- activation memory ------------------------------------------------------------------

def test_activation_floats_per_image(fashion: nn.Module) -> None:
    x = torch.zeros(1, 1, 28, 28)
    names = layer_names(fashion)
    upto = names[: names.index("mixed3a") + 1]
    with torch.no_grad(), capture(fashion, upto, detach=True) as acts:
        fashion(fashion.preprocess_input(x))
    expected = sum(v.numel() for v in acts.values()) + x.numel()
    assert activation_floats_per_image(fashion, "mixed3a") == expected
    assert activation_floats_per_image(fashion, ["mixed3a", "conv2d1"], 28) == expected
    assert activation_floats_per_image(fashion, "logits") > expected
    assert activation_floats_per_image(fashion, "conv2d0", (56, 56)) == 56 * 56 * (1 + 32 + 32)  # input, conv, ReLU

    from circuits.atlas import batch_size_for

    per_image = activation_floats_per_image(fashion, "mixed3a") * 4 * 3
    assert batch_size_for(fashion, "mixed3a", "cpu", free_bytes=10 * per_image) == 10


# --- learning-rate schedules ------------------------------------------------------------

def test_learning_rate_schedules() -> None:
    assert all(learning_rate(i, 100, 0.05) == 0.05 for i in range(100))
    cos = [learning_rate(i, 101, 0.1, "cosine") for i in range(101)]
    assert cos[0] == pytest.approx(0.1) and cos[50] == pytest.approx(0.055) and cos[100] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(cos, cos[1:]))
    one = [learning_rate(i, 100, 0.2, "onecycle") for i in range(100)]
    assert one[0] == pytest.approx(0.02) and max(one) == pytest.approx(0.2) and one.index(max(one)) == 9
    assert one[-1] == pytest.approx(0.02)


# --- comparison with data and non-finite values ------------------------------------------

def test_compare_with_data_flags_and_warns(fashion: nn.Module) -> None:
    targets = ["mixed4a:1", "logits:2"]
    r = render(fashion, targets, steps=2, progress=False)
    assert r.beats_data == [] and r.data_best is None
    v = r.objective_values
    with pytest.warns(RenderWarning, match=r"1 of 2 rendered image\(s\) do not beat the best data set example: logits:2"):
        r.compare_with_data([float(v[0]) - 1, float(v[1]) + 1])
    assert r.beats_data == [True, False] and r.below_data == ["logits:2"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r.compare_with_data({"mixed4a:1": float(v[0]) - 1})
    assert r.beats_data == [True, None] and math.isnan(float(r.data_best[1]))
    with pytest.raises(ValueError, match="expected 2"):
        r.compare_with_data([1.0])


def test_render_reference_data_set(fashion: nn.Module) -> None:
    from circuits.featurevis import objective_values

    torch.manual_seed(0)
    data = torch.rand(40, 1, 28, 28)
    targets = ["mixed4a:1", "logits:2"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RenderWarning)
        r = render(fashion, targets, steps=2, progress=False, reference=data)
    best = objective_values(fashion, targets, data).max(dim=1).values
    torch.testing.assert_close(r.data_best, best)
    assert r.beats_data == [bool(a > b) for a, b in zip(r.objective_values, best)]


class _Exploding(nn.Module):
    input_shape = (1, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.out = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.conv(x) * float("inf"))


def test_non_finite_objective_is_an_error(tmp_path) -> None:
    from circuits.featurevis import FeatureVisCache

    cache = FeatureVisCache(tmp_path)
    with pytest.raises(FloatingPointError, match=r"diverged .* for 2 target\(s\): \['out:0', 'out:1'\]"):
        render(_Exploding(), ["out:0", "out:1"], steps=2, transforms="none", progress=False, cache=cache)
    assert len(cache) == 0


class _ViewHead(nn.Module):
    """A model that flattens a conv output with ``.view`` (which channels-last strides do not allow)."""

    input_shape = (3, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return self.head(h.view(h.shape[0], -1))


def test_channels_last_is_automatic_and_falls_back() -> None:
    torch.manual_seed(0)
    model = _ViewHead().eval()
    with pytest.raises(RuntimeError, match="view"):
        render(model, "head:1", steps=2, progress=False, channels_last=True)
    auto = render(model, "head:1", steps=2, progress=False)  # falls back to NCHW by itself
    plain = render(model, "head:1", steps=2, progress=False, channels_last=False)
    torch.testing.assert_close(auto.images, plain.images)
    fashion = FashionInception().eval()
    a = render(fashion, ["mixed3b:2", "logits:1"], steps=3, progress=False, channels_last=True)
    b = render(fashion, ["mixed3b:2", "logits:1"], steps=3, progress=False, channels_last=False)
    torch.testing.assert_close(a.images, b.images, atol=1e-4, rtol=0)  # a speed setting: same images up to rounding
