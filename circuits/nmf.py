"""One-sided NMF of weights ("Visualizing Weights", aside *One Simple Trick*).

A conv neuron's input weights ``[in, kh, kw]`` have hundreds of input channels; reduce that
axis to 3 non-negative factors and draw the factors' spatial maps as R, G, B.

What this module offers:

- :func:`posneg` – split signs: ``relu(x)`` and ``relu(-x)`` concatenated along ``dim``.
- :func:`nmf` – a batched NMF solver: many independent matrices ``[B, m, n]`` are factored
  as one problem on the tensor's device (HALS / cyclic coordinate descent, the same update
  order and stopping rule as scikit-learn's default ``solver="cd"``, with a batched
  ``nndsvda`` initialisation). Each matrix stops on its own when it has converged. Two
  backends run the same algorithm: batched torch ops (any device) and, on the CPU, a fused
  kernel compiled with numba (``circuits._hals_cpu``) that keeps each matrix in cache.
  Every result is checked finite: a NaN or Inf raises :class:`NMFNumericalError` naming the
  matrix, never reaches a figure.
- :class:`NMFReducer` – a scikit-learn estimator (``clone``, ``Pipeline``, grid search) that
  reduces any axis of an N-d numpy array or torch tensor (like Lucid/Lucent's
  ``ChannelReducer``), optionally with one axis indexing independent problems.
- :func:`neuron_factors` – per neuron: 3 spatial maps (the RGB picture) and signed channel
  loadings, plus how much of the weights they explain.
- :func:`family_factors` – a family of neurons: non-negative directions in input-channel space
  and each neuron's signed loadings on them (article figure 7).
- :func:`factors_rgb` – the spatial maps as an RGB numpy image, upsampled without blurring.
- :func:`banding_score` / :func:`weight_banding` – how much spatial factors vary along y
  versus x (article figure 2, weight banding).

"Explained variance" everywhere in this module is the *uncentred* fraction of the data's sum
of squares, ``1 - ||X - W H||_F**2 / ||X||_F**2`` (NMF has no mean term and the data are
non-negative, so this is the natural measure); ``rel_error = ||X - W H||_F / ||X||_F``, and
``explained = 1 - rel_error**2``. For posneg'd weights ``||X||_F = ||weights||_F``. An all-zero
matrix (a dead unit) has ``rel_error = 0`` and ``explained = 1``.

Example::

    >>> import torch
    >>> from circuits.nmf import neuron_factors, factors_rgb
    >>> w = torch.randn(8, 16, 5, 5)              # [out, in, kh, kw]
    >>> f = neuron_factors(w, 3)
    >>> f.spatial.shape, f.loadings.shape, f.explained.shape
    (torch.Size([8, 3, 5, 5]), torch.Size([8, 3, 16]), torch.Size([8]))
    >>> factors_rgb(f, scale=4).shape
    (8, 20, 20, 3)
"""

from __future__ import annotations

import numbers
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils.validation import check_is_fitted
from torch import nn

__all__ = [
    "posneg",
    "nmf",
    "NMFResult",
    "NMFNumericalError",
    "NMFReducer",
    "NeuronFactors",
    "neuron_factors",
    "FamilyFactors",
    "family_factors",
    "factors_rgb",
    "banding_score",
    "weight_banding",
]

ArrayLike = Union[np.ndarray, torch.Tensor]
_INITS = ("nndsvda", "nndsvd", "random")


# ----------------------------------------------------------------------------- helpers


def _as_tensor(x: object, name: str = "X", device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
    """numpy array / tensor → floating tensor (float16/bfloat16/ints → float32)."""
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
    elif isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        raise TypeError(f"{name} must be a numpy array or a torch tensor; got {type(x).__name__}")
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold real numbers; got dtype {t.dtype}")
    if t.dtype not in (torch.float32, torch.float64):
        t = t.to(torch.float32)
    if device is not None:
        t = t.to(device)
    return t


def _check_finite(t: torch.Tensor, name: str) -> float:
    """Raise a ValueError naming the non-finite values of ``t``; return ``t``'s minimum."""
    if t.numel() == 0:
        return 0.0
    # min and max propagate NaN, so both finite <=> every value finite: one cheap pass
    # (40x faster than isfinite().all() on large weights); the counts only on failure
    lo, hi = torch.aminmax(t)
    if bool(torch.isfinite(lo) & torch.isfinite(hi)):
        return float(lo)
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        nan = int(torch.isnan(t).sum())
        raise ValueError(
            f"{name} contains {bad} non-finite value(s) ({nan} NaN, {bad - nan} Inf) "
            f"out of {t.numel()}; NMF needs finite data"
        )
    return float(lo)


def _check_k(k: object, m: int, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"n_components must be an int; got {type(k).__name__} {k!r}")
    k = int(k)
    if k < 1:
        raise ValueError(f"n_components must be >= 1; got {k}")
    if k > min(m, n):
        raise ValueError(
            f"n_components={k} is larger than the smaller dimension of the data "
            f"(n_samples={m}, n_features={n}, min={min(m, n)}); choose n_components <= {min(m, n)}"
        )
    return k


def _like(t: torch.Tensor, ref: ArrayLike) -> ArrayLike:
    """Return ``t`` as the same kind of object as ``ref`` (numpy → numpy, tensor → tensor on its device)."""
    if isinstance(ref, np.ndarray):
        dtype = ref.dtype if ref.dtype in (np.float32, np.float64) else np.float32
        return t.detach().cpu().numpy().astype(dtype, copy=False)
    return t.to(ref.device)


def _weight_tensor(weights: object, name: str = "weights") -> torch.Tensor:
    if isinstance(weights, nn.Module):
        w = getattr(weights, "weight", None)
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"{name}: module {type(weights).__name__} has no weight tensor")
        weights = w
    return _as_tensor(weights, name)


def _safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(b > 0, a / torch.where(b > 0, b, torch.ones_like(b)), torch.zeros_like(a))


def _fraction(err: torch.Tensor, norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rel_error, explained) from ||X - WH|| and ||X||."""
    rel = _safe_div(err, norm)
    return rel, 1.0 - rel.square()


# ----------------------------------------------------------------------------- posneg


def posneg(x: ArrayLike, dim: int = 0) -> ArrayLike:
    """``relu(x)`` and ``relu(-x)`` concatenated along ``dim`` (``x = a - b`` for the two halves).

    Shapes: ``[..., d, ...]`` → ``[..., 2*d, ...]`` (``d`` at ``dim``); numpy in, numpy out.

    Example::

        >>> posneg(torch.tensor([[1.0, -2.0]]), dim=1)
        tensor([[1., 0., 0., 2.]])
    """
    if isinstance(x, np.ndarray):
        return np.concatenate([np.maximum(x, 0), np.maximum(-x, 0)], axis=dim)
    if isinstance(x, torch.Tensor):
        return torch.cat([torch.relu(x), torch.relu(-x)], dim=dim)
    raise TypeError(f"posneg expects a numpy array or a torch tensor; got {type(x).__name__}")


# ----------------------------------------------------------------------------- solver


@dataclass
class NMFResult:
    """Output of :func:`nmf`. ``X ≈ W @ H``.

    Shapes (batched input ``[B, m, n]``; for a single ``[m, n]`` matrix drop the ``B``):
    ``W [B, m, k]``, ``H [B, k, n]``, and per matrix ``n_iter``, ``converged``,
    ``reconstruction_err`` (``||X - W H||_F``), ``rel_error`` (``/ ||X||_F``) and
    ``explained_variance`` (``1 - rel_error**2``), each ``[B]``.
    """

    W: torch.Tensor
    H: torch.Tensor
    n_iter: torch.Tensor
    converged: torch.Tensor
    reconstruction_err: torch.Tensor
    rel_error: torch.Tensor
    explained_variance: torch.Tensor


def _nndsvd(X: torch.Tensor, k: int, fill: bool, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched NNDSVD (Boutsidis & Gallopoulos 2008), as scikit-learn's ``nndsvd``/``nndsvda``.

    ``X [B, m, n]`` → ``W [B, m, k]``, ``H [B, k, n]``. The top-``k`` singular triplets come
    from an eigendecomposition of the Gram matrix of the smaller side in float64 (exact up to
    float64 rounding, and much faster than a batched SVD of wide matrices on the CPU).
    ``fill=True`` ('a' variant) replaces zeros by the mean of the matrix.

    Entries below ``eps * min(1, sqrt(max(X)))`` become zero: scikit-learn's absolute ``eps``
    for data whose maximum is at least 1, proportionally less for smaller data (whose factors
    are ``~sqrt(X)``), so that the start does not depend on the data's units: at a scale of
    1e-30 an absolute 1e-6 zeroes every entry, and the start degenerates to a constant.
    """
    B, m, n = X.shape
    Xd = X.to(torch.float64)
    floor = (eps * Xd.amax(dim=(1, 2)).sqrt().clamp(max=1.0)).to(X.dtype)[:, None, None]
    if m <= n:
        evals, evecs = torch.linalg.eigh(Xd @ Xd.mT)  # ascending
        U = evecs[..., -k:].flip(-1)  # [B, m, k]
        S = evals[..., -k:].flip(-1).clamp_min(0).sqrt()  # [B, k]
        V = (U.mT @ Xd).mT  # [B, n, k], columns scaled by S (this order reads X row-major: 5x faster)
    else:
        evals, evecs = torch.linalg.eigh(Xd.mT @ Xd)
        V = evecs[..., -k:].flip(-1)  # [B, n, k]
        S = evals[..., -k:].flip(-1).clamp_min(0).sqrt()
        U = Xd @ V
    # Singular values at float64 noise level carry no direction: zero them (they'd become ~0 anyway).
    tiny = S[..., :1] * 1e-7
    keep = S > tiny
    scale = torch.where(keep, 1.0 / torch.where(keep, S, torch.ones_like(S)), torch.zeros_like(S))
    if m <= n:
        V = V * scale[:, None, :]
    else:
        U = U * scale[:, None, :]
    S = torch.where(keep, S, torch.zeros_like(S))

    W = torch.empty(B, m, k, dtype=torch.float64, device=X.device)
    H = torch.empty(B, k, n, dtype=torch.float64, device=X.device)
    s0 = S[:, 0].sqrt()[:, None]
    W[..., 0] = s0 * U[..., 0].abs()
    H[:, 0, :] = s0 * V[..., 0].abs()
    for j in range(1, k):
        x, y = U[..., j], V[..., j]
        xp, yp = x.clamp(min=0), y.clamp(min=0)
        xn, yn = (-x).clamp(min=0), (-y).clamp(min=0)
        xpn, ypn = xp.norm(dim=-1, keepdim=True), yp.norm(dim=-1, keepdim=True)
        xnn, ynn = xn.norm(dim=-1, keepdim=True), yn.norm(dim=-1, keepdim=True)
        mp, mn = xpn * ypn, xnn * ynn
        use_p = mp > mn
        u = torch.where(use_p, _safe_div(xp, xpn), _safe_div(xn, xnn))
        v = torch.where(use_p, _safe_div(yp, ypn), _safe_div(yn, ynn))
        lbd = (S[:, j : j + 1] * torch.where(use_p, mp, mn)).sqrt()
        W[..., j] = lbd * u
        H[:, j, :] = lbd * v
    W = W.to(X.dtype)
    H = H.to(X.dtype)
    W = torch.where(W < floor, torch.zeros_like(W), W)
    H = torch.where(H < floor, torch.zeros_like(H), H)
    if fill:
        avg = X.mean(dim=(1, 2))[:, None, None]
        W = torch.where(W == 0, avg.expand_as(W), W)
        H = torch.where(H == 0, avg.expand_as(H), H)
    return W.contiguous(), H.contiguous()


