"""circuits.models.resolve_model: the one way from what a user names to a model."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import circuits.models as models
from circuits.models import FashionInception, UnknownModelError, WeightsError, resolve_model, save_state_dict
from circuits._io import sha256_file


@pytest.fixture(scope="module")
def fashion_file(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("w") / "fashion.safetensors"
    save_state_dict(FashionInception().state_dict(), path)
    return path


def test_a_module_passes_through_in_eval_mode():
    m = torch.nn.Linear(2, 3).train()
    assert resolve_model(m) is m and not m.training


def test_a_weights_file_alone_is_recognised_and_read_once(fashion_file, monkeypatch):
    calls = {"read": 0, "hash": 0}
    real_read, real_hash = models.load_state_dict_file, models.loading.sha256_file

    def counting_read(*a, **k):
        calls["read"] += 1
        return real_read(*a, **k)

    def counting_hash(*a, **k):
        calls["hash"] += 1
        return real_hash(*a, **k)

    monkeypatch.setattr(models, "load_state_dict_file", counting_read)
    monkeypatch.setattr(models.loading, "sha256_file", counting_hash)
    digest = sha256_file(fashion_file)
    m = resolve_model(str(fashion_file), sha256=digest)
    assert isinstance(m, FashionInception) and not m.training
    assert calls == {"read": 1, "hash": 1}
    from safetensors.torch import load_file

    state = load_file(str(fashion_file))
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())


def test_a_name_with_weights(fashion_file):
    m = resolve_model("fashion-inception", weights=fashion_file)
    assert isinstance(m, FashionInception)
    with pytest.raises(ValueError, match="--weights"):
        resolve_model(str(fashion_file), weights=fashion_file)


def test_bad_names_and_files(tmp_path):
    with pytest.raises(UnknownModelError, match="resnet18"):
        resolve_model("resnet81")
    odd = tmp_path / "odd.pth"
    torch.save({"w": torch.ones(3)}, odd)
    with pytest.raises(WeightsError, match="--model NAME --weights"):
        resolve_model(str(odd))
    with pytest.raises(WeightsError, match="not found"):
        resolve_model(str(tmp_path / "missing.pth"))
    with pytest.raises(TypeError, match="nn.Module"):
        resolve_model(3)  # type: ignore[arg-type]


def test_torchvision_name_and_preprocessing_pickles():
    import pickle

    m = resolve_model("resnet18")
    assert models.input_shape(m) == (3, 224, 224)
    x = torch.rand(1, 3, 4, 4)
    fn = pickle.loads(pickle.dumps(m.preprocess_input))  # travels to Ray workers
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(fn(x), (x - mean) / std)  # per-channel ImageNet mean/std


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is an optional extra")
def test_timm_models_by_name():
    m = resolve_model("timm:resnet18")
    assert type(m).__module__.startswith("timm") and models.input_shape(m) == (3, 224, 224)
    with pytest.raises(UnknownModelError, match="timm:resnet18"):
        resolve_model("timm:resnet81")
