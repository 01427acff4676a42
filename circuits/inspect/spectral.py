"""Spectral diagnostics of a weight matrix: what its singular values say about training.

One spectrum per layer, computed once (``eigvalsh`` of the smaller Gram matrix, in float64)
and reused for every figure below, the spectral norm included:

- ``singular_values`` (descending) and the eigenvalues ``lambda = sigma^2`` of ``W^T W``
  (the *empirical spectral density*, ESD);
- ``stable_rank = sum(sigma^2) / sigma_max^2 = ||W||_F^2 / ||W||_2^2``;
- ``effective_rank = exp(H(p))`` with ``p_i = sigma_i / sum(sigma)`` (Roy & Vetterli, 2007);
- ``rank``: singular values above ``sigma_max * max(N, M) * eps(float32)`` (NumPy's
  ``matrix_rank`` tolerance for float32 data);
- a power-law fit ``p(lambda) ~ lambda^-alpha`` of the ESD tail, as WeightWatcher
  (Martin & Mahoney) does it: eigenvalues ``<= 1e-5`` dropped, every eigenvalue but the largest
  tried as ``xmin``, for each the maximum-likelihood ``alpha = 1 + n / sum(log(lambda_i / xmin))``
  over the ``n`` eigenvalues ``>= xmin`` (Clauset, Shalizi & Newman, 2009), and the ``xmin`` whose
  Kolmogorov-Smirnov distance ``D`` between the fitted and the empirical tail CDF is smallest
  is kept. Quality: ``alpha_ks`` (that ``D``), ``alpha_sigma = (alpha - 1) / sqrt(n)``
  (its standard error), ``alpha_n_tail``; ``alpha_quality`` is ``"good"`` when ``n >= 10`` and
  ``D <= 1.36 / sqrt(n)`` (the KS test at 5% does not reject), ``"poor"`` otherwise, and the fit
  is not tried below 20 eigenvalues (``"too few eigenvalues"``; ``alpha`` is NaN);
- the same layer with its weights randomly permuted (a seeded permutation of all its
  values: same value distribution, no learned structure): ``rand_lambda_max``, ``n_spikes``
  (eigenvalues above both the permuted matrix's largest and the Marchenko-Pastur edge below:
  structure learned beyond chance),
  ``soft_rank = rand_lambda_max / lambda_max`` (WeightWatcher's ``ww_softrank``) and
  ``n_traps``: permuted eigenvalues above the Marchenko-Pastur edge
  ``s^2 (sqrt(N) + sqrt(M))^2`` plus four Tracy-Widom scales
  ``s^2 (sqrt(N) + sqrt(M)) (1/sqrt(N) + 1/sqrt(M))^(1/3)`` (``s^2`` the weights' variance):
  a *correlation trap*, large individual weights that stand out even without structure (the
  one outlier a non-zero mean of the weights produces is not counted).

Flags a trainer can act on (:class:`SpectralConfig` holds the thresholds):

- ``alpha < 2`` (good fit): the tail is heavier than in well-trained layers: over-trained or
  over-fitted (WeightWatcher's reading); lower the learning rate, regularise, stop earlier;
- ``alpha > 6`` (good fit): the spectrum is nearly random: under-trained; train longer or
  raise the learning rate for this layer;
- ``rank collapse``: effective rank below 10% of ``min(N, M)``, or numerically rank-deficient;
  dead or duplicated units, too much weight decay, a collapsed representation;
- ``correlation trap``: ``n_traps > 0``; look for a few very large weights (clip, lower LR);
- ``no structure beyond random``: no eigenvalue above the permuted matrix's largest (with at
  least 20 eigenvalues): the layer has learned little (random init looks like this).

Matrices: ``[out, in]`` as given; conv ``[out, in, kh, kw]`` either as one ``[out, in*kh*kw]``
matrix (``conv="flatten"``, the default, the matrix whose norm :func:`spectral_norm` gives) or
WeightWatcher's way (``conv="slices"``): the ``kh*kw`` matrices ``W[:, :, i, j]``, their ESDs
pooled. Linear layers and 1x1 convolutions are the same either way.

Example:
    >>> s = spectral_stats(torch.randn(300, 200))          # doctest: +SKIP
    >>> s.alpha, s.stable_rank, s.flags                    # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

__all__ = ["SpectralConfig", "SpectralStats", "PowerLawFit", "esd", "fit_power_law", "spectral_stats"]


@dataclass
class SpectralConfig:
    """Settings of :func:`spectral_stats` (thresholds documented in the module docstring)."""

    conv: str = "flatten"
    randomize: bool = True
    seed: int = 0
    evals_thresh: float = 1e-5
    min_fit_evals: int = 20
    alpha_low: float = 2.0
    alpha_high: float = 6.0
    collapse_fraction: float = 0.1
    tw_margin: float = 4.0

    def __post_init__(self) -> None:
        if self.conv not in ("flatten", "slices"):
            raise ValueError(f"conv must be 'flatten' or 'slices'; got {self.conv!r}")


@dataclass
class PowerLawFit:
    """A power-law fit of an ESD tail (see the module docstring)."""

    alpha: float = math.nan
    xmin: float = math.nan
    ks: float = math.nan
    sigma: float = math.nan
    n_tail: int = 0
    n_evals: int = 0
    quality: str = "not fitted"


@dataclass
class SpectralStats:
    """Spectral diagnostics of one weight tensor (see the module docstring)."""

    shape: tuple[int, ...]
    conv: str
    singular_values: np.ndarray = field(repr=False)
    lambda_max: float = math.nan
    spectral_norm: float = math.nan
    stable_rank: float = math.nan
    effective_rank: float = math.nan
    rank: int = 0
    max_rank: int = 0
    fit: PowerLawFit = field(default_factory=PowerLawFit)
    rand_lambda_max: float = math.nan
    n_spikes: int = -1
    soft_rank: float = math.nan
    n_traps: int = -1
    mp_edge: float = math.nan
    flags: list[str] = field(default_factory=list)

    @property
    def alpha(self) -> float:
        return self.fit.alpha

    def to_record(self) -> dict[str, Any]:
        """The scalar figures (no arrays), with the ``alpha_*`` fit fields flattened."""
        return {"esd_conv": self.conv, "lambda_max": self.lambda_max, "stable_rank": self.stable_rank,
                "effective_rank": self.effective_rank, "rank": self.rank, "max_rank": self.max_rank,
                "alpha": self.fit.alpha, "alpha_xmin": self.fit.xmin, "alpha_ks": self.fit.ks,
                "alpha_sigma": self.fit.sigma, "alpha_n_tail": self.fit.n_tail, "alpha_quality": self.fit.quality,
                "n_evals": self.fit.n_evals, "rand_lambda_max": self.rand_lambda_max, "n_spikes": self.n_spikes,
                "soft_rank": self.soft_rank, "n_traps": self.n_traps, "mp_edge": self.mp_edge}


def _matrices(weight: torch.Tensor, conv: str) -> torch.Tensor:
    """``[batch, rows, cols]`` float64 matrices whose pooled ESD is the layer's."""
    w = weight.detach().to(torch.float64)
    if w.dim() == 4 and conv == "slices":
        return w.permute(2, 3, 0, 1).reshape(-1, w.shape[0], w.shape[1])
    return w.reshape(1, w.shape[0], -1)