class _RowSweep:
    """Cyclic coordinate-descent sweeps over the rows of ``F [B, k, L]`` (in place), minimising
    ``||X - A F||`` given ``G = A^T A [B, k, k]`` and ``P = A^T X [B, k, L]``.

    Row ``t`` moves to ``max(f - grad / hess, 0)`` with ``grad = G_t F - P_t`` and
    ``hess = max(G_tt, tiny)`` (scikit-learn's update; ``tiny``, the smallest normal number,
    keeps a denormal ``G_tt`` from overflowing the division). It is computed as
    ``(P_t - G'_t F) / hess`` with ``G'`` = ``G`` whose diagonal is ``G_tt - hess`` (0 unless
    ``G_tt < tiny``): the same number without ``f - grad / hess`` cancelling to float32 noise
    when the step is small next to ``f``. A zero factor (``G_tt = 0``) leaves the row as is.

    ``F``, ``G`` and ``P`` are persistent tensors (the caller refills ``G`` and ``P`` in place
    before each sweep; ``G``'s diagonal is overwritten), so every per-row view and scratch
    buffer is made once: a sweep costs three torch ops per row, which is what decides small
    problems on the CPU.
    """

    def __init__(self, F: torch.Tensor, G: torch.Tensor, P: torch.Tensor):
        B, k, L = F.shape
        self.F, self.G = F, G
        # each row's numerator P_t - G'_t F, [k, B, 1, L]: row-major so that each row's slice
        # is contiguous (bmm into a strided `out` falls back to a slow loop)
        self.num = torch.empty(k, B, 1, L, dtype=F.dtype, device=F.device)
        self.before = torch.empty(k, B, 1, L, dtype=F.dtype, device=F.device)  # F before the sweep
        self.hess = torch.empty(B, k, dtype=F.dtype, device=F.device)
        self.hess_rows = self.hess.mT[:, :, None, None]  # [k, B, 1, 1] view
        self.diag = torch.diagonal(G, dim1=1, dim2=2)
        self.rows = [(F[:, t : t + 1], G[:, t : t + 1], P[:, t : t + 1], self.num[t], self.hess_rows[t])
                     for t in range(k)]
        info = torch.finfo(F.dtype)
        self.tiny = info.tiny
        # Projected gradient: grad where f > 0, min(grad, 0) where f == 0. min(grad, f * big) is
        # the same in one fused op (f >= 0); it differs only for denormal f, negligibly.
        self.big = info.max * info.eps  # f * big overflowing to inf is harmless

    def __call__(self) -> torch.Tensor:
        """One sweep; returns the L1 norm of the projected gradient before each row's update,
        summed over the rows, per matrix ``[B]`` (scikit-learn's ``violation``)."""
        torch.clamp(self.diag, min=self.tiny, out=self.hess)
        self.diag.sub_(self.hess)
        F = self.F
        self.before.copy_(F.permute(1, 0, 2)[:, :, None])  # [B, k, L] -> [k, B, 1, L]
        for f, g, p, num, hess in self.rows:
            torch.baddbmm(p, g, F, alpha=-1, out=num)  # P_t - G'_t F
            torch.div(num, hess, out=f).clamp_(min=0)
        grad = torch.mul(self.before, self.hess_rows).sub_(self.num)  # G_t F - P_t, before each update
        projected = torch.minimum(grad, self.before.mul_(self.big), out=grad)
        # abs+sum is ~3x faster than linalg.vector_norm(ord=1) on the CPU
        return projected.abs_().sum((0, 2, 3))


class _Hals:
    """The torch HALS state of a working set: ``XH [B, m + k, n]`` holds ``X`` in its first
    ``m`` rows and ``H`` (updated in place) in the last ``k``, so one product ``H @ XH^T`` gives
    both ``H X^T`` and ``H H^T`` (one pass over X; this order is also ~25% faster than
    ``X @ H^T`` on the CPU). ``Wt [B, k, m]`` is ``W`` transposed."""

    def __init__(self, XH: torch.Tensor, Wt: torch.Tensor, update_H: bool):
        B, k, m = Wt.shape
        self.XH, self.Wt, self.m, self.update_H = XH, Wt, m, update_H
        self.XHt, self.H = XH.mT, XH[:, m:]
        self.both = torch.empty(B, k, m + k, dtype=Wt.dtype, device=Wt.device)
        self.w_sweep = _RowSweep(Wt, self.both[:, :, m:], self.both[:, :, :m])
        if update_H:
            self.WWt = torch.empty(B, k, k, dtype=Wt.dtype, device=Wt.device)
            self.WX = torch.empty_like(self.H)
            self.Wtt, self.X = Wt.mT, XH[:, :m]
            self.h_sweep = _RowSweep(self.H, self.WWt, self.WX)

    def iterate(self) -> torch.Tensor:
        """One outer iteration (W, then H); returns the violation ``[B]``."""
        torch.bmm(self.H, self.XHt, out=self.both)
        viol = self.w_sweep()
        if self.update_H:
            torch.bmm(self.Wt, self.Wtt, out=self.WWt)
            torch.bmm(self.Wt, self.X, out=self.WX)
            viol += self.h_sweep()
        return viol

    def keep(self, rows: torch.Tensor) -> "_Hals":
        """A new state holding only the matrices ``rows`` (a boolean mask) of this one."""
        return _Hals(self.XH[rows], self.Wt[rows], self.update_H)


# The solver keeps each matrix's maximum within [2**-limit, 2**limit] for its dtype (else it
# rescales the matrix by an exact power of 4 and scales the factors back): there, W^T X, H H^T
# and the residual neither underflow into denormals nor overflow. Data in that range (weights,
# activations) are left exactly as they are.
_SAFE_EXPONENT = {torch.float32: 40, torch.float64: 300}


