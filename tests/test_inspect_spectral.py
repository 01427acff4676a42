"""Spectral diagnostics: the power-law fit against an independent implementation and against
WeightWatcher, rank identities, planted problems, and the flags on the bundled trained model."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from circuits.inspect import esd, fit_power_law, spectral_stats, tensor_stats, weight_stats
from circuits.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _clauset_reference(evals: np.ndarray, thresh: float = 1e-5) -> tuple[float, float, float, int]:
    """Clauset, Shalizi & Newman (2009), written out plainly: for every candidate xmin, the MLE
    alpha and the KS distance between the empirical and fitted tail CDF; keep the smallest."""
    x = np.sort(evals[evals > thresh]).astype(np.float64)
    best = (math.inf, math.nan, math.nan, 0)
    for i in range(len(x) - 1):
        tail = x[i:]
        n = len(tail)
        alpha = 1 + n / np.sum(np.log(tail / tail[0]))
        if not alpha > 1:
            continue
        cdf_fit = 1 - (tail / tail[0]) ** (1 - alpha)
        cdf_emp = np.arange(n) / n
        ks = np.max(np.abs(cdf_fit - cdf_emp))
        if ks < best[0]:
            best = (ks, alpha, tail[0], n)
    ks, alpha, xmin, n = best
    return alpha, ks, xmin, n


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_equals_an_independent_clauset_loop(seed):
    rng = np.random.default_rng(seed)
    evals = np.concatenate([rng.uniform(0.01, 1.0, 300), (rng.pareto(2.5, 120) + 1.0) * 1.0])
    fit = fit_power_law(evals)
    alpha, ks, xmin, n = _clauset_reference(evals)
    assert fit.alpha == pytest.approx(alpha, rel=1e-10)
    assert fit.ks == pytest.approx(ks, rel=1e-10)
    assert fit.xmin == xmin and fit.n_tail == n
    assert fit.sigma == pytest.approx((alpha - 1) / math.sqrt(n))


def test_fit_recovers_a_known_exponent():
    rng = np.random.default_rng(0)
    true_alpha = 3.0
    x = (1.0 - rng.random(5000)) ** (-1.0 / (true_alpha - 1.0))  # pdf ~ x^-3 above 1
    fit = fit_power_law(x)
    assert abs(fit.alpha - true_alpha) < 4 * fit.sigma and fit.quality == "good"


def test_too_few_eigenvalues_is_said_not_guessed():
    fit = fit_power_law(np.arange(1, 11, dtype=float))
    assert math.isnan(fit.alpha) and fit.quality == "too few eigenvalues" and fit.n_evals == 10
    s = spectral_stats(torch.randn(10, 30))
    assert math.isnan(s.alpha) and s.to_record()["alpha_quality"] == "too few eigenvalues"


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), rows=st.integers(2, 40), cols=st.integers(2, 40), scale=st.floats(1e-2, 1e2))
def test_rank_identities(seed, rows, cols, scale):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    s = spectral_stats(w, randomize=False)
    sv = torch.linalg.svdvals(w).numpy()
    np.testing.assert_allclose(s.singular_values, sv, rtol=1e-6, atol=1e-9 * sv[0])
    assert s.spectral_norm == pytest.approx(sv[0], rel=1e-9)
    assert s.stable_rank == pytest.approx((sv ** 2).sum() / sv[0] ** 2, rel=1e-9)
    p = sv / sv.sum()
    assert s.effective_rank == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-6)
    assert 1 <= s.stable_rank <= s.effective_rank + 1e-9 <= min(rows, cols) + 1e-9
    t = spectral_stats(w * scale, randomize=False)  # ranks and alpha do not depend on the scale
    assert t.stable_rank == pytest.approx(s.stable_rank, rel=1e-9)
    assert t.effective_rank == pytest.approx(s.effective_rank, rel=1e-9)


def test_conv_conventions():
    w = torch.randn(16, 8, 3, 3, dtype=torch.float64)
    flat = esd(w, "flatten")
    np.testing.assert_allclose(np.sort(flat), np.sort(torch.linalg.svdvals(w.reshape(16, -1)).numpy() ** 2), rtol=1e-8)
    slices = esd(w, "slices")
    ref = np.sort(np.concatenate([torch.linalg.svdvals(w[:, :, i, j]).numpy() ** 2 for i in range(3) for j in range(3)]))
    np.testing.assert_allclose(slices, ref, rtol=1e-8)
    assert len(slices) == 9 * 8 and len(flat) == 16


def test_planted_rank_collapse_and_correlation_trap():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(256, 3, generator=g) @ torch.randn(3, 256, generator=g)
    s = spectral_stats(low)
    assert s.rank == 3 and any(f.startswith("rank collapse: rank-deficient, 253 of 256") for f in s.flags)
    trap = torch.randn(256, 256, generator=g) * 0.02
    trap[7, 11] = 5.0  # one huge weight: stands out even after the values are shuffled
    s = spectral_stats(trap)
    assert s.n_traps >= 1 and any(f.startswith("correlation trap") for f in s.flags)
    clean = spectral_stats(torch.randn(256, 256, generator=g) * 0.02)
    assert clean.n_traps == 0 and not any("correlation trap" in f for f in clean.flags)


def test_random_matrix_is_called_untrained_and_permutation_is_seeded():
    w = torch.randn(400, 300, generator=torch.Generator().manual_seed(1))
    a, b = spectral_stats(w, seed=3), spectral_stats(w, seed=3)
    assert a.rand_lambda_max == b.rand_lambda_max and a.n_spikes == 0
    assert spectral_stats(w, seed=4).rand_lambda_max != a.rand_lambda_max
    assert any("no structure beyond random" in f or "under-trained" in f for f in a.flags)
    assert 0.8 < a.soft_rank < 1.2  # a random matrix looks like its own shuffle


def test_nonfinite_weights_have_no_spectrum_visibly():
    w = torch.randn(20, 20)
    w[3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        spectral_stats(w)
    r = tensor_stats("w", w)
    assert r.spectrum is None and math.isnan(r.spectral_norm) and any("NaN" in f for f in r.flags)


def test_stats_reuse_the_one_spectrum_for_the_norm():
    w = torch.randn(64, 32, 3, 3)
    r = tensor_stats("conv", w)
    assert r.spectrum is not None and r.spectral_method == "exact"
    assert r.spectral_norm == r.spectrum.spectral_norm
    assert r.spectral_norm == pytest.approx(torch.linalg.matrix_norm(w.reshape(64, -1), ord=2).item(), rel=1e-5)
    big = tensor_stats("big", torch.randn(40, 50), spectral_exact_max=30)  # above the exact limit: norm only
    assert big.spectrum is None and big.spectral_method == "power"
    rec = r.to_record(singular_values=True)
    assert rec["stable_rank"] == pytest.approx(r.spectrum.stable_rank) and len(rec["singular_values"]) == 64


def test_bundled_model_flags_and_text():
    table = weight_stats(load_model())
    w = table["mixed4a_3x3_pre_relu_conv.weight"]
    assert w.spectrum.fit.quality == "good" and w.spectrum.alpha < 2  # a heavy tail: over-trained by WW's reading
    assert any(f.startswith(f"alpha {w.spectrum.alpha:.2f} < 2") for f in w.flags)
    assert table["logits.weight"].spectrum.fit.quality == "too few eigenvalues"
    text = table.to_text()
    assert "alpha" in text.splitlines()[0] and "eff.rank" in text.splitlines()[0]


def _weightwatcher():
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            logging.getLogger("weightwatcher").setLevel(logging.ERROR)
            import weightwatcher
    except Exception:  # noqa: BLE001 - not installed, or fails to import: the test says so
        return None
    return weightwatcher


@pytest.mark.slow
def test_agrees_with_weightwatcher_on_the_bundled_model():
    ww = _weightwatcher()
    if ww is None:
        pytest.skip("weightwatcher is not installed (pip install circuits[bench]); the Clauset loop test covers the fit")
    model = load_model()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        details = ww.WeightWatcher(model=model).analyze(plot=False, randomize=False)
    modules = dict(model.named_modules())
    compared = 0
    for _, row in details.iterrows():
        w = modules[row["longname"]].weight
        ours = spectral_stats(w, conv="slices", randomize=False)
        # WeightWatcher scales conv slices by 1/sqrt(2) (its conv2d_norm): eigenvalues halve
        scale = 0.5 if w.dim() == 4 else 1.0
        assert ours.lambda_max * scale == pytest.approx(row["lambda_max"], rel=1e-5)
        assert ours.stable_rank == pytest.approx(row["stable_rank"], rel=1e-5)
        if ours.fit.quality == "too few eigenvalues":  # WeightWatcher fits these too; we do not
            continue
        assert abs(ours.alpha - row["alpha"]) <= row["sigma"]  # within its own reported precision
        assert ours.alpha == pytest.approx(row["alpha"], rel=1e-6) and ours.fit.ks == pytest.approx(row["D"], rel=1e-6)
        compared += 1
    assert compared >= 15