def _gram_eigenvalues(mats: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of ``W^T W`` (the smaller Gram matrix) of each matrix: ``[batch, min(rows, cols)]``."""
    rows, cols = mats.shape[-2:]
    gram = mats @ mats.transpose(-1, -2) if rows <= cols else mats.transpose(-1, -2) @ mats
    return torch.linalg.eigvalsh(gram).clamp_min(0.0)


def esd(weight: torch.Tensor, conv: str = "flatten") -> np.ndarray:
    """Eigenvalues of ``W^T W`` (ascending, float64), pooled over slices for ``conv="slices"``.

    ``weight``: ``[out, in]`` or ``[out, in, kh, kw]`` (any tensor with >= 2 dimensions is
    viewed as ``[out, -1]`` unless ``conv="slices"`` and it is 4-D).
    """
    if weight.dim() < 2:
        raise ValueError(f"a spectrum needs a tensor with >= 2 dimensions; got shape {tuple(weight.shape)}")
    with torch.no_grad():
        return np.sort(_gram_eigenvalues(_matrices(weight, conv)).reshape(-1).cpu().numpy())


def fit_power_law(evals: np.ndarray, thresh: float = 1e-5, min_evals: int = 20) -> PowerLawFit:
    """Fit ``p(x) ~ x^-alpha`` to the tail of ``evals`` (KS-minimising ``xmin``, MLE ``alpha``).

    Eigenvalues ``<= thresh`` are dropped first; below ``min_evals`` remaining eigenvalues no
    fit is made (``quality="too few eigenvalues"``).
    """
    x = np.sort(np.asarray(evals, dtype=np.float64))
    x = x[np.isfinite(x) & (x > thresh)]
    n_all = x.size
    out = PowerLawFit(n_evals=n_all)
    if n_all < max(min_evals, 3):
        out.quality = "too few eigenvalues"
        return out
    logx = np.log(x)
    # suffix sums: S[i] = sum_{j >= i} log x_j
    suffix = np.cumsum(logx[::-1])[::-1]
    n_tail = n_all - np.arange(n_all - 1)  # candidate xmin = x[i], i < N - 1
    denom = suffix[:-1] - n_tail * logx[:-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        alphas = 1.0 + n_tail / denom
    ks = np.ones(n_all - 1)
    chunk = max(1, 4_000_000 // n_all)
    j = np.arange(n_all)
    for a in range(0, n_all - 1, chunk):
        idx = np.arange(a, min(a + chunk, n_all - 1))
        al = alphas[idx]
        valid = np.isfinite(al) & (al > 1.0)
        if not valid.any():
            continue
        # theoretical tail CDF 1 - (x_j / x_i)^(1 - alpha) at x_j, j >= i; empirical (j - i) / n
        ratio = logx[None, :] - logx[idx, None]
        with np.errstate(over="ignore", invalid="ignore"):
            theo = 1.0 - np.exp((1.0 - al[:, None]) * ratio)
        emp = (j[None, :] - idx[:, None]) / n_tail[idx, None]
        dist = np.where(j[None, :] >= idx[:, None], np.abs(theo - emp), 0.0)
        ks[idx] = np.where(valid, np.nanmax(dist, axis=1), 1.0)
    best = int(np.argmin(ks))
    out.alpha, out.xmin, out.ks = float(alphas[best]), float(x[best]), float(ks[best])
    out.n_tail = int(n_tail[best])
    out.sigma = (out.alpha - 1.0) / math.sqrt(out.n_tail)
    if not (math.isfinite(out.alpha) and out.alpha > 1.0):
        out.alpha, out.quality = math.nan, "failed"
    else:
        out.quality = "good" if out.n_tail >= 10 and out.ks <= 1.36 / math.sqrt(out.n_tail) else "poor"
    return out


def _permuted(weight: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    flat = weight.detach().reshape(-1)
    return flat[torch.randperm(flat.numel(), generator=gen).to(flat.device)].reshape(weight.shape)


def _mp_edge(weight: torch.Tensor, rows: int, cols: int, tw_margin: float) -> tuple[float, bool]:
    """``(edge, mean_outlier)``: the largest eigenvalue an iid ``rows x cols`` matrix with the
    weights' variance should reach (Marchenko-Pastur edge + ``tw_margin`` Tracy-Widom scales),
    and whether the weights' mean alone puts one eigenvalue beyond it (a rank-one ``mean * 1 1^T``
    part above the BBP threshold ``s (rows * cols)^(1/4)``)."""
    w = weight.detach().to(torch.float64)
    var = float(w.var(unbiased=False))
    mean = abs(float(w.mean()))
    a, b = math.sqrt(max(rows, cols)), math.sqrt(min(rows, cols))
    edge = var * ((a + b) ** 2 + tw_margin * (a + b) * (1.0 / a + 1.0 / b) ** (1.0 / 3.0))
    return edge, mean * math.sqrt(rows * cols) > math.sqrt(var) * (rows * cols) ** 0.25


def spectral_stats(weight: torch.Tensor, config: Optional[SpectralConfig] = None, **kwargs: Any) -> SpectralStats:
    """Spectrum, ranks, power-law fit, randomised comparison and flags of one weight tensor.

    ``weight``: ``[out, in]`` or ``[out, in, kh, kw]``, all finite (a tensor with NaN/Inf has no
    spectrum: raises ``ValueError``). Keyword arguments override :class:`SpectralConfig` fields.
    """
    cfg = config or SpectralConfig()
    if kwargs:
        cfg = SpectralConfig(**{**cfg.__dict__, **kwargs})
    if weight.dim() < 2:
        raise ValueError(f"a spectrum needs a tensor with >= 2 dimensions; got shape {tuple(weight.shape)}")
    if weight.numel() == 0:
        raise ValueError(f"a spectrum needs a non-empty tensor; got shape {tuple(weight.shape)}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("the weight has NaN or Inf values: it has no spectrum")
    with torch.no_grad():
        mats = _matrices(weight, cfg.conv)
        lam = _gram_eigenvalues(mats)  # [batch, k] ascending
        evals = np.sort(lam.reshape(-1).cpu().numpy())
        sv = np.sqrt(evals)[::-1].copy()
        rows, cols = mats.shape[-2:]
        s = SpectralStats(shape=tuple(int(d) for d in weight.shape), conv=cfg.conv, singular_values=sv)
        s.max_rank = int(min(rows, cols)) * mats.shape[0]
        s.lambda_max = float(evals[-1])
        s.spectral_norm = math.sqrt(s.lambda_max)
        total = float(evals.sum())
        if s.lambda_max > 0:
            s.stable_rank = total / s.lambda_max
            p = sv / sv.sum()
            p = p[p > 0]
            s.effective_rank = float(np.exp(-(p * np.log(p)).sum()))
            per = np.sqrt(lam.cpu().numpy())  # per matrix, for the rank tolerance of each
            tol = per.max(axis=1, keepdims=True) * max(rows, cols) * np.finfo(np.float32).eps
            s.rank = int((per > tol).sum())
        else:
            s.stable_rank = s.effective_rank = 0.0
        s.fit = fit_power_law(evals, cfg.evals_thresh, cfg.min_fit_evals)
        if cfg.randomize:
            rand = np.sort(_gram_eigenvalues(_matrices(_permuted(weight, cfg.seed), cfg.conv)).reshape(-1).cpu().numpy())
            s.rand_lambda_max = float(rand[-1])
            s.soft_rank = s.rand_lambda_max / s.lambda_max if s.lambda_max > 0 else math.nan
            s.mp_edge, mean_outlier = _mp_edge(weight, rows, cols, cfg.tw_margin)
            s.n_spikes = int((evals > max(s.rand_lambda_max, s.mp_edge)).sum())
            s.n_traps = max(0, int((rand > s.mp_edge).sum()) - int(mean_outlier))
    s.flags = _flags(s, cfg)
    return s


def _flags(s: SpectralStats, cfg: SpectralConfig) -> list[str]:
    flags = []
    f = s.fit
    if f.quality == "good":
        if f.alpha < cfg.alpha_low:
            flags.append(f"alpha {f.alpha:.2f} < {cfg.alpha_low:g}: heavy-tailed spectrum, over-trained or over-fitted "
                         "(lower the learning rate, regularise, or stop earlier)")
        elif f.alpha > cfg.alpha_high:
            flags.append(f"alpha {f.alpha:.2f} > {cfg.alpha_high:g}: nearly random spectrum, under-trained "
                         "(train longer or raise this layer's learning rate)")
    if s.lambda_max == 0:
        flags.append("all singular values are zero")
    else:
        if s.rank < s.max_rank:
            flags.append(f"rank collapse: rank-deficient, {s.max_rank - s.rank} of {s.max_rank} singular values ~0")
        elif s.max_rank >= 8 and s.effective_rank < cfg.collapse_fraction * s.max_rank:
            flags.append(f"rank collapse: effective rank {s.effective_rank:.1f} of {s.max_rank} "
                         f"(< {100 * cfg.collapse_fraction:.0f}%)")
    if s.n_traps > 0:
        flags.append(f"correlation trap: {s.n_traps} eigenvalue(s) of the randomly permuted weights above the "
                     "Marchenko-Pastur edge (a few very large weights; clip them or lower the learning rate)")
    if s.n_spikes == 0 and f.n_evals >= cfg.min_fit_evals and s.lambda_max > 0:
        flags.append("no structure beyond random: no eigenvalue above the permuted weights' largest (untrained?)")
    return flags