def _prepare(
    X: object, k: object, max_iter: object, tol: object, init: str
) -> tuple[torch.Tensor, int, bool, Optional[torch.Tensor]]:
    """Validated ``X [B, m, n]`` (contiguous), ``k``, whether ``X`` was batched, and per matrix
    the exponent ``e`` to scale it by ``4**-e`` (None when every matrix is in the safe range)."""
    t = _as_tensor(X, "X")
    if t.ndim not in (2, 3):
        raise ValueError(f"X must be a matrix [m, n] or a batch of matrices [B, m, n]; got shape {tuple(t.shape)}")
    batched = t.ndim == 3
    if not batched:
        t = t[None]
    if t.shape[0] == 0 or t.shape[1] == 0 or t.shape[2] == 0:
        raise ValueError(f"X must not be empty; got shape {tuple(t.shape)}")
    t = t.contiguous()
    lo_b, hi_b = torch.aminmax(t.reshape(t.shape[0], -1), dim=1)  # one pass: finiteness, sign, scale
    if not bool(torch.isfinite(lo_b).all() & torch.isfinite(hi_b).all()):
        _check_finite(t, "X")  # raises, counting the bad values
    lo = float(lo_b.min())
    if lo < 0:
        raise ValueError(
            f"Negative values in data passed to NMF (min {lo:.4g}): NMF needs non-negative data; "
            "split signs first with circuits.nmf.posneg(x, dim)"
        )
    k = _check_k(k, t.shape[1], t.shape[2])
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int; got {max_iter!r}")
    if not isinstance(tol, numbers.Real) or tol < 0:
        raise ValueError(f"tol must be a non-negative number; got {tol!r}")
    if init not in _INITS:
        raise ValueError(f"init must be one of {_INITS}; got {init!r}")
    return t, k, batched, _scale_exponents(hi_b)


def _scale_exponents(hi: torch.Tensor) -> Optional[torch.Tensor]:
    """Per matrix (maximum ``hi``) the integer ``e`` (float64) that brings ``hi * 4**-e`` near 1
    where ``hi`` is outside the safe range, else 0; None when no matrix needs it."""
    limit = _SAFE_EXPONENT[hi.dtype]
    e = torch.log2(hi.to(torch.float64))  # -inf for a zero matrix: left alone
    need = torch.isfinite(e) & (e.abs() > limit)
    if not bool(need.any()):
        return None
    return torch.where(need, torch.round(e / 2), torch.zeros_like(e))


def nmf(
    X: ArrayLike,
    n_components: int = 3,
    *,
    max_iter: int = 200,
    tol: float = 1e-4,
    init: str = "nndsvda",
    seed: int = 0,
    H: Optional[ArrayLike] = None,
    batch_size: Optional[int] = None,
    progress: bool = False,
    backend: str = "auto",
) -> NMFResult:
    """Factor one matrix ``[m, n]`` or many independent ones ``[B, m, n]``: ``X ≈ W @ H``.

    All matrices are solved together as one batched problem on ``X``'s device, in ``X``'s
    float dtype. The algorithm is HALS (cyclic coordinate descent, W then H each iteration),
    the same as scikit-learn's ``NMF(solver="cd")``, with its stopping rule applied *per
    matrix*: matrix ``b`` stops after the first iteration where the L1 norm of its projected
    gradient is ``<= tol`` × that of iteration 1 (or, for ``tol > 0``, at rounding level:
    ``<= 32 eps`` × the L1 norm of ``W^T X`` and ``X H^T`` at the start, e.g. when the
    initialisation is already optimal), and its factors are frozen there, so solving
    a batch gives what solving each matrix alone gives. Converged matrices are dropped from the
    working set, so the cost falls as they finish; per-matrix results do not depend on how the
    batch is chunked (``batch_size``).

    Numerics: each coordinate update divides by ``max(G_tt, tiny)`` (the dtype's smallest
    normal number; a factor decayed to 1e-20 has a denormal ``G_tt``) and computes the new
    value directly rather than as ``old - step``; a matrix whose maximum is beyond
    ``2**±40`` (float32; ``2**±300`` in float64) is solved rescaled by an exact power of 4
    and its factors scaled back, so data at 1e-30 or 1e30 factor as well as data at 1.
    Errors are accumulated in float64. Every factor and error is checked finite; a NaN or Inf
    raises :class:`NMFNumericalError` with the matrices' batch indices.

    Args:
        X: non-negative, finite data ``[m, n]`` or ``[B, m, n]`` (numpy or torch).
        n_components: ``k``, at most ``min(m, n)``.
        max_iter: iteration budget (one iteration = one sweep over W and one over H).
        tol: relative tolerance of the stopping rule (0 runs all ``max_iter`` iterations).
        init: ``"nndsvda"`` (NNDSVD with zeros filled by the matrix mean; default, as
            scikit-learn), ``"nndsvd"``, or ``"random"`` (``sqrt(mean/k) * |N(0,1)|``, drawn
            for the whole batch from a generator seeded with ``seed``).
        seed: seeds the random initialisation (the NNDSVD inits are deterministic).
        H: fixed components ``[k, n]`` or ``[B, k, n]``: solve only for ``W`` (``transform``).
            ``W`` starts at ``sqrt(mean(X)/k)`` as in scikit-learn.
        batch_size: solve at most this many matrices at a time (results do not depend on
            it). Default: everything at once on a GPU and with the CPU kernel (which keeps one
            matrix per thread in cache; with ``progress`` it goes in 20 chunks to move the
            bar); for the torch backend on the CPU chunks of about 8 MB of ``X``, at least one
            per torch thread, solved side by side by ``torch.get_num_threads()`` threads.
        progress: show a tqdm bar (one step per chunk of matrices).
        backend: ``"auto"`` (default): ``"numba"`` for float32/float64 data on the CPU when
            numba is installed, else ``"torch"``. ``"numba"``: a fused kernel compiled with
            numba that solves each matrix (NNDSVD start, iterations, error) in one thread with
            its ``X`` in cache, the matrices shared over ``torch.get_num_threads()`` threads
            (CPU only; several times faster than ``"torch"`` there, most on small problems;
            the first call in a fresh install compiles it, tens of seconds, cached on disk).
            ``"torch"``: batched torch ops on any device. Both run the same algorithm, update
            formulas and stopping rule from the same start: the NNDSVD of both is an
            eigendecomposition of the float64 Gram matrix (LAPACK through numba; torch's
            ``eigh``), so the starts agree to float64 rounding, except where a matrix's
            top-``k`` singular values are (nearly) repeated and the singular vectors are not
            unique. Results agree up to float rounding.

    Returns:
        :class:`NMFResult` with ``W [B, m, k]``, ``H [B, k, n]`` (no ``B`` for a 2-d ``X``).

    Example::

        >>> X = torch.rand(480, 25, 64)           # 480 neurons' posneg'd weights
        >>> r = nmf(X, 3, max_iter=100)
        >>> r.W.shape, r.H.shape, r.rel_error.shape
        (torch.Size([480, 25, 3]), torch.Size([480, 3, 64]), torch.Size([480]))
    """
    threads = torch.get_num_threads()
    on_cpu = not isinstance(X, torch.Tensor) or X.device.type == "cpu"
    kernel = _cpu_kernel(backend, X)
    args = (X, n_components, kernel, threads, max_iter, tol, init, seed, H, batch_size, progress)
    if not on_cpu:
        return _nmf(*args)
    # On the CPU torch's own ops here are small: one intra-op thread each. Waking a thread per
    # op costs more than it saves (on a busy machine a time slice per op). The torch solver
    # instead shares its chunks of matrices over ``threads`` Python threads (torch releases the
    # GIL inside each op), like the kernel shares matrices over its threads.
    with _intra_op_threads(1):
        return _nmf(*args)


_THREADS_LOCK = threading.RLock()
# the torch solver on the CPU shares its chunks over threads from this many elements of X on
_TORCH_WORKERS_FROM = 1 << 19


