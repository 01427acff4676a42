import json
import warnings

import pytest
import torch

from circuits._io import sha256_file
from circuits.layers import capture
from circuits.models import (
    FASHION_WEIGHTS,
    FashionInception,
    InceptionV1,
    WeightsError,
    fetch_url,
    load_model,
    load_state_dict_file,
    load_weights,
    preprocess_input,
    save_state_dict,
)

MIXED = ["mixed3a", "mixed3b", "mixed4a", "mixed4b", "mixed4c", "mixed4d", "mixed4e", "mixed5a", "mixed5b"]


@pytest.fixture(scope="module")
def lucent_model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from lucent.modelzoo.inceptionv1.InceptionV1 import InceptionV1 as LucentInceptionV1
    torch.manual_seed(1)
    return LucentInceptionV1(redirected_ReLU=False).eval()


def test_state_dict_layout_matches_lucent(lucent_model):
    ours = InceptionV1().state_dict()
    theirs = lucent_model.state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    assert theirs["softmax2_pre_activation_matmul.weight"].shape == (1008, 1024)


def test_lucent_parity_and_correct_lrn(lucent_model):
    state = lucent_model.state_dict()
    as_lucent = InceptionV1(lrn="lucent").eval()
    as_lucent.load_state_dict(state, strict=True)
    correct = InceptionV1(lrn="tf").eval()
    correct.load_state_dict(state, strict=True)
    torch.manual_seed(0)
    x = InceptionV1.preprocess_input(torch.rand(1, 3, 224, 224))
    with torch.no_grad(), capture(lucent_model, MIXED) as ref, capture(as_lucent, MIXED) as a, capture(correct, MIXED) as c:
        lucent_model(x)
        as_lucent(x)
        correct(x)
    for name in MIXED:
        scale = ref[name].abs().max()
        assert (a[name] - ref[name]).abs().max() <= 1e-4 * scale, name
        assert (c[name] - ref[name]).abs().max() > 1e-3 * scale, f"{name}: correct LRN constants should change activations"


def test_lrn_constants():
    m = InceptionV1()
    lrn = m.localresponsenorm0
    assert (lrn.size, lrn.alpha, lrn.beta, lrn.k) == (11, 11e-4, 0.5, 2.0)
    with pytest.raises(ValueError, match="lrn"):
        InceptionV1(lrn="caffe")


def test_inceptionv1_other_input_sizes():
    m = InceptionV1().eval()
    with torch.no_grad(), capture(m, ["maxpool0", "mixed3b", "mixed5b"]) as acts:
        out = m(torch.zeros(1, 3, 128, 128))
    assert out.shape == (1, 1008)
    assert acts["maxpool0"].shape[-1] == 32 and acts["mixed3b"].shape[-1] == 16 and acts["mixed5b"].shape[-1] == 4


def test_preprocess_convention():
    m = InceptionV1()
    x = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2).expand(1, 3, 1, 2)
    assert preprocess_input(m, x).flatten().tolist() == [-117.0, 138.0] * 3


# ---- weight loading -------------------------------------------------------------------


@pytest.fixture()
def small_state():
    torch.manual_seed(0)
    return FashionInception().state_dict()


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".safetensors"])
def test_roundtrip(tmp_path, small_state, suffix):
    path = save_state_dict(small_state, tmp_path / f"w{suffix}")
    model = load_weights(FashionInception(), path)
    assert all(torch.equal(model.state_dict()[k], small_state[k]) for k in small_state)
    assert not list(tmp_path.glob(".*.tmp")), "atomic write left a temporary file behind"


def test_wrapped_checkpoint(tmp_path, small_state):
    torch.save({"state_dict": small_state, "epoch": 3}, tmp_path / "ckpt.pth")
    load_weights(FashionInception(), tmp_path / "ckpt.pth")


def test_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_state_dict_file(tmp_path / "nope.pth")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_corrupted_file(tmp_path, small_state, suffix):
    path = save_state_dict(small_state, tmp_path / f"w{suffix}")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(WeightsError, match="corrupted|not a valid|not a readable"):
        load_state_dict_file(path)


def test_wrong_keys_are_listed(tmp_path, small_state):
    state = dict(small_state)
    state["extra.weight"] = torch.zeros(1)
    del state["logits.bias"]
    path = save_state_dict(state, tmp_path / "w.pth")
    with pytest.raises(WeightsError) as info:
        load_weights(FashionInception(), path)
    assert "missing keys (1): logits.bias" in str(info.value)
    assert "unexpected keys (1): extra.weight" in str(info.value)


