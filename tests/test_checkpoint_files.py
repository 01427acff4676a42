"""The one checkpoint reader, through the CLI: bad and odd files as they come in practice.

Every bad file must end with exit code 2 and one specific line on stderr, through both
``circuits inspect FILE`` and ``circuits layers --model FILE``; no pickle payload may run
(each payload would create a marker file); torch's advice to disable its safety must never
reach the user. Odd but valid files (wrapped, nested, sharded, legacy...) must load.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import struct
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from circuits.cli import main
from circuits.models import FashionInception, save_state_dict
from circuits.models.checkpoint import (
    CheckpointFormatError,
    CheckpointReader,
    UnsafeCheckpointError,
    WeightsError,
    flatten_state_dict,
    read_checkpoint,
)

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:Detected pickle protocol")]

MARKER = "PAYLOAD_RAN"


# ----------------------------------------------------------------------------- payloads


class _System:
    def __init__(self, marker: Path):
        self.cmd = f"touch {marker}"

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _Eval:
    def __init__(self, marker: Path):
        self.code = f"open({str(marker)!r}, 'w').close()"

    def __reduce__(self):
        return (eval, (self.code,))


class _Subprocess:
    def __init__(self, marker: Path):
        self.argv = ["touch", str(marker)]

    def __reduce__(self):
        return (subprocess.check_call, (self.argv,))


def _zip_with_data_pkl(src: Path, dst: Path, data: bytes) -> None:
    """Copy a torch.save zip, replacing its data.pkl."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            zout.writestr(item, data if item.filename.endswith("/data.pkl") else zin.read(item.filename))


