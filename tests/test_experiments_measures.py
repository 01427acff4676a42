"""The measurements behind the figures' claims (experiments/_measures.py): identities and controls."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
import _measures as M  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_dihedral_cosine_finds_rotated_and_reflected_copies():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1, 4, 3, 3, generator=g)
    copies = torch.cat([w, torch.rot90(w, 1, dims=(2, 3)), torch.flip(w, dims=(3,)), torch.randn(1, 4, 3, 3, generator=g)])
    best, which = M.dihedral_cosine(copies)
    assert best[0, 1] == pytest.approx(1.0, abs=1e-9) and best[0, 2] == pytest.approx(1.0, abs=1e-9)
    assert best[0, 3] < 0.99
    assert int(which[0, 0]) == 0  # identity first
    fam = M.best_family(copies, 3, torch.ones(4, dtype=torch.bool))
    assert sorted(fam.neurons) == [0, 1, 2] and fam.score == pytest.approx(1.0, abs=1e-9)


def test_odd_fraction_of_a_dipole_a_blob_and_noise():
    dipole = torch.zeros(1, 2, 3, 3)
    dipole[0, :, 1, 0], dipole[0, :, 1, 2] = 1.0, -1.0  # excite left, inhibit right: odd
    blob = torch.zeros(1, 2, 3, 3)
    blob[0, :, 1, 1] = 1.0
    assert float(M.odd_fraction(dipole)[0]) == pytest.approx(1.0)
    assert float(M.odd_fraction(blob)[0]) == pytest.approx(0.0)
    noise = torch.randn(2000, 1, 3, 3, generator=torch.Generator().manual_seed(1))
    assert float(M.odd_fraction(noise).mean()) == pytest.approx(4 / 9, abs=0.02)  # (kh*kw - 1) / (2*kh*kw)


@given(st.integers(2, 30), st.integers(0, 10_000))
@settings(max_examples=25, deadline=None)
def test_washout_bounds_and_identities(n, seed):
    rng = np.random.default_rng(seed)
    p = rng.normal(size=(n, 3, 3))
    assert 0.0 <= M.washout(p) <= 1.0
    same = np.repeat(p[:1], n, axis=0)
    assert M.washout(same) == pytest.approx(0.0, abs=1e-12)  # identical paths add up
    assert M.washout(np.concatenate([p, -p])) == pytest.approx(1.0)  # each path cancelled by its negative
    draws = M.sign_shuffled_washout(p, 10, seed)
    assert draws.shape == (10,) and ((0 <= draws) & (draws <= 1)).all()


def test_shuffles_keep_what_they_promise():
    w = torch.zeros(3, 4, 5, 5)
    w[:, :, 1:4, 1:4] = torch.randn(3, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    sp = M.shuffle_positions(w, 0)
    assert torch.equal((sp.abs().sum(1) > 0), (w.abs().sum(1) > 0))  # the support stays
    for o in range(3):  # the same position vectors, permuted
        a = sorted(map(tuple, w[o].flatten(1).T.tolist()))
        b = sorted(map(tuple, sp[o].flatten(1).T.tolist()))
        assert a == b
    se = M.shuffle_entries(w, 0)
    for o in range(3):
        assert sorted(w[o].flatten().tolist()) == sorted(se[o].flatten().tolist())
    assert not torch.equal(se, w)


def test_structured_excludes_one_by_one_and_rank_one_neurons():
    w = torch.zeros(3, 4, 3, 3)
    w[0, :, 1, 1] = torch.tensor([1.0, -2, 3, 0.5])  # a 1x1 kernel in a 3x3 window
    w[1] = torch.tensor([1.0, 2, 3, 4])[:, None, None] * torch.ones(3, 3) / 9  # pool branch: one map times one vector
    w[2] = torch.randn(4, 3, 3, generator=torch.Generator().manual_seed(3))
    assert M.structured(w).tolist() == [False, False, True]


def test_claim_verdicts():
    assert M.Claim("x", 0.5, [0.1, 0.2], [0.3]).beats is True
    assert M.Claim("x", 0.25, [0.1, 0.2], [0.3]).beats is False
    assert M.Claim("x", 0.05, [0.1, 0.2], higher=False).beats is True
    c = M.Claim("x", 0.5)
    assert c.beats is None and c.verdict == "no control run"
    assert "does NOT beat" in M.Claim("share", 0.2, [0.3]).caption()


def test_effective_classes_and_random_init_copies():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    acts = torch.tensor([[5.0, 1, 0], [4, 1, 0], [0, 1, 0], [0, 1, 0], [0, 1, 0], [0, 1, 0]])
    eff = M.effective_classes(acts, labels, k=2)
    assert eff[0] == pytest.approx(1.0) and np.isnan(eff[2])  # one class; dead
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU())
    a, b = list(M.random_init_copies(model, 2, seed=5))
    a2 = next(M.random_init_copies(model, 1, seed=5))
    assert torch.equal(a[0].weight, a2[0].weight) and not torch.equal(a[0].weight, b[0].weight)
    assert not torch.equal(a[0].weight, model[0].weight)  # a copy; the model itself is untouched