def test_shape_mismatch_named(tmp_path, small_state):
    state = dict(small_state)
    state["logits.weight"] = torch.zeros(5, 224)
    path = save_state_dict(state, tmp_path / "w.safetensors")
    with pytest.raises(WeightsError, match=r"logits.weight: checkpoint \(5, 224\) vs model \(10, 224\)"):
        load_weights(FashionInception(), path)


class _Evil:
    def __reduce__(self):
        return (print, ("this ran arbitrary code",))


def test_unsafe_pickle_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(1), "obj": _Evil()}, path)
    with pytest.raises(WeightsError, match="arbitrary code"):
        load_state_dict_file(path)


def test_local_checksum(tmp_path, small_state):
    path = save_state_dict(small_state, tmp_path / "w.pth")
    load_state_dict_file(path, sha256=sha256_file(path))
    with pytest.raises(WeightsError, match="checksum mismatch"):
        load_state_dict_file(path, sha256="0" * 64)


def test_url_download_cached_and_verified(tmp_path, small_state, monkeypatch):
    monkeypatch.setenv("CIRCUITS_CACHE", str(tmp_path / "cache"))
    src = save_state_dict(small_state, tmp_path / "w.pth")
    url = src.as_uri()
    digest = sha256_file(src)
    with pytest.raises(WeightsError, match="sha256 is required"):
        load_state_dict_file(url)
    with pytest.raises(WeightsError, match="checksum mismatch"):
        load_state_dict_file(url, sha256="f" * 64)
    assert not list((tmp_path / "cache").rglob("*.pth")), "a download with a bad checksum must not stay in the cache"
    state = load_state_dict_file(url, sha256=digest)
    assert torch.equal(state["logits.weight"], small_state["logits.weight"])
    cached = fetch_url(url, digest)
    assert cached.parent == tmp_path / "cache" / "weights"
    src.unlink()  # a second load is served from the cache
    assert fetch_url(url, digest) == cached


def test_no_network_message(tmp_path):
    with pytest.raises(WeightsError, match="could not download"):
        fetch_url("http://127.0.0.1:9/inception5h.pth", "a" * 64, cache=tmp_path)


def test_inception5h_loads_from_local_path(tmp_path, lucent_model):
    """What a user with the real checkpoint does: a lucent-layout state dict on disk, strict load."""
    path = tmp_path / "inception5h.pth"
    torch.save(lucent_model.state_dict(), path)
    model = load_model("inceptionv1", weights=path)
    assert torch.equal(model.mixed4a_3x3_pre_relu_conv.weight, lucent_model.mixed4a_3x3_pre_relu_conv.weight)


def test_torchvision_by_name(tmp_path):
    model = load_model("resnet18")
    assert model.fc.out_features == 1000 and not model.training
    path = save_state_dict(model.state_dict(), tmp_path / "r18.safetensors")
    again = load_model("resnet18", weights=path)
    assert torch.equal(again.conv1.weight, model.conv1.weight)
    with pytest.raises(ValueError, match="resnet18"):
        load_model("resnet19")


# ---- the trained model ----------------------------------------------------------------


def test_model_card_accuracy_recomputed(fashion_model):
    from circuits.datasets import DatasetNotFoundError, load_fashion_mnist

    try:
        images, labels = load_fashion_mnist("test")
    except DatasetNotFoundError as exc:
        pytest.skip(f"Fashion-MNIST is not installed here ({exc}); .ci/run installs it")
    meta = json.loads(FASHION_WEIGHTS.with_suffix(".json").read_text())
    card = (FASHION_WEIGHTS.parent / "MODEL_CARD.md").read_text()
    assert len(images) == 10_000
    with torch.no_grad():
        preds = torch.cat([fashion_model(preprocess_input(fashion_model, images[i: i + 2000])).argmax(1) for i in range(0, 10_000, 2000)])
    accuracy = (preds == labels).float().mean().item()
    assert accuracy >= 0.90
    assert abs(accuracy - meta["test_accuracy"]) < 1e-3
    assert f"{100 * meta['test_accuracy']:.2f}%" in card
    assert FASHION_WEIGHTS.stat().st_size <= 5 * 1024 * 1024