@contextmanager
def _intra_op_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` for the block, then restored. The setting is
    process-wide, so a block that changes it holds a lock (concurrent callers take turns)."""
    if n == torch.get_num_threads():
        yield
        return
    with _THREADS_LOCK:
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(before)


def _nmf(
    X: ArrayLike, n_components: int, kernel: Optional[Any], threads: int, max_iter: int, tol: float, init: str,
    seed: int, H: Optional[ArrayLike], batch_size: Optional[int], progress: bool,
) -> NMFResult:
    """:func:`nmf` once the backend is chosen (``threads``: the caller's torch thread count,
    for the kernel)."""
    Xt, k, batched, exps = _prepare(X, n_components, max_iter, tol, init)
    B, m, n = Xt.shape
    dev, dtype = Xt.device, Xt.dtype
    if exps is not None:  # exact powers of 4, computed in float64 (the factor may exceed float32)
        Xt = (Xt.to(torch.float64) * torch.exp2(-2 * exps)[:, None, None]).to(dtype)
    # The torch solver on the CPU solves its chunks side by side, one thread each; below ~0.5M
    # elements of X a thread pool costs more than it saves (measured on 2 cores).
    side_by_side = kernel is None and dev.type == "cpu" and B * m * n >= _TORCH_WORKERS_FROM
    if batch_size is None:
        if kernel is not None:  # each matrix is solved alone anyway; chunks only pace the bar
            batch_size = -(-B // 20) if progress else B
        elif dev.type != "cpu":  # GPU: everything at once
            batch_size = B
        else:
            # CPU: chunks of about 8 MB of X stay in cache across iterations, at least one per thread.
            per_thread = -(-B // max(1, threads)) if side_by_side else B
            batch_size = max(1, min((8 << 20) // (m * n * Xt.element_size()), per_thread))
    elif isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int or None; got {batch_size!r}")
    Hfix: Optional[torch.Tensor] = None
    Wt_all: Optional[torch.Tensor] = None
    H_all: Optional[torch.Tensor] = None
    if H is not None:
        Hfix = _as_tensor(H, "H", device=dev).to(dtype)
        if Hfix.ndim == 2:
            Hfix = Hfix[None].expand(B, -1, -1)
        if Hfix.shape != (B, k, n):
            raise ValueError(f"H must have shape [{k}, {n}] or [{B}, {k}, {n}]; got {tuple(Hfix.shape)}")
        if _check_finite(Hfix, "H") < 0:
            raise ValueError("H must be non-negative")
        if exps is not None:  # the rescaled problem's units: X' = 4**-e X ≈ (2**-e W)(2**-e H)
            Hfix = (Hfix.to(torch.float64) * torch.exp2(-exps)[:, None, None]).to(dtype)
    elif init == "random":  # drawn for the whole batch, so chunking does not change it
        gen = torch.Generator(device=dev).manual_seed(int(seed))
        avg = (Xt.mean(dim=(1, 2)) / k).sqrt()[:, None, None]
        H_all = avg * torch.randn(B, k, n, generator=gen, device=dev, dtype=dtype).abs()
        Wt_all = avg * torch.randn(B, k, m, generator=gen, device=dev, dtype=dtype).abs()

    chunks = range(0, B, batch_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(chunks), desc=f"NMF x{B} (chunks)", leave=False)
    def solve_chunk(i: int) -> tuple[torch.Tensor, ...]:
        sl = slice(i, i + batch_size)
        Xc = Xt[sl]
        Hc = Hfix[sl] if Hfix is not None else None if H_all is None else H_all[sl]
        Wc = None if Wt_all is None else Wt_all[sl]
        if kernel is not None:
            return _solve_kernel(kernel, Xc, k, Wc, Hc, init, Hfix is None, max_iter, float(tol), threads)
        if Hfix is not None:
            Hc = Hc.contiguous().clone()
            avg = (Xc.mean(dim=(1, 2)) / k).sqrt()[:, None, None]
            Wc = avg.expand(Xc.shape[0], k, m).contiguous().clone()
        elif Hc is not None and Wc is not None:
            Hc, Wc = Hc.clone(), Wc.clone()
        else:
            W0, Hc = _nndsvd(Xc, k, fill=init == "nndsvda")
            Wc = W0.mT.contiguous()
        return _solve(Xc, Wc, Hc, Hfix is None, max_iter, float(tol))

    workers = min(threads, len(chunks)) if side_by_side else 1
    try:
        if workers > 1:
            with ThreadPoolExecutor(workers, thread_name_prefix="circuits-nmf") as pool:
                futures = [pool.submit(solve_chunk, i) for i in chunks]
                if bar is not None:
                    for f in futures:
                        f.add_done_callback(lambda _f: bar.update(1))
                parts = [f.result() for f in futures]
        else:
            parts = []
            for i in chunks:
                parts.append(solve_chunk(i))
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    Wt, Hs, n_iter, converged = (torch.cat([p[i] for p in parts]) for i in range(4))

    W = Wt.mT.contiguous()
    if kernel is not None:  # the kernel reports the error and ||X|| itself (X still in cache)
        err64, norm64 = torch.cat([p[4] for p in parts]), torch.cat([p[5] for p in parts])
    else:
        err64 = _recon_err(Xt, W, Hs)
        norm64 = torch.linalg.vector_norm(Xt.flatten(1), dim=1, dtype=torch.float64)
    if exps is not None:  # back to the data's units: X = 4**e X', W = 2**e W', H = 2**e H'
        up = torch.exp2(exps)
        W = (W.to(torch.float64) * up[:, None, None]).to(dtype)
        Hs = (Hs.to(torch.float64) * up[:, None, None]).to(dtype)
        err64, norm64 = err64 * up * up, norm64 * up * up
    rel, expl = _fraction(err64, norm64)
    err, rel, expl = err64.to(dtype), rel.to(dtype), expl.to(dtype)
    _check_result(W, Hs, err, rel, expl, kernel is not None)
    if not batched:
        return NMFResult(W[0], Hs[0], n_iter[0], converged[0], err[0], rel[0], expl[0])
    return NMFResult(W, Hs, n_iter, converged, err, rel, expl)


def _require_finite(where: str, **tensors: torch.Tensor) -> None:
    """Raise :class:`NMFNumericalError` if any of ``tensors`` holds NaN or Inf."""
    for name, t in tensors.items():
        if t.numel() and not bool(torch.isfinite(t.sum(dtype=torch.float64))):
            bad = int((~torch.isfinite(t)).sum())
            raise NMFNumericalError(f"{where}: {name} has {bad} non-finite value(s) out of {t.numel()}", [])


class NMFNumericalError(FloatingPointError):
    """NMF produced non-finite numbers (NaN/Inf) for some matrices; ``indices`` lists them
    (positions in the batch given to :func:`nmf`; :func:`neuron_factors` gives neuron ids)."""

    def __init__(self, message: str, indices: Sequence[int] = ()):
        super().__init__(message)
        self.indices = [int(i) for i in indices]

    def __reduce__(self) -> tuple:  # picklable with its indices (worker processes)
        return type(self), (str(self), self.indices)


def _check_result(
    W: torch.Tensor, H: torch.Tensor, err: torch.Tensor, rel: torch.Tensor, expl: torch.Tensor, kernel: bool
) -> None:
    """Raise :class:`NMFNumericalError` naming the matrices whose factors or errors are not finite."""
    # per matrix: every entry of W and H finite <=> their sum is (one reduction, no [B, m, k] mask)
    f64 = torch.float64
    ok = torch.isfinite(W.sum((1, 2), dtype=f64) + H.sum((1, 2), dtype=f64) + err + rel + expl)
    if bool(ok.all()):
        return
    bad = (~ok).nonzero().flatten().tolist()
    where = "numba kernel" if kernel else "torch solver"
    raise NMFNumericalError(
        f"NMF ({where}) produced non-finite factors or errors for {len(bad)} of {W.shape[0]} matrices "
        f"(batch index {_first(bad)}); {_nonfinite_hint(W.dtype)}",
        bad,
    )


def _first(indices: Sequence[int], n: int = 10) -> str:
    return ", ".join(map(str, indices[:n])) + (", ..." if len(indices) > n else "")


def _nonfinite_hint(dtype: torch.dtype) -> str:
    return (f"the data are finite, so this is an overflow (data too large for {dtype}: rescale them or "
            "use float64) or a solver bug (please report it with the data)")


def _solve(
    X: torch.Tensor, Wt: torch.Tensor, H: torch.Tensor, update_H: bool, max_iter: int, tol: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """HALS iterations on one chunk ``X [B, m, n]`` from ``Wt [B, k, m]``, ``H [B, k, n]``.

    Each matrix stops (its factors saved, frozen) at its own convergence; returns
    ``(Wt, H, n_iter [B], converged [B])``.
    """
    B, dev, m = X.shape[0], X.device, X.shape[1]
    out_Wt, out_H = Wt.clone(), H.clone()
    scale = _noise_scale(tol, X.dtype)
    noise = scale * ((Wt @ X).abs().sum((1, 2)) + (H @ X.mT).abs().sum((1, 2)))
    if scale < 0:
        noise.fill_(-1.0)
    state = _Hals(torch.cat([X, H], dim=1), Wt.contiguous().clone(), update_H)
    n_iter = torch.full((B,), max_iter, dtype=torch.long, device=dev)
    converged = torch.zeros(B, dtype=torch.bool, device=dev)
    ids = torch.arange(B, device=dev)  # batch index of each working-set row
    live = torch.ones(B, dtype=torch.bool, device=dev)  # working-set rows not yet stopped
    threshold = noise
    for it in range(1, max_iter + 1):
        viol = state.iterate()
        if it == 1:  # converged: violation <= tol x the first one, or at the noise floor
            threshold = torch.maximum(tol * viol, noise)
        done = viol <= threshold
        stop = live if it == max_iter else done & live
        if bool(stop.any()):
            idx = ids[stop]
            out_Wt[idx] = state.Wt[stop]
            out_H[idx] = state.H[stop]
            n_iter[idx] = it
            converged[idx] = done[stop]
            live = live & ~stop
            n_live = int(live.sum())
            if n_live == 0:
                break
            # Stopped rows stay in the working set (their saved factors are final) until
            # dropping them pays for copying X: compact once a quarter of the rows are done.
            if n_live <= 0.75 * live.numel():
                ids, threshold, state = ids[live], threshold[live], state.keep(live)
                live = torch.ones(n_live, dtype=torch.bool, device=dev)
    return out_Wt, out_H, n_iter, converged


def _noise_scale(tol: float, dtype: torch.dtype) -> float:
    """Factor of the violation floor ``scale * (|W^T X|_1 + |X H^T|_1)`` (at the start), or -1
    for none (``tol = 0`` promises every iteration).

    A violation at rounding level (an initialisation that is already optimal, as NNDSVD is for
    k = 1) is noise; comparing noise with noise would make the stopping iteration depend on the
    matmul kernel's rounding, i.e. on the batch. Below this floor a matrix has converged.
    """
    return -1.0 if tol == 0 else 32 * torch.finfo(dtype).eps


_BACKENDS = ("auto", "numba", "torch")


def _cpu_kernel(backend: object, X: object) -> Optional[Any]:
    """The numba HALS module when ``backend`` asks for it (or ``"auto"`` allows it) and ``X``
    (a tensor or an array) is on the CPU, else None."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}; got {backend!r}")
    if backend == "torch":
        return None
    usable = not isinstance(X, torch.Tensor) or X.device.type == "cpu"  # _prepare makes it float32/64
    if backend == "numba" and not usable:
        raise ValueError(
            f'backend="numba" runs on the CPU in float32 or float64; X is {X.dtype} on {X.device}. '  # type: ignore[union-attr]
            'Use backend="torch" (or "auto").'
        )
    if not usable:
        return None
    try:
        from . import _hals_cpu
    except ImportError as e:
        if backend == "numba":
            raise ImportError(f'backend="numba" needs numba (pip install numba): {e}') from e
        return None
    return _hals_cpu


_FLOPS_PER_THREAD = 1e8


def _solve_kernel(
    kernel: Any, X: torch.Tensor, k: int, Wt: Optional[torch.Tensor], H: Optional[torch.Tensor], init: str,
    update_H: bool, max_iter: int, tol: float, threads: int,
) -> tuple[torch.Tensor, ...]:
    """:func:`_solve` by the compiled CPU kernel (module ``circuits._hals_cpu``), start included:
    NNDSVD computed in the kernel when neither ``Wt`` nor ``H`` is given, flat ``W`` when only
    ``H`` is (fixed components), else the given ``Wt``, ``H``; at most ``threads`` threads.
    Returns ``(Wt, H, n_iter, converged, ||X - W H||_F, ||X||_F)`` per matrix (the last two
    in float64)."""
    B, m, n = X.shape
    Xn = X.detach().contiguous().numpy()
    if H is None:
        mode = kernel.INIT_GIVEN
        H = torch.empty(B, k, n, dtype=X.dtype)
        Wt = torch.empty(B, k, m, dtype=X.dtype)
        with kernel.one_blas_thread():
            kernel.nndsvd_batch(Xn, Wt.numpy(), H.numpy(), init == "nndsvda")
    elif Wt is None:
        mode = kernel.INIT_FLAT_W
        H = H.contiguous().clone()
        Wt = torch.empty(B, k, m, dtype=X.dtype)
    else:
        mode = kernel.INIT_GIVEN
        H, Wt = H.contiguous().clone(), Wt.contiguous().clone()
    n_iter = torch.empty(B, dtype=torch.long)
    converged = torch.empty(B, dtype=torch.bool)
    error = torch.empty(B, dtype=torch.float64)
    norm = torch.empty(B, dtype=torch.float64)
    # One torch knob for threads: torch.set_num_threads governs this too. A thread is woken only
    # for about 1e8 flops of work (~5 ms): waking one costs far more than a small problem on a
    # busy machine (the second thread may wait for a time slice).
    flops = 4.0 * B * m * n * H.shape[1] * max_iter
    wanted = max(1, min(threads, B, int(flops // _FLOPS_PER_THREAD)))
    with kernel.LOCK:
        numba = kernel.numba
        threads = numba.get_num_threads()
        numba.set_num_threads(min(wanted, numba.config.NUMBA_NUM_THREADS))
        try:
            kernel.hals_batch(Xn, Wt.numpy(), H.numpy(), mode, update_H, max_iter, tol,
                              _noise_scale(tol, X.dtype), n_iter.numpy(), converged.numpy(), error.numpy(),
                              norm.numpy())
        finally:
            numba.set_num_threads(threads)
    return Wt, H, n_iter, converged, error, norm


def _recon_err(X: torch.Tensor, W: torch.Tensor, H: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """``||X - W H||_F`` per matrix ``[B]`` in float64 (float32 squares of tiny residuals
    underflow to 0: a silent "explained = 1"), computed in chunks of the batch."""
    out = [
        torch.linalg.vector_norm((X[i : i + chunk] - W[i : i + chunk] @ H[i : i + chunk]).flatten(1), dim=1,
                                 dtype=torch.float64)
        for i in range(0, X.shape[0], chunk)
    ]
    return torch.cat(out)


# ----------------------------------------------------------------------------- estimator


class NMFReducer(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """scikit-learn NMF estimator that reduces one axis of an N-d array (like Lucid's ``ChannelReducer``).

    The reduced ``axis`` holds the features; every other axis is flattened into samples. With
    ``batch_axis`` set, each index along that axis is an independent problem and all of them
    are solved as one batch. numpy in → numpy out; a tensor in → a tensor on its device out
    (other array-likes, e.g. lists, are read with ``numpy.asarray``).

    A scikit-learn estimator: the constructor only stores its parameters (validated by
    ``fit``), so ``clone``, ``get_params``/``set_params``, ``Pipeline`` and grid search work;
    ``fit`` keeps the components, not the data.

    Shapes (``F`` = size of ``axis``, ``k = n_components``, ``B`` = size of ``batch_axis``):
    ``fit_transform(X)`` returns ``X``'s shape with ``axis`` of size ``k``;
    ``components_`` is ``[k, F]`` (``[B, k, F]`` when batched); ``reconstruction_err_``,
    ``rel_error_``, ``explained_variance_`` (uncentred, see the module doc) and ``n_iter_`` are
    floats/ints (arrays ``[B]`` when batched).

    Args:
        n_components: ``k``.
        axis: the axis reduced (features), default last (channels-last activations).
        batch_axis: optional axis of independent problems.
        max_iter, tol, init, seed, backend: as :func:`nmf`.
        device: where to compute (default: the input's device; numpy → CPU).
        progress: show a progress bar while fitting.

    Example::

        >>> acts = np.random.rand(10, 7, 7, 64).astype("float32")   # [N, H, W, C]
        >>> red = NMFReducer(3)
        >>> red.fit_transform(acts).shape, red.components_.shape
        ((10, 7, 7, 3), (3, 64))
        >>> w = torch.rand(480, 128, 5, 5)                          # one problem per neuron
        >>> NMFReducer(3, axis=1, batch_axis=0).fit_transform(w).shape
        torch.Size([480, 3, 5, 5])
        >>> from sklearn.pipeline import make_pipeline              # a scikit-learn transformer
        >>> make_pipeline(NMFReducer(2)).fit_transform(np.random.rand(6, 5)).shape
        (6, 2)
    """

    def __init__(
        self,
        n_components: int = 3,
        *,
        axis: int = -1,
        batch_axis: Optional[int] = None,
        max_iter: int = 200,
        tol: float = 1e-4,
        init: str = "nndsvda",
        seed: int = 0,
        device: Optional[Union[str, torch.device]] = None,
        progress: bool = False,
        backend: str = "auto",
    ):
        self.n_components = n_components
        self.axis = axis
        self.batch_axis = batch_axis
        self.max_iter = max_iter
        self.tol = tol
        self.init = init
        self.seed = seed
        self.device = device
        self.progress = progress
        self.backend = backend

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.positive_only = True
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags

    # -- validation and layout ------------------------------------------------------------

    def _validate_params(self) -> None:
        k = self.n_components
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"n_components must be a positive int; got {k!r}")
        for name in ("axis", "batch_axis", "seed"):
            v = getattr(self, name)
            if (v is not None or name != "batch_axis") and (isinstance(v, bool) or not isinstance(v, numbers.Integral)):
                raise ValueError(f"{name} must be an int{' or None' if name == 'batch_axis' else ''}; got {v!r}")
        if not isinstance(self.progress, bool):
            raise ValueError(f"progress must be True or False; got {self.progress!r}")
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}; got {self.backend!r}")
        if self.device is not None:
            torch.device(self.device)  # raises for a bad device string
        # max_iter, tol and init are checked by nmf() with its messages

    def _input(self, X: object) -> torch.Tensor:
        """Any array-like → a floating tensor on ``device`` (numpy/objects via ``numpy.asarray``)."""
        if not isinstance(X, (torch.Tensor, np.ndarray)):
            if hasattr(X, "toarray") or type(X).__module__.startswith("scipy.sparse"):
                raise TypeError("NMFReducer does not take sparse input; pass a dense array (X.toarray())")
            X = np.asarray(X)
        if isinstance(X, np.ndarray):
            if X.dtype == object:
                X = X.astype(np.float64)  # numbers stored as objects; anything else raises TypeError
            if np.iscomplexobj(X):
                raise ValueError("Complex data not supported by NMFReducer; pass real, non-negative data")
            if not X.flags.writeable:  # e.g. a read-only memmap: torch wants a writeable buffer
                X = np.array(X)
        return _as_tensor(X, "X", self.device)

    def _axes(self, ndim: int) -> tuple[int, Optional[int]]:
        def norm(a: int, what: str) -> int:
            if isinstance(a, bool) or not isinstance(a, numbers.Integral) or not -ndim <= a < ndim:
                raise ValueError(f"{what}={a!r} is out of range for an array with {ndim} dimensions")
            return int(a) % ndim

        need = 2 if self.batch_axis is None else 3
        if ndim < need:
            raise ValueError(
                f"expected an array with at least {need} dimensions; got {ndim}. Reshape your data, e.g. "
                "X.reshape(-1, 1) for a single feature or X.reshape(1, -1) for a single sample"
            )
        ax = norm(self.axis, "axis")
        bax = None if self.batch_axis is None else norm(self.batch_axis, "batch_axis")
        if bax is not None and bax == ax:
            raise ValueError(f"axis and batch_axis must differ; both are {ax}")
        return ax, bax

    def _flatten(self, t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], int, Optional[int]]:
        """N-d → ``[B, samples, features]`` and what is needed to undo it."""
        ax, bax = self._axes(t.ndim)
        if t.numel() == 0:
            features = t.shape[ax]
            raise ValueError(
                f"Found array with {t.numel() // features if features else 0} sample(s) and {features} feature(s) "
                f"(shape={tuple(t.shape)}) while a minimum of 1 is required."
            )
        if bax is None:
            moved = torch.movedim(t, ax, -1)
            mid = tuple(moved.shape[:-1])
            flat = moved.reshape(1, -1, moved.shape[-1])
        else:
            moved = torch.movedim(t, (bax, ax), (0, -1))
            mid = tuple(moved.shape[1:-1])
            flat = moved.reshape(moved.shape[0], -1, moved.shape[-1])
        return flat, mid, ax, bax

    def _unflatten(self, Y: torch.Tensor, mid: tuple[int, ...], ax: int, bax: Optional[int]) -> torch.Tensor:
        last = Y.shape[-1]
        if bax is None:
            return torch.movedim(Y[0].reshape(*mid, last), -1, ax)
        return torch.movedim(Y.reshape(Y.shape[0], *mid, last), (0, -1), (bax, ax))

    def _out(self, v: torch.Tensor, ref: ArrayLike) -> object:
        if self.batch_axis is None:
            return v[0].item()
        if isinstance(ref, np.ndarray) and not v.is_floating_point():
            return v.cpu().numpy()
        return _like(v, ref)

    @staticmethod
    def _kind(X: object, t: torch.Tensor) -> ArrayLike:
        """What outputs look like: ``X`` for a tensor or array, else an empty numpy stand-in of
        ``t``'s dtype (lists and other array-likes come back as numpy)."""
        if isinstance(X, (torch.Tensor, np.ndarray)):
            return X
        return np.empty(0, dtype=np.float64 if t.dtype == torch.float64 else np.float32)

    # -- API ------------------------------------------------------------------------------

    def fit_transform(self, X: ArrayLike, y: None = None) -> ArrayLike:
        """Fit to ``X`` and return its reduced form (``X``'s shape, ``axis`` of size ``k``).
        ``y`` is ignored (scikit-learn's signature)."""
        self._validate_params()
        t = self._input(X)
        flat, mid, ax, bax = self._flatten(t)
        r = nmf(
            flat, self.n_components, max_iter=self.max_iter, tol=self.tol, init=self.init,
            seed=self.seed, progress=self.progress, backend=self.backend,
        )
        ref = self._kind(X, t)
        self._components = r.H  # [B, k, F] as a tensor, for transform/inverse_transform
        self.components_ = _like(r.H if bax is not None else r.H[0], ref)
        self.reconstruction_err_ = self._out(r.reconstruction_err, ref)
        self.rel_error_ = self._out(r.rel_error, ref)
        self.explained_variance_ = self._out(r.explained_variance, ref)
        self.n_iter_ = self._out(r.n_iter, ref)
        self.n_features_in_ = flat.shape[-1]
        self._n_features_out = self.n_components
        return _like(self._unflatten(r.W, mid, ax, bax), ref)

    def fit(self, X: ArrayLike, y: None = None) -> "NMFReducer":
        """Fit to ``X``; returns ``self``. ``y`` is ignored."""
        self.fit_transform(X)
        return self

    def _fitted(self) -> torch.Tensor:
        check_is_fitted(self, "components_", msg="this NMFReducer is not fitted yet; call fit or fit_transform first")
        return self._components

    def transform(self, X: ArrayLike) -> ArrayLike:
        """Reduce new data with the fitted components (solves for ``W`` only, as scikit-learn)."""
        H = self._fitted()
        t = self._input(X)
        flat, mid, ax, bax = self._flatten(t)
        if flat.shape[-1] != H.shape[-1] or flat.shape[0] != H.shape[0]:
            raise ValueError(
                f"X has {flat.shape[-1]} features, but NMFReducer is expecting {H.shape[-1]} features as input "
                f"(along axis {ax}; batch {flat.shape[0]}, fitted on batch {H.shape[0]})"
            )
        r = nmf(flat, self.n_components, max_iter=self.max_iter, tol=self.tol, H=H.to(flat.device, flat.dtype),
                backend=self.backend)
        ref = self._kind(X, t)
        return _like(self._unflatten(r.W, mid, ax, bax), ref)

    def inverse_transform(self, X: ArrayLike) -> ArrayLike:
        """Map reduced data (``axis`` of size ``k``) back to feature space: ``X @ components_``."""
        H = self._fitted()
        t = self._input(X)
        ax, bax = self._axes(t.ndim)
        if t.shape[ax] != self.n_components:
            raise ValueError(f"X must have size {self.n_components} along axis {ax}; got shape {tuple(t.shape)}")
        flat, mid, ax, bax = self._flatten(t)
        if flat.shape[0] != H.shape[0]:
            raise ValueError(f"X has batch size {flat.shape[0]}; fitted batch size is {H.shape[0]}")
        Xh = flat @ H.to(flat.device, flat.dtype)
        _require_finite("NMFReducer.inverse_transform", result=Xh)
        ref = self._kind(X, t)
        return _like(self._unflatten(Xh, mid, ax, bax), ref)

    def __call__(self, X: ArrayLike) -> ArrayLike:
        """``transform`` when fitted, else ``fit_transform`` (as Lucid's ChannelReducer)."""
        return self.transform(X) if hasattr(self, "components_") else self.fit_transform(X)


# ----------------------------------------------------------------------------- neuron factors


@dataclass
class NeuronFactors:
    """Per-neuron one-sided NMF of input weights (see :func:`neuron_factors`).

    ``spatial [out, k, kh, kw]``: non-negative spatial maps, each scaled to max 1 (the RGB
    picture). ``loadings [out, k, in]``: signed channel loadings ``B[k, c] - B[k, in + c]``
    (they carry the scale). ``explained [out]`` and ``rel_error [out]`` (see the module doc),
    ``neurons [out]`` the output-channel indices factored, ``n_iter [out]``.
    Factors are ordered by their share of the reconstruction, largest first (R, G, B).

    In a notebook it shows itself (``_repr_html_``): one row per neuron (at most 32) with the
    NMF picture (the first three maps as R, G, B, a thumbnail inlined as PNG), the explained
    fraction and each factor's strongest input channels; non-finite values are flagged in red;
    the HTML stays under 200 KB (:mod:`circuits._display`).
    """

    spatial: torch.Tensor
    loadings: torch.Tensor
    explained: torch.Tensor
    rel_error: torch.Tensor
    neurons: torch.Tensor
    n_iter: torch.Tensor

    def _title(self) -> str:
        out, k, kh, kw = self.spatial.shape
        return f"{out} neuron(s), {k} factor(s) of {kh}x{kw} kernels over {self.loadings.shape[-1]} inputs"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # IPython's text/plain: one line, not every tensor
        p.text(f"{type(self).__name__}({self._title()})")

    def _repr_html_(self) -> str:
        from . import _display as D

        out, k, kh, kw = self.spatial.shape
        budget, shown = D.HtmlBudget(), min(out, 32)
        rows = []
        for j in range(shown):
            sp = self.spatial[j, :3]
            pic = D.rgb_html(factors_rgb(sp), alt=f"neuron {int(self.neurons[j])}") if bool(torch.isfinite(sp).all()) \
                else D.nan_flag(*D.count_nonfinite(sp), what="spatial maps")
            rows.append([pic, int(self.neurons[j]), float(self.explained[j])]
                        + [_top_channels_html(self.loadings[j, f]) for f in range(min(k, 3))])
        cols = ["NMF (R, G, B)", "neuron", "explained"] + ["factor " + "RGB"[f] + ": top inputs" for f in range(min(k, 3))]
        budget.add(D.table_html(cols, rows, raw=[0] + list(range(3, 3 + min(k, 3)))))
        budget.skip(out - shown)
        flag = D.nan_flag(*D.count_nonfinite(self.loadings), what="loadings")
        return D.container("NeuronFactors", self._title(), budget, flag=flag)

    def reconstruct(self) -> torch.Tensor:
        """Signed approximation of the weights ``[out, in, kh, kw]`` = Σ_k loadings ⊗ spatial."""
        return torch.einsum("okc,okyx->ocyx", self.loadings, self.spatial)


def _top_channels_html(loading: torch.Tensor, n: int = 4) -> str:
    """The ``n`` largest ``|loading|`` channels of a ``[in]`` vector as ``"12 (+0.31), 5 (-0.2)"``."""
    from . import _display as D

    v = loading.detach().float().cpu()
    order = torch.nan_to_num(v.abs(), nan=float("inf")).argsort(descending=True, stable=True)[:n]
    return ", ".join(f"{int(c)} ({D.value_html(float(v[c]), 2)})" for c in order)


def _select(w: torch.Tensor, neurons: Optional[Sequence[int]], n: int) -> torch.Tensor:
    if neurons is None:
        return torch.arange(n)
    idx = torch.as_tensor(list(neurons) if not isinstance(neurons, torch.Tensor) else neurons, dtype=torch.long)
    if idx.ndim != 1 or idx.numel() == 0:
        raise ValueError(f"neurons must be a non-empty 1-d sequence of indices; got {neurons!r}")
    bad = idx[(idx < 0) | (idx >= n)]
    if bad.numel():
        raise ValueError(f"neuron index {int(bad[0])} out of range for {n} output channels")
    return idx


def _sort_factors(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale each ``A`` column to max 1 (scale moved into ``B``) and order factors by
    ``||A_k|| ||B_k||`` descending. ``A [N, m, k]``, ``B [N, k, n]``."""
    s = A.amax(dim=1)  # [N, k]
    safe = torch.where(s > 0, s, torch.ones_like(s))
    A = A / safe[:, None, :]
    B = B * safe[:, :, None]
    share = A.norm(dim=1) * B.norm(dim=2)
    order = share.argsort(dim=1, descending=True, stable=True)
    A = A.gather(2, order[:, None, :].expand_as(A))
    B = B.gather(1, order[:, :, None].expand_as(B))
    return A, B


def neuron_factors(
    weights: Union[ArrayLike, nn.Module],
    n_components: int = 3,
    neurons: Optional[Sequence[int]] = None,
    *,
    max_iter: int = 200,
    tol: float = 1e-4,
    seed: int = 0,
    progress: bool = False,
) -> NeuronFactors:
    """One-sided NMF of each neuron's input weights: spatial maps + signed channel loadings.

    Per neuron ``W_o [in, kh, kw]``: ``X = posneg(W_o).reshape(2*in, kh*kw).T`` ``[kh*kw, 2*in]``
    ≈ ``A @ B`` with ``A [kh*kw, k]`` (spatial maps) and ``B [k, 2*in]``; all neurons are one
    batched problem (:func:`nmf`).

    Args:
        weights: conv weights ``[out, in, kh, kw]`` (direct or expanded), one neuron's
            ``[in, kh, kw]``, or a module with a ``.weight`` (e.g. ``nn.Conv2d``).
        n_components: ``k`` (3 for an RGB picture), at most ``min(kh*kw, 2*in)``.
        neurons: output channels to factor (default all), in that order.
        max_iter, tol, seed, progress: as :func:`nmf`.

    Returns:
        :class:`NeuronFactors` (``spatial [out, k, kh, kw]``, ``loadings [out, k, in]``,
        ``explained [out]``, ``rel_error [out]``), on the weights' device.

    Example::

        >>> conv = nn.Conv2d(48, 64, 3)      # or circuits.get_layer(model, "mixed3b_3x3_pre_relu_conv")
        >>> f = neuron_factors(conv, 3, neurons=[5, 9])
        >>> f.spatial.shape, f.loadings.shape, f.explained.shape
        (torch.Size([2, 3, 3, 3]), torch.Size([2, 3, 48]), torch.Size([2]))
    """
    w = _weight_tensor(weights)
    if w.ndim == 3:
        w = w[None]
    if w.ndim != 4:
        raise ValueError(
            "neuron_factors expects conv weights [out, in, kh, kw] or one neuron's [in, kh, kw]; "
            f"got shape {tuple(w.shape)} (for dense [out, in] weights use family_factors)"
        )
    _check_finite(w, "weights")
    out, cin, kh, kw = w.shape
    idx = _select(w, neurons, out)
    w = w[idx.to(w.device)]
    X = posneg(w, 1).reshape(len(idx), 2 * cin, kh * kw).mT
    try:
        k = _check_k(n_components, kh * kw, 2 * cin)
    except ValueError as e:
        raise ValueError(f"{e} (samples = kh*kw spatial positions, features = 2*in channel signs)") from None
    try:
        r = nmf(X, k, max_iter=max_iter, tol=tol, seed=seed, progress=progress)
    except NMFNumericalError as e:
        ids = idx[e.indices].tolist()
        raise NMFNumericalError(
            f"neuron_factors: non-finite NMF result for {len(ids)} of {len(idx)} neurons (neuron {_first(ids)}); "
            f"{_nonfinite_hint(X.dtype)}", ids) from None
    A, B = _sort_factors(r.W, r.H)
    spatial = A.mT.reshape(len(idx), k, kh, kw)
    loadings = B[..., :cin] - B[..., cin:]
    _require_finite("neuron_factors", spatial=spatial, loadings=loadings)
    return NeuronFactors(spatial, loadings, r.explained_variance, r.rel_error, idx, r.n_iter)


# ----------------------------------------------------------------------------- family factors


@dataclass
class FamilyFactors:
    """NMF of a neuron family's weights with input channels as features (see :func:`family_factors`).

    ``directions [k, in]``: non-negative directions in input-channel space, unit L2 norm.
    ``loadings``: each neuron's signed loading (positive part minus negative part) on each
    direction, ``[out, k, kh, kw]`` for conv weights, ``[out, k]`` for dense ones.
    ``explained``/``rel_error``: floats for the whole family. ``neurons [out]``: the indices
    factored. ``dominant [out]``: each neuron's factor with the largest ``|loading|`` (L2 over
    space) — the order for factor-ordered small multiples. Factors are ordered by share.

    In a notebook it shows itself (``_repr_html_``): each direction's strongest input channels,
    then one row per neuron (at most 32) with its dominant factor and its loading maps as
    red/blue thumbnails inlined as PNG (one colour scale for all); non-finite values are
    flagged in red; the HTML stays under 200 KB (:mod:`circuits._display`).
    """

    directions: torch.Tensor
    loadings: torch.Tensor
    explained: float
    rel_error: float
    neurons: torch.Tensor
    dominant: torch.Tensor
    n_iter: int

    def _title(self) -> str:
        return (f"{self.directions.shape[0]} direction(s) over {self.directions.shape[1]} inputs, "
                f"{self.loadings.shape[0]} neuron(s); explained {self.explained:.3g}")

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # IPython's text/plain: one line, not every tensor
        p.text(f"{type(self).__name__}({self._title()})")

    def _repr_html_(self) -> str:
        from . import _display as D

        k = self.directions.shape[0]
        budget = D.HtmlBudget()
        budget.add(D.table_html(["factor", "top input channels (weight)"],
                                [[f, _top_channels_html(self.directions[f])] for f in range(k)], raw=[1]))
        out, shown = self.loadings.shape[0], min(self.loadings.shape[0], 32)
        limit = D.shared_limit(self.loadings)
        rows = []
        for j in range(shown):
            if self.loadings.ndim == 4:
                maps = [D.weights_html(self.loadings[j, f], limit, alt=f"factor {f}") for f in range(k)]
            else:
                maps = [D.value_html(float(self.loadings[j, f])) for f in range(k)]
            rows.append([int(self.neurons[j]), int(self.dominant[j])] + maps)
        budget.add(D.table_html(["neuron", "dominant"] + [f"loading {f}" for f in range(k)], rows,
                                raw=range(2, 2 + k)))
        budget.skip(out - shown)
        flag = D.nan_flag(*D.count_nonfinite(self.directions), what="directions") + D.nan_flag(
            *D.count_nonfinite(self.loadings), what="loadings")
        return D.container("FamilyFactors", self._title(), budget, flag=flag)

    def reconstruct(self) -> torch.Tensor:
        """Signed approximation of the family's weights, ``[out, in, kh, kw]`` or ``[out, in]``."""
        if self.loadings.ndim == 2:
            return self.loadings @ self.directions
        return torch.einsum("okyx,kc->ocyx", self.loadings, self.directions)


def family_factors(
    weights: Union[ArrayLike, nn.Module],
    n_components: int = 3,
    neurons: Optional[Sequence[int]] = None,
    *,
    max_iter: int = 200,
    tol: float = 1e-4,
    seed: int = 0,
    init: str = "nndsvda",
    progress: bool = False,
) -> FamilyFactors:
    """Non-negative directions in input-channel space shared by a family of neurons (article fig. 7).

    Signs are split along the *neuron* axis (``posneg(W, 0)``), spatial positions become extra
    samples: ``X [2*out*kh*kw, in] ≈ A @ D`` with ``D [k, in]`` the directions.

    Args:
        weights: conv ``[out, in, kh, kw]`` or dense ``[out, in]`` weights, or a module.
        n_components: ``k``.
        neurons: the family's output channels (default all).
        max_iter, tol, seed, init, progress: as :func:`nmf`.

    Example::

        >>> w = torch.randn(16, 32, 3, 3)                   # [out, in, kh, kw]
        >>> fam = family_factors(w, 2, neurons=[1, 4, 7])
        >>> fam.directions.shape, fam.loadings.shape, fam.dominant.shape
        (torch.Size([2, 32]), torch.Size([3, 2, 3, 3]), torch.Size([3]))
    """
    w = _weight_tensor(weights)
    if w.ndim not in (2, 4):
        raise ValueError(f"family_factors expects conv weights [out, in, kh, kw] or dense [out, in]; got shape {tuple(w.shape)}")
    _check_finite(w, "weights")
    dense = w.ndim == 2
    if dense:
        w = w[:, :, None, None]
    out, cin, kh, kw = w.shape
    idx = _select(w, neurons, out)
    w = w[idx.to(w.device)]
    n = len(idx)
    X = posneg(w, 0).permute(0, 2, 3, 1).reshape(2 * n * kh * kw, cin)
    try:
        k = _check_k(n_components, X.shape[0], cin)
    except ValueError as e:
        raise ValueError(f"{e} (samples = 2*neurons*kh*kw, features = input channels)") from None
    r = nmf(X, k, max_iter=max_iter, tol=tol, seed=seed, init=init, progress=progress)
    # unit-norm directions: move the scale into the loadings, then order by share
    D, A = _sort_factors(r.H.mT[None], r.W.mT[None])  # D [1, in, k] scaled to max 1
    D, A = D[0].mT, A[0].mT  # D [k, in], A [2*n*kh*kw, k]
    nrm = D.norm(dim=1)
    nrm = torch.where(nrm > 0, nrm, torch.ones_like(nrm))
    D, A = D / nrm[:, None], A * nrm[None, :]
    A = A.reshape(2, n, kh, kw, k)
    load = (A[0] - A[1]).permute(0, 3, 1, 2)  # [n, k, kh, kw]
    _require_finite("family_factors", directions=D, loadings=load)
    dominant = load.flatten(2).norm(dim=2).argmax(dim=1)
    if dense:
        load = load[:, :, 0, 0]
    return FamilyFactors(D, load, float(r.explained_variance), float(r.rel_error), idx, dominant, int(r.n_iter))


# ----------------------------------------------------------------------------- pictures & banding


def _spatial_maps(x: Union[NeuronFactors, ArrayLike]) -> torch.Tensor:
    if isinstance(x, NeuronFactors):
        return x.spatial
    return _as_tensor(x, "spatial")


def factors_rgb(spatial: Union[NeuronFactors, ArrayLike], scale: int = 1) -> np.ndarray:
    """Spatial factors as an RGB image, each map scaled to ``[0, 1]`` (divided by its max).

    ``[k, kh, kw]`` → ``[kh*scale, kw*scale, 3]``; ``[out, k, kh, kw]`` (or a
    :class:`NeuronFactors`) → ``[out, kh*scale, kw*scale, 3]``; float32 numpy. Upsampling repeats
    pixels (nearest, no blur). Factor 0 is red, 1 green, 2 blue. ``k < 3`` leaves the missing
    channels at 0; ``k > 3`` is an error (pass ``spatial[:, :3]`` to draw the first three).
    Maps must be non-negative; an all-zero map stays black.

    Example::

        >>> factors_rgb(torch.rand(3, 5, 5), scale=10).shape
        (50, 50, 3)
    """
    t = _spatial_maps(spatial)
    if t.ndim not in (3, 4):
        raise ValueError(f"spatial maps must be [k, kh, kw] or [out, k, kh, kw]; got shape {tuple(t.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Integral) or scale < 1:
        raise ValueError(f"scale must be a positive int; got {scale!r}")
    k = t.shape[-3]
    if k > 3:
        raise ValueError(f"an RGB picture shows at most 3 factors; got k={k}. Pass spatial[..., :3, :, :] to draw the first three")
    _check_finite(t, "spatial maps")
    if float(t.min()) < 0:
        raise ValueError("spatial maps must be non-negative (NMF factors); got negative values")
    a = t.detach().cpu().to(torch.float32).numpy()
    mx = a.max(axis=(-2, -1), keepdims=True)
    a = np.divide(a, mx, out=np.zeros_like(a), where=mx > 0)
    if k < 3:
        pad = [(0, 0)] * a.ndim
        pad[-3] = (0, 3 - k)
        a = np.pad(a, pad)
    a = np.moveaxis(a, -3, -1)  # [..., kh, kw, 3]
    if scale > 1:
        a = np.repeat(np.repeat(a, scale, axis=-3), scale, axis=-2)
    return np.ascontiguousarray(a)


def banding_score(spatial: Union[NeuronFactors, ArrayLike]) -> torch.Tensor:
    """Weight banding: do the spatial maps vary along y (horizontal bands) or along x?

    For a map ``M [kh, kw]`` with population variance ``V``, let ``Vy`` be the variance of its
    row means (the part of ``V`` explained by y alone) and ``Vx`` that of its column means.
    ``Vy + Vx <= V`` (two-way decomposition; the rest is interaction). The score is
    ``Σ_k (Vy_k - Vx_k) / Σ_k V_k`` over a neuron's ``k`` maps, in ``[-1, 1]``:
    ``1`` = perfect horizontal bands (constant along x), ``-1`` = vertical bands, ``≈0`` for
    isotropic or unstructured maps (``0`` when every map is constant).

    Args:
        spatial: maps ``[..., k, kh, kw]`` (e.g. ``NeuronFactors.spatial [out, k, kh, kw]``)
            or a :class:`NeuronFactors`. Signed maps are fine too.

    Returns:
        ``[...]`` scores (``[out]`` for neuron factors).

    Example::

        >>> bands = torch.arange(5.0)[:, None].expand(5, 5)     # varies along y only
        >>> banding_score(bands[None, None]).item()
        1.0
    """
    t = _spatial_maps(spatial)
    if t.ndim < 3:
        raise ValueError(f"spatial maps must be [..., k, kh, kw]; got shape {tuple(t.shape)}")
    _check_finite(t, "spatial maps")
    t = t.to(torch.float64)
    c = t - t.mean(dim=(-2, -1), keepdim=True)
    v = c.square().mean(dim=(-2, -1)).sum(-1)
    vy = c.mean(dim=-1).square().mean(dim=-1).sum(-1)
    vx = c.mean(dim=-2).square().mean(dim=-1).sum(-1)
    return _safe_div(vy - vx, v).to(torch.float32)


def weight_banding(
    weights: Union[ArrayLike, nn.Module], n_components: int = 3, neurons: Optional[Sequence[int]] = None, **kwargs: object
) -> torch.Tensor:
    """:func:`banding_score` of each neuron's NMF spatial factors: ``[out, in, kh, kw]`` → ``[out]``.

    Example::

        >>> w = torch.randn(4, 8, 5, 5) * torch.rand(1, 1, 5, 1)   # rows scaled: some banding
        >>> weight_banding(w).shape      # e.g. get_layer(model, "mixed5b_5x5_pre_relu_conv")
        torch.Size([4])
    """
    return banding_score(neuron_factors(weights, n_components, neurons, **kwargs))
