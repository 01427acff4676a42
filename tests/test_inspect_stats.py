"""Per-layer weight statistics against numpy/scipy, planted problems, table exports."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from circuits.inspect import StatsTable, default_init_std, spectral_norm, tensor_stats, weight_stats
from circuits.models import FashionInception


pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(x: np.ndarray) -> dict:
    x = x[np.isfinite(x)].astype(np.float64)
    return {
        "mean": x.mean(), "std": x.std(), "min": x.min(), "max": x.max(),
        "skew": scipy.stats.skew(x, bias=True), "kurtosis": scipy.stats.kurtosis(x, fisher=True, bias=True),
        "fro_norm": np.linalg.norm(x),
    }


@pytest.mark.parametrize("chunk", [1 << 22, 97])
@pytest.mark.parametrize("dist", ["normal", "cubed", "exp_shifted", "uniform64"])
def test_moments_match_numpy_scipy(dist, chunk):
    g = torch.Generator().manual_seed(1)
    if dist == "normal":
        t = torch.randn(64, 32, 3, 3, generator=g) * 0.05
    elif dist == "cubed":
        t = torch.randn(48, 200, generator=g) ** 3
    elif dist == "exp_shifted":  # skewed, far from zero mean: exercises the shifted moments
        t = torch.empty(3000).exponential_(generator=g) + 7.0
    else:
        t = torch.rand(40, 17, dtype=torch.float64, generator=g)
    r = tensor_stats("w", t, chunk_elems=chunk)
    ref = _reference(t.numpy())
    tol = 1e-9 if t.dtype == torch.float64 else 2e-5
    for k, v in ref.items():
        assert getattr(r, k) == pytest.approx(v, rel=tol, abs=1e-12 if t.dtype == torch.float64 else 2e-5), k
    assert r.numel == t.numel() and r.shape == tuple(t.shape)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(1e-3, 1e3), shift=st.floats(-10, 10))
def test_affine_identities(seed, scale, shift):
    """std scales with |a|, skew flips sign with a < 0, kurtosis is invariant."""
    x = torch.randn(37, 29, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) ** 3
    a = tensor_stats("x", x)
    b = tensor_stats("y", -scale * x + shift)
    assert b.std == pytest.approx(scale * a.std, rel=1e-9)
    assert b.skew == pytest.approx(-a.skew, rel=1e-7, abs=1e-9)
    assert b.kurtosis == pytest.approx(a.kurtosis, rel=1e-7, abs=1e-9)
    assert b.mean == pytest.approx(-scale * a.mean + shift, rel=1e-9, abs=1e-9 * scale)


def test_spectral_norm_exact_and_power():
    g = torch.Generator().manual_seed(0)
    for shape in [(10, 7), (300, 40), (16, 8, 3, 3)]:
        w = torch.randn(*shape, generator=g)
        value, how = spectral_norm(w)
        assert how == "exact"
        ref = torch.linalg.matrix_norm(w.reshape(shape[0], -1).double(), ord=2).item()
        assert value == pytest.approx(ref, rel=1e-5)
        assert tensor_stats("w", w).spectral_norm == pytest.approx(ref, rel=1e-5)
    # a big matrix with a clear top singular value: power iteration converges
    u, v = torch.randn(600, 1, generator=g), torch.randn(1, 700, generator=g)
    w = 3 * u @ v / (u.norm() * v.norm()) + 0.01 * torch.randn(600, 700, generator=g)
    value, how = spectral_norm(w, exact_max=256)
    assert how == "power"
    ref = torch.linalg.matrix_norm(w, ord=2).item()
    assert value == pytest.approx(ref, rel=1e-3)
    # without a gap (random matrix) the estimate is a lower bound within a few percent
    w = torch.randn(500, 900, generator=g)
    value, _ = spectral_norm(w, method="power", iters=30)
    ref = torch.linalg.matrix_norm(w, ord=2).item()
    assert 0.99 * ref <= value <= ref * (1 + 1e-5)


def test_planted_dead_filter_and_nan_are_found_by_index():
    torch.manual_seed(0)
    w = torch.randn(32, 8, 3, 3) * 0.1
    w[5] = 0.0
    w[17] = 1e-9
    w[9, 2, 1, 1] = float("nan")
    w[20, 0, 0, 0] = float("inf")
    for chunk in (1 << 22, 50):
        r = tensor_stats("conv.weight", w, chunk_elems=chunk)
        assert r.dead_units == [5, 17]
        assert (r.n_nan, r.n_inf) == (1, 1)
        assert (r.nan_units, r.inf_units) == ([9], [20])  # located by unit, like dead units
        assert "contains 1 NaN (in 1 of 32 filters: 9)" in r.flags
        assert "contains 1 Inf (in 1 of 32 filters: 20)" in r.flags
        assert any(f.startswith("6% of filters dead (2/32: 5, 17)") for f in r.flags), r.flags
        ref = _reference(w.numpy())
        assert r.mean == pytest.approx(ref["mean"], rel=1e-5)
        assert r.std == pytest.approx(ref["std"], rel=1e-5)
        assert r.max == pytest.approx(ref["max"])
        assert math.isnan(r.spectral_norm)  # undefined with non-finite entries


def test_row_dead_units_in_linear_and_near_zero_fraction():
    w = torch.ones(10, 20)
    w[[2, 7]] = 0.0
    w[0, :5] = 0.0
    r = tensor_stats("fc.weight", w, zero_threshold=1e-3)
    assert r.dead_units == [2, 7]
    assert r.near_zero == pytest.approx((40 + 5) / 200)
    assert any("20% of rows dead" in f for f in r.flags)


def test_init_scale_flag():
    torch.manual_seed(0)
    lin = torch.nn.Linear(300, 50)
    init = default_init_std(lin.weight.shape)
    assert init == pytest.approx(1 / math.sqrt(900))
    assert lin.weight.std().item() == pytest.approx(init, rel=0.05)  # PyTorch's default init
    assert tensor_stats("w", lin.weight, spectrum=False).flags == []
    r = tensor_stats("w", lin.weight * 40)
    assert any(f.startswith("std 40x the layer's init scale") for f in r.flags), r.flags
    r = tensor_stats("w", lin.weight * 0.01)
    assert any("0.01x the layer's init scale" in f for f in r.flags)


def test_module_and_state_dict_sources():
    torch.manual_seed(0)
    model = FashionInception()
    table = weight_stats(model)
    assert table.names() == [n for n, _ in model.named_parameters()]
    # a freshly initialised model has nothing to flag but its untrained spectra
    untrained = ("no structure beyond random", "nearly random spectrum, under-trained")
    assert all(any(u in f for u in untrained) for r in table for f in r.flags), [r.flags for r in table.flagged()]
    assert table.flagged() and weight_stats(model, spectrum=False).flagged() == []
    w = model.logits.weight.detach()
    assert table["logits.weight"].fro_norm == pytest.approx(w.norm().item(), rel=1e-5)
    bn = torch.nn.BatchNorm2d(4)
    st = weight_stats(bn.state_dict())
    assert "num_batches_tracked" in [n for n, _ in st.skipped]
    assert "running_var" in st.names()
    with pytest.raises(KeyError, match="did you mean"):
        table["logits.weigth"]


def test_bad_sources():
    with pytest.raises(ValueError, match="empty"):
        weight_stats({})
    table = weight_stats({"w": torch.ones(2, 2), "epoch": 3})  # skipped with a note, like a file
    assert table.names() == ["w"] and table.notes == ["skipped 1 entry that is not a tensor: epoch (int)"]
    with pytest.raises(ValueError, match="holds no tensors"):
        weight_stats({"epoch": 3})
    with pytest.raises(TypeError, match="nn.Module or a state dict"):
        weight_stats([1, 2, 3])
    with pytest.raises(ValueError, match="spectral"):
        weight_stats({"w": torch.ones(2, 2)}, spectral="svd")
    with pytest.raises(TypeError, match="unknown statistics option"):
        weight_stats({"w": torch.ones(2, 2)}, zero_treshold=1)
    r = tensor_stats("empty", torch.zeros(0, 3))
    assert r.flags == ["empty tensor"] and math.isnan(r.mean)


def test_exports_csv_json_dataframe_text(tmp_path):
    w = torch.randn(6, 4)
    w[1] = 0
    table = weight_stats({"a.weight": w, "a.bias": torch.randn(6)})
    rows = list(csv.DictReader(io.StringIO(table.to_csv(tmp_path / "s.csv"))))
    assert [r["name"] for r in rows] == ["a.weight", "a.bias"]
    assert rows[0]["shape"] == "6x4" and rows[0]["dead_units"] == "1"
    assert float(rows[0]["std"]) == pytest.approx(table[0].std, rel=1e-9)
    assert (tmp_path / "s.csv").read_text() == table.to_csv()
    recs = json.loads(table.to_json(tmp_path / "s.json"))
    assert recs[0]["shape"] == [6, 4] and recs[0]["dead_units"] == [1]
    assert recs[1]["spectral_norm"] is None  # NaN becomes null
    text = table.to_text()
    lines = text.splitlines()
    assert lines[0].startswith("name") and "a.weight" in lines[2]
    assert lines[2].index("6x4") == lines[0].index("shape")  # aligned columns
    pd = pytest.importorskip("pandas")
    df = table.to_dataframe()
    assert isinstance(df, pd.DataFrame) and list(df["name"]) == ["a.weight", "a.bias"]
    assert df.loc[0, "numel"] == 24