def _shards(folder: Path, state: dict, kind: str = "safetensors") -> Path:
    """Split ``state`` into two shards with an index, Hugging Face style."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(state)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    suffix = "safetensors" if kind == "safetensors" else "bin"
    prefix = "model" if kind == "safetensors" else "pytorch_model"
    weight_map = {}
    for i, part in enumerate(halves, 1):
        shard = f"{prefix}-0000{i}-of-00002.{suffix}"
        sub = {n: state[n] for n in part}
        if kind == "safetensors":
            save_state_dict(sub, folder / shard)
        else:
            torch.save(sub, folder / shard)
        weight_map.update({n: shard for n in part})
    index = folder / f"{prefix}.{suffix}.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


@pytest.fixture(scope="module")
def state():
    torch.manual_seed(0)
    return FashionInception().state_dict()


# ----------------------------------------------------------------------------- bad files

def _bad_files(d: Path, state: dict) -> dict[str, tuple[Path, str]]:
    """name -> (path, the specific part of the one-line message)."""
    marker = d / MARKER
    rng = np.random.default_rng(0)
    cases: dict[str, tuple[Path, str]] = {}

    def put(name: str, filename: str, data: bytes, message: str) -> Path:
        p = d / filename
        p.write_bytes(data)
        cases[name] = (p, message)
        return p

    put("text named .pth", "notes.pth", b"hello, not a checkpoint\n" * 20, "is a text file (starting 'hello, not a checkpoint')")
    put("zero bytes", "empty.pth", b"", "is an empty file (0 bytes)")
    put("random bytes", "random.bin", b"\x01" + rng.bytes(4095), "is binary data of an unknown format (first bytes 01")
    put("random bytes after a pickle opcode", "noise.pth", b"\x80\x02" + bytes(range(250, 256)) * 100,
        "starts like a pickle but is not a valid one")
    put("a .txt", "readme.txt", b"weights are elsewhere\n", "is a text file (starting 'weights are elsewhere')")
    put("JSON named .pth", "config.pth", b'{"lr": 0.1, "epochs": 3}', "is a JSON file (starting '{\"lr\": 0.1")
    put("JSON that is not an index", "config.json", b'{"lr": 0.1}', "is a JSON file but not a shard index")
    put("gzip", "model.pth.gz", gzip.compress(b"x" * 100), "is gzip-compressed data (decompress it first)")
    buf = io.BytesIO()
    np.save(buf, np.ones((3, 3), np.float32))
    put("numpy .npy", "weights.npy", buf.getvalue(), "is a NumPy .npy array")
    buf = io.BytesIO()
    np.savez(buf, w=np.ones(3))
    put("numpy .npz", "weights.npz", buf.getvalue(), "is a zip archive but not a torch.save checkpoint (a NumPy .npz?)")
    put("HDF5", "model.h5", b"\x89HDF\r\n\x1a\n" + b"\0" * 100, "is an HDF5 file (a Keras .h5 model?)")
    put("PNG named .pth", "image.pth", b"\x89PNG\r\n\x1a\n" + b"\0" * 100, "is a PNG image")

    good = d / "good.pth"
    torch.save(dict(state), good)
    whole = good.read_bytes()
    put("truncated zip", "truncated.pth", whole[: len(whole) // 2], "is a damaged or truncated zip archive")
    bad_pkl = d / "badpkl.pth"
    _zip_with_data_pkl(good, bad_pkl, b"\x80\x02\xff\xfe\xfd")
    cases["zip with a damaged data.pkl"] = (bad_pkl, "whose data.pkl is not a valid pickle")
    legacy = d / "legacy_good.pth"
    torch.save(dict(state), legacy, _use_new_zipfile_serialization=False)
    put("truncated legacy torch file", "legacy_cut.pth", legacy.read_bytes()[:40], "legacy torch.save file whose pickle")

    put("safetensors, header not JSON", "badheader.safetensors", struct.pack("<Q", 10) + b"not json!!" + b"\0" * 8,
        "not a valid safetensors file: unreadable JSON header")
    put("safetensors, header length too big", "huge.safetensors", struct.pack("<Q", 1 << 40) + b"{}",
        "not a valid safetensors file: header length 1099511627776 does not fit a 10-byte file")
    st = d / "st_good.safetensors"
    save_state_dict({"w": torch.randn(100, 100)}, st)
    put("safetensors truncated", "cut.safetensors", st.read_bytes()[:-1000], "not a valid safetensors file (truncated?)")
    header = json.dumps({"w": {"dtype": "C64", "shape": [2], "data_offsets": [0, 16]}}).encode()
    put("safetensors with an unknown dtype", "c64.safetensors", struct.pack("<Q", len(header)) + header + b"\0" * 16,
        "has dtype C64, which this reader does not support")

    put("pickle.dumps with os.system", "system.pth", pickle.dumps(_System(marker), protocol=2),
        "is a pickle that imports posix.system")
    put("pickle.dumps with eval", "eval.pt", pickle.dumps(_Eval(marker), protocol=2), "imports builtins.eval")
    put("pickle.dumps with subprocess (protocol 4, STACK_GLOBAL)", "sub.bin",
        pickle.dumps(_Subprocess(marker), protocol=4), "imports subprocess.check_call")
    cmd = f"touch {marker}".encode()
    hidden = (b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94N0N0h\x00h\x01\x93"  # names via the memo
              + b"\x8c" + bytes([len(cmd)]) + cmd + b"\x85R.")
    put("pickle hiding its import behind the memo", "hidden.pth", hidden, "is a pickle that imports os.system")
    put("pickle importing through the extension registry", "ext.pth", b"\x80\x02\x82\x01)R.",
        "is a pickle that imports <hidden>")
    p = d / "zip_system.pth"
    torch.save({"w": torch.ones(2), "x": _System(marker)}, p)
    cases["torch.save zip with os.system"] = (p, "imports posix.system")
    p = d / "legacy_eval.pth"
    torch.save({"w": torch.ones(2), "x": _Eval(marker)}, p, _use_new_zipfile_serialization=False)
    cases["legacy torch.save with eval"] = (p, "imports builtins.eval")
    p = d / "zip_p4_subprocess.pt"
    torch.save({"w": torch.ones(2), "x": _Subprocess(marker)}, p, pickle_protocol=4)
    cases["torch.save protocol 4 with subprocess"] = (p, "imports subprocess.check_call")
    p = d / "rng.pth"
    torch.save({"w": torch.ones(2), "rng": np.random.default_rng(0)}, p)
    cases["numpy object inside"] = (p, "imports numpy.random._pickle.__generator_ctor")
    p = d / "protocol4.pth"
    torch.save(dict(state), p, pickle_protocol=4)
    cases["torch.save protocol 4 (torch's safe loader cannot read it)"] = (
        p, "written with pickle protocol 4, which torch's weights-only (safe) loader cannot read")
    put("plain pickle of a dict", "plain.pkl.pth", pickle.dumps({"w": [1.0, 2.0]}, protocol=2),
        "is a Python pickle written by pickle.dump, not by torch.save")

    for name, obj, message in [
        ("a single tensor", torch.ones(3, 3), "holds a single tensor of shape (3, 3), not a state dict"),
        ("a list", [1, 2, 3], "holds a list, not a state dict"),
        ("an empty dict", {}, "holds no tensors (empty state dict"),
        ("only metadata", {"epoch": 3, "arch": "resnet"}, "holds no tensors (empty state dict; top-level keys: epoch, arch)"),
        ("optimizer state only", torch.optim.SGD(FashionInception().parameters(), lr=0.1, momentum=0.9).state_dict(),
         "holds optimizer state only"),
    ]:
        p = d / f"{name.replace(' ', '_')}.pth"
        torch.save(obj, p)
        cases[name] = (p, message)

    no_index = d / "shards_no_index"
    no_index.mkdir()
    save_state_dict({"a": torch.ones(2)}, no_index / "model-00001-of-00002.safetensors")
    save_state_dict({"b": torch.ones(2)}, no_index / "model-00002-of-00002.safetensors")
    cases["folder without an index"] = (no_index, "is a folder without a *.index.json (it holds 2 weight file(s)")
    empty_dir = d / "empty_dir"
    empty_dir.mkdir()
    cases["empty folder"] = (empty_dir, "is a folder without a *.index.json (it holds no weight files)")
    missing = d / "shards_missing"
    index = _shards(missing, dict(state))
    (missing / "model-00002-of-00002.safetensors").unlink()
    cases["index naming a missing shard"] = (missing, "names shard model-00002-of-00002.safetensors, which is missing")
    bad_index = d / "bad_index"
    bad_index.mkdir()
    (bad_index / "model.safetensors.index.json").write_text("{not json")
    cases["index that is not JSON"] = (bad_index, "is not a valid shard index: unreadable JSON")
    outside = d / "escape"
    outside.mkdir()
    (outside / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../st_good.safetensors"}}))
    cases["index pointing outside its folder"] = (outside, "names a shard outside its folder")
    lying = d / "lying_index"
    _shards(lying, {"a": torch.ones(2), "b": torch.ones(2)})
    idx = lying / "model.safetensors.index.json"
    idx.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "zz": "model-00001-of-00002.safetensors"}}))
    cases["index listing a tensor its shard lacks"] = (lying, "lists 'zz' in model-00001-of-00002.safetensors, but that shard does not hold it")
    cases["missing file"] = (d / "nowhere" / "model.pth", "not found")
    assert index.exists()
    return cases


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, state):
    d = tmp_path_factory.mktemp("bad")
    return d, _bad_files(d, state)


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_table_has_at_least_25_kinds(bad_files):
    assert len(bad_files[1]) >= 25


@pytest.mark.parametrize("command", ["inspect", "layers"])
def test_every_bad_file_exits_2_with_a_specific_line_and_no_payload_runs(bad_files, command, capsys):
    folder, cases = bad_files
    marker = folder / MARKER
    failures = []
    for name, (path, message) in cases.items():
        argv = ["inspect", str(path), "--no-plots"] if command == "inspect" else ["layers", "--model", str(path)]
        code, _, err = _run(argv, capsys)
        lines = err.strip().splitlines()
        ok = (code == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in err
              and "weights_only" not in err and "Re-running" not in err)
        if not ok:
            failures.append(f"{name}: exit {code}, stderr {err.strip()!r}, expected {message!r}")
    assert not marker.exists(), "a pickle payload ran"
    assert not failures, "\n".join(failures)


def test_library_errors_are_weights_errors_of_two_kinds(bad_files):
    folder, cases = bad_files
    for name, (path, message) in cases.items():
        if name == "missing file":
            continue
        with pytest.raises(WeightsError, match=None) as info:
            with CheckpointReader(path) as reader:
                for _ in reader:  # a lying index is found while reading
                    pass
        assert message in str(info.value), name
        assert isinstance(info.value, (CheckpointFormatError, UnsafeCheckpointError)), name
        assert isinstance(info.value, UnsafeCheckpointError) == ("imports" in message), name
    assert not (folder / MARKER).exists()


def test_unsafe_message_never_suggests_disabling_the_safety(bad_files, capsys):
    folder, cases = bad_files
    path = cases["torch.save zip with os.system"][0]
    code, _, err = _run(["inspect", str(path)], capsys)
    assert code == 2
    assert "weights_only" not in err and "will likely succeed" not in err and "arbitrary code" in err
    assert not (folder / MARKER).exists()


# ----------------------------------------------------------------------------- odd but valid files


def _odd_files(d: Path, state: dict) -> dict[str, tuple[Path, list[str], bool]]:
    """name -> (path, expected notes (substrings), loads into FashionInception by --model)."""
    model = FashionInception()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.zeros(2, 1, 28, 28)).sum().backward()
    opt.step()
    cases: dict[str, tuple[Path, list[str], bool]] = {}

    def save(name: str, obj, notes: list[str], loads: bool = True, **kw) -> None:
        p = d / f"{name}.pth"
        torch.save(obj, p, **kw)
        cases[name] = (p, notes, loads)

    save("net_and_optim", {"net": dict(state), "optim": opt.state_dict()}, ["weights read from 'net'", "skipped optim: optimizer state"])
    save("doubly_wrapped", {"model": {"state_dict": dict(state)}, "epoch": 3},
         ["weights read from 'model.state_dict'", "skipped epoch: not a tensor (int)"])
    save("lightning_like", {"state_dict": dict(state), "epoch": 7, "global_step": 100, "optimizer_states": [opt.state_dict()],
                            "hyper_parameters": {"lr": 0.1}}, ["weights read from 'state_dict'"])
    save("with_metadata", {**dict(state), "step": 10, "config": "x"}, ["skipped 2 entries that are not tensors: step (int), config (str)"])
    save("legacy_format", dict(state), [], _use_new_zipfile_serialization=False)
    half = len(state) // 2
    names = list(state)
    save("encoder_decoder", {"encoder": {n: state[n] for n in names[:half]}, "decoder": {n: state[n] for n in names[half:]}},
         [], loads=False)
    st_named_pth = d / "safetensors_inside.pth"
    save_state_dict(dict(state), d / "tmp.safetensors").rename(st_named_pth)
    cases["safetensors named .pth"] = (st_named_pth, [], True)
    cases["sharded safetensors folder"] = (_shards(d / "hf", dict(state)).parent, ["2 shards listed by model.safetensors.index.json"], True)
    cases["sharded index file itself"] = (d / "hf" / "model.safetensors.index.json", ["2 shards"], True)
    cases["sharded torch .bin folder"] = (_shards(d / "hf_bin", dict(state), "bin").parent, ["pytorch_model.bin.index.json"], True)
    return cases


@pytest.fixture(scope="module")
def odd_files(tmp_path_factory, state):
    d = tmp_path_factory.mktemp("odd")
    return _odd_files(d, state)


def test_odd_files_read_the_same_tensors(odd_files, state):
    for name, (path, notes, loads) in odd_files.items():
        with CheckpointReader(path) as reader:
            got_notes = reader.notes
            tensors = {n: t.clone() for n, t in reader}
        for note in notes:
            assert any(note in g for g in got_notes), (name, got_notes)
        if name == "encoder_decoder":
            half = len(state) // 2
            assert list(tensors) == [f"encoder.{n}" for n in list(state)[:half]] + [f"decoder.{n}" for n in list(state)[half:]]
            continue
        assert sorted(tensors) == sorted(state), name
        assert all(torch.equal(tensors[n], state[n]) for n in state), name


def test_odd_files_through_the_cli(odd_files, capsys):
    for name, (path, notes, loads) in odd_files.items():
        code, out, err = _run(["inspect", str(path), "--no-plots"], capsys)
        assert code == 0, (name, err)
        for note in notes:
            assert f"note: {note}" in out or any(note in line for line in out.splitlines() if line.startswith("note:")), (name, out[-800:])
        if loads:
            code, out, err = _run(["layers", "--model", str(path)], capsys)
            assert code == 0, (name, err)
            assert "mixed4a" in out


def test_flatten_rules():
    t = torch.ones(2)
    flat, notes = flatten_state_dict({"a": {"b": t, "c": [t, t]}, "d": t})
    assert list(flat) == ["a.b", "a.c.0", "a.c.1", "d"]
    flat, notes = flatten_state_dict({"ema": {"w": t}, "model": {"w": t}, "epoch": 1})
    assert list(flat) == ["ema.w", "model.w"] and notes == ["skipped 1 entry that is not a tensor: epoch (int)"]
    with pytest.raises(CheckpointFormatError, match="same name 'a.b'"):
        flatten_state_dict({"a.b": t, "a": {"b": t}})


def test_load_state_dict_file_and_read_checkpoint_agree(odd_files, state):
    from circuits.models import load_state_dict_file

    for name in ("net_and_optim", "sharded safetensors folder", "legacy_format"):
        path = odd_files[name][0]
        a, b = load_state_dict_file(path), read_checkpoint(path)
        assert list(a) == list(b) and all(torch.equal(a[k], state[k]) for k in state)


def test_rows_read_blocks_of_a_tensor(tmp_path):
    w = torch.arange(60, dtype=torch.float32).reshape(10, 6)
    for path in (save_state_dict({"w": w}, tmp_path / "a.safetensors"), save_state_dict({"w": w}, tmp_path / "a.pth")):
        with CheckpointReader(path) as r:
            assert torch.equal(r.rows("w", 3, 7), w[3:7])
            assert r.rows("w", 8, 20).shape == (2, 6)
            assert r.shape("w") == (10, 6) and r.dtype("w") == torch.float32
            with pytest.raises(KeyError, match="did you mean w"):
                r.get("ww")


# ----------------------------------------------------------------------------- device and output


def test_inspect_device_without_gpu_exits_2(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, _, err = _run(["inspect", "fashion-inception", "--device", "cuda", "--no-plots"], capsys)
    assert code == 2 and "device 'cuda' is not available" in err and err.count("\n") == 1


def test_inspect_out_pointing_at_a_file_exits_2(tmp_path, capsys):
    target = tmp_path / "a_file"
    target.write_text("x")
    code, _, err = _run(["inspect", "fashion-inception", "--out", str(target)], capsys)
    assert code == 2 and f"{target} exists and is" in err and "not a folder" in err and err.count("\n") == 1


def test_layers_device_without_gpu_exits_2(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, _, err = _run(["layers", "--device", "cuda"], capsys)
    assert code == 2 and "device 'cuda' is not available" in err and err.count("\n") == 1


def test_two_sets_of_weights_get_a_prefix_hint(tmp_path, state):
    from circuits.models import load_weights

    path = tmp_path / "ema.pth"
    torch.save({"model": dict(state), "ema": dict(state), "epoch": 2}, path)
    with pytest.raises(WeightsError, match=r"holds conv2d0_pre_relu_conv.weight under ema\., model\.: pass the weights under one prefix"):
        load_weights(FashionInception(), path)
