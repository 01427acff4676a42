"""A fused NMF kernel for the CPU, compiled with numba (private; used by :mod:`circuits.nmf`).

Why a kernel: on the CPU the batched torch solver spends its time streaming every matrix's
``X`` through memory twice per iteration in ``k``-wide products (memory-bound), plus op
dispatch per iteration and per initialisation step. Here each matrix is solved start to
finish by one thread while its ``X`` (e.g. ``[25, 1024]`` float32 = 100 KB) stays in that
core's cache, with no dispatch at all: the NNDSVD start, the HALS iterations, the residual and
the finiteness check; the matrices are shared out over the cores. The arithmetic is exactly
the torch solver's (and scikit-learn's ``solver="cd"``): per iteration one cyclic
coordinate-descent sweep over ``W`` then one over ``H``, with the projected-gradient stopping
rule per matrix.

Numerics: the coordinate update is written as in the torch solver (see
``circuits.nmf._RowSweep``): the new row is computed directly (not as ``old - grad / hess``,
which cancels to float32 noise when the step is small next to the value) and divides by
``max(hess, tiny)`` (``tiny`` = the dtype's smallest normal number): a factor whose entries
have decayed to 1e-20 has a denormal ``hess``, and its reciprocal would overflow. The fast-math flags are
limited to reassociation, contraction (FMA) and ignoring the sign of zero, which let LLVM
vectorise the reductions; no reciprocal approximations and no "no NaN/Inf" assumptions
(which would let the compiler drop the very checks that catch them).

Each matrix is computed by the same code whatever the batch, so results do not depend on
batching or on the number of threads.

Import fails with ``ImportError`` when numba is not installed; callers fall back to torch.
"""

from __future__ import annotations

import threading
from typing import Any, ContextManager, Optional

import numpy as np
import numba
import scipy.linalg.cython_lapack  # noqa: F401 - the LAPACK numba's eigh calls: loaded now so threadpoolctl sees it
from numba import njit, prange

__all__ = ["hals_batch", "nndsvd_batch", "one_blas_thread", "LOCK", "INIT_GIVEN", "INIT_FLAT_W"]

# numba's fallback threading layer ("workqueue") aborts the process if two Python threads
# enter parallel code at once; callers hold this lock around hals_batch.
LOCK = threading.Lock()

_BLAS: Optional[Any] = None


def one_blas_thread() -> ContextManager:
    """BLAS/LAPACK (OpenBLAS) limited to one thread for the block, for :func:`nndsvd_batch`:
    its Gram products and eigendecompositions are small (e.g. 49 x 49), and OpenBLAS threads
    cost more than they bring there, several times more on a busy machine."""
    global _BLAS
    if _BLAS is None:
        from threadpoolctl import ThreadpoolController

        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")


# How hals_batch starts each matrix.
INIT_GIVEN = 0  # Wt and H as passed (e.g. from nndsvd_batch)
INIT_FLAT_W = 1  # H as passed (fixed components), Wt = sqrt(mean(X) / k) everywhere

_FASTMATH = {"reassoc", "contract", "nsz"}
_FLAGS = dict(fastmath=_FASTMATH, cache=True, nogil=True, error_model="numpy")

# NNDSVD: singular values below this fraction of the largest carry no direction (float64
# noise of the Gram eigendecomposition); factor entries below EPS * min(1, sqrt(max X)) are
# set to zero.
_SV_CUTOFF = 1e-7
_EPS = 1e-6


@njit(**_FLAGS)
def _sweep_rows(F, G, P, num, hess):  # pragma: no cover - compiled
    """One cyclic sweep over the rows of ``F [k, L]`` (in place), minimising ``||X - A F||``.

    ``G = A^T A [k, k]`` (its diagonal is overwritten), ``P = A^T X [k, L]``; ``num [L]`` and
    ``hess [k]`` are scratch. Returns the L1 norm of the projected gradient before the updates
    (scikit-learn's violation), in float64. See ``circuits.nmf._RowSweep`` for the update.
    """
    k, L = F.shape
    zero = num[0] * 0  # typed zero: keeps float32 data in float32, so the loops vectorise
    tiny = np.finfo(F.dtype).tiny
    for t in range(k):
        hess[t] = max(G[t, t], tiny)
        G[t, t] -= hess[t]  # 0 unless G_tt < tiny
    viol = 0.0
    for t in range(k):
        for j in range(L):
            num[j] = P[t, j]
        for r in range(k):
            g = G[t, r]
            for j in range(L):
                num[j] -= g * F[r, j]
        h = hess[t]
        v = zero  # vectorised partial sums keep this accurate
        for j in range(L):
            f = F[t, j]
            gj = h * f - num[j]  # the gradient G_t F - P_t
            pg = gj if f > 0 else min(gj, zero)
            v += abs(pg)
            F[t, j] = max(num[j] / h, zero)
        viol += v
    return viol


@njit(**_FLAGS)
def _dot_rows(F, Y, out):  # pragma: no cover - compiled
    """``out = F Y^T``: ``F [k, L]``, ``Y [r, L]`` → ``out [k, r]``. Four rows of ``Y`` at a
    time share each load of ``F`` (the loop is bound by loads, not by multiplications)."""
    k, L = F.shape
    r = Y.shape[0]
    zero = F[0, 0] * 0
    i = 0
    while i + 4 <= r:
        for t in range(k):
            s0 = zero
            s1 = zero
            s2 = zero
            s3 = zero
            for j in range(L):
                f = F[t, j]
                s0 += f * Y[i, j]
                s1 += f * Y[i + 1, j]
                s2 += f * Y[i + 2, j]
                s3 += f * Y[i + 3, j]
            out[t, i] = s0
            out[t, i + 1] = s1
            out[t, i + 2] = s2
            out[t, i + 3] = s3
        i += 4
    for i in range(i, r):
        for t in range(k):
            s = zero
            for j in range(L):
                s += F[t, j] * Y[i, j]
            out[t, i] = s


@njit(**_FLAGS)
def _combine_rows(Ft, X, P):  # pragma: no cover - compiled
    """``P = Ft X``: ``Ft [k, m]``, ``X [m, n]`` → ``P [k, n]``, as axpys over the rows of
    ``X``, four at a time (one load and store of ``P`` per four multiply-adds)."""
    k, m = Ft.shape
    n = X.shape[1]
    for t in range(k):
        for j in range(n):
            P[t, j] = 0
    i = 0
    while i + 4 <= m:
        for t in range(k):
            w0 = Ft[t, i]
            w1 = Ft[t, i + 1]
            w2 = Ft[t, i + 2]
            w3 = Ft[t, i + 3]
            if w0 != 0 or w1 != 0 or w2 != 0 or w3 != 0:
                for j in range(n):
                    P[t, j] += w0 * X[i, j] + w1 * X[i + 1, j] + w2 * X[i + 2, j] + w3 * X[i + 3, j]
        i += 4
    for i in range(i, m):
        for t in range(k):
            w = Ft[t, i]
            if w != 0:
                for j in range(n):
                    P[t, j] += w * X[i, j]


@njit(**_FLAGS)
def _mean(X):  # pragma: no cover - compiled
    m, n = X.shape
    total = 0.0
    for i in range(m):
        for j in range(n):
            total += X[i, j]
    return total / (m * n)


@njit(**_FLAGS)
def _split_norms(x):  # pragma: no cover - compiled
    """L2 norms of the positive and of the negative part of ``x``."""
    p = 0.0
    q = 0.0
    for v in x:
        if v > 0:
            p += v * v
        else:
            q += v * v
    return np.sqrt(p), np.sqrt(q)


@njit(**_FLAGS)
def _nndsvd(X, Wt, H, fill):  # pragma: no cover - compiled
    """NNDSVD start of ``X [m, n]`` into ``Wt [k, m]``, ``H [k, n]`` (as ``circuits.nmf._nndsvd``).

    The top-``k`` singular triplets come from an eigendecomposition of the float64 Gram matrix
    of the smaller side. ``fill`` ('a' variant): zeros become the mean of ``X``.
    """
    m, n = X.shape
    k = H.shape[0]
    Xd = X.astype(np.float64)
    U = np.empty((m, k))
    V = np.empty((n, k))
    S = np.empty(k)
    if m <= n:
        evals, evecs = np.linalg.eigh(Xd @ Xd.T)  # ascending
        for j in range(k):
            S[j] = np.sqrt(max(evals[m - 1 - j], 0.0))
            U[:, j] = evecs[:, m - 1 - j]
        V[:] = (U.T @ Xd).T  # columns scaled by S (divided out below)
    else:
        evals, evecs = np.linalg.eigh(Xd.T @ Xd)
        for j in range(k):
            S[j] = np.sqrt(max(evals[n - 1 - j], 0.0))
            V[:, j] = evecs[:, n - 1 - j]
        U[:] = Xd @ V
    cutoff = S[0] * _SV_CUTOFF
    for j in range(k):
        if S[j] > cutoff:
            if m <= n:
                V[:, j] *= 1.0 / S[j]
            else:
                U[:, j] *= 1.0 / S[j]
        else:  # no direction at float64 noise level
            S[j] = 0.0
            U[:, j] = 0.0
            V[:, j] = 0.0
    Wd = np.empty((k, m))
    Hd = np.empty((k, n))
    s0 = np.sqrt(S[0])
    Wd[0] = s0 * np.abs(U[:, 0])
    Hd[0] = s0 * np.abs(V[:, 0])
    for j in range(1, k):
        x = U[:, j]
        y = V[:, j]
        xpn, xnn = _split_norms(x)
        ypn, ynn = _split_norms(y)
        mp = xpn * ypn
        mn = xnn * ynn
        if mp > mn:
            lbd = np.sqrt(S[j] * mp)
            for i in range(m):
                Wd[j, i] = lbd * (x[i] / xpn) if x[i] > 0 else 0.0
            for i in range(n):
                Hd[j, i] = lbd * (y[i] / ypn) if y[i] > 0 else 0.0
        else:
            lbd = np.sqrt(S[j] * mn)
            for i in range(m):
                Wd[j, i] = lbd * (-x[i] / xnn) if x[i] < 0 else 0.0
            for i in range(n):
                Hd[j, i] = lbd * (-y[i] / ynn) if y[i] < 0 else 0.0
    # cast to X's dtype first, then threshold there (as the torch code does)
    Wt[:] = Wd
    H[:] = Hd
    typed = np.empty(2, X.dtype)
    typed[0] = _EPS * min(1.0, np.sqrt(np.float64(X.max())))  # see circuits.nmf._nndsvd
    typed[1] = _mean(X) if fill else 0.0
    eps, avg = typed[0], typed[1]
    for j in range(k):
        for i in range(m):
            if Wt[j, i] < eps:
                Wt[j, i] = avg
        for i in range(n):
            if H[j, i] < eps:
                H[j, i] = avg


@njit(**_FLAGS)
def _solve_one(X, Wt, H, update_H, max_iter, tol, noise_scale, A, G, P, grad, hess):  # pragma: no cover - compiled
    """HALS on one matrix ``X [m, n]`` from ``Wt [k, m]`` (W transposed), ``H [k, n]``, in place.

    ``A [k, m]``, ``G [k, k]``, ``P [k, n]``, ``grad [max(m, n)]``, ``hess [k]`` are scratch.
    ``noise_scale``: a violation ``<= noise_scale * (|W^T X|_1 + |X H^T|_1)`` (at the start)
    counts as converged; negative disables the floor. Returns ``(n_iter, converged)``.
    """
    m, n = X.shape
    k = H.shape[0]
    vinit = 0.0
    noise = -1.0
    for it in range(1, max_iter + 1):
        # W step: A = H X^T [k, m], G = H H^T
        _dot_rows(H, X, A)
        if it == 1 and noise_scale >= 0:
            # everything is non-negative, so |W^T X|_1 = sum_i (sum_t W_ti) (sum_j X_ij) and
            # |X H^T|_1 = sum(A): no extra product
            total = 0.0
            for i in range(m):
                rowsum = X[i, 0] * 0
                for j in range(n):
                    rowsum += X[i, j]
                wsum = 0.0
                for t in range(k):
                    wsum += Wt[t, i]
                    total += A[t, i]
                total += wsum * rowsum
            noise = noise_scale * total
        _dot_rows(H, H, G)
        viol = _sweep_rows(Wt, G, A, grad[:m], hess)
        if update_H:
            # H step: P = W^T X [k, n], G = W^T W
            _combine_rows(Wt, X, P)
            _dot_rows(Wt, Wt, G)
            viol += _sweep_rows(H, G, P, grad[:n], hess)
        if it == 1:
            vinit = viol
        if vinit == 0 or viol <= tol * vinit or viol <= noise:
            return it, True
    return max_iter, False


@njit(**_FLAGS)
def _residual_norm(X, Wt, H, r):  # pragma: no cover - compiled
    """``(||X - Wt^T H||_F, ||X||_F)`` in float64; ``r [n]`` is scratch."""
    m, n = X.shape
    k = H.shape[0]
    total = 0.0
    data = 0.0
    for i in range(m):
        for j in range(n):
            r[j] = X[i, j]
        for t in range(k):
            w = Wt[t, i]
            for j in range(n):
                r[j] -= w * H[t, j]
        s = 0.0
        x = 0.0
        for j in range(n):
            s += np.float64(r[j]) ** 2
            x += np.float64(X[i, j]) ** 2
        total += s
        data += x
    return np.sqrt(total), np.sqrt(data)


@njit(parallel=True, **_FLAGS)
def hals_batch(X, Wt, H, init, update_H, max_iter, tol, noise_scale, n_iter, converged, error, norm):  # pragma: no cover - compiled
    """NMF of every matrix of ``X [B, m, n]`` into ``Wt [B, k, m]``, ``H [B, k, n]`` (in place).

    ``init``: ``INIT_GIVEN`` (start from ``Wt``, ``H`` as passed) or ``INIT_FLAT_W`` (``H`` as
    passed, ``W`` flat). ``update_H=False`` keeps ``H`` fixed.
    ``noise_scale``: the violation floor's factor (see :func:`_solve_one`). Fills ``n_iter [B]``
    (int64), ``converged [B]`` (bool), ``error [B]`` (``||X - W H||_F``) and ``norm [B]``
    (``||X||_F``), both float64 and computed while ``X`` is still in cache. ``X``, ``Wt``, ``H``
    must be C-contiguous and share one float dtype.
    """
    B, m, n = X.shape
    k = H.shape[1]
    for b in prange(B):
        A = np.empty((k, m), X.dtype)
        G = np.empty((k, k), X.dtype)
        P = np.empty((k, n), X.dtype)
        grad = np.empty(max(m, n), X.dtype)
        hess = np.empty(k, X.dtype)
        if init == INIT_FLAT_W:
            Wt[b, :, :] = np.sqrt(_mean(X[b]) / k)
        it, ok = _solve_one(X[b], Wt[b], H[b], update_H, max_iter, tol, noise_scale, A, G, P, grad, hess)
        n_iter[b] = it
        converged[b] = ok
        error[b], norm[b] = _residual_norm(X[b], Wt[b], H[b], grad)


@njit(**_FLAGS)
def nndsvd_batch(X, Wt, H, fill):  # pragma: no cover - compiled
    """NNDSVD start of every matrix of ``X [B, m, n]`` into ``Wt [B, k, m]``, ``H [B, k, n]``.

    Serial on purpose: the eigendecompositions call LAPACK (OpenBLAS), which must not be
    entered from inside numba's parallel region (OpenBLAS warns that it may hang there).
    """
    for b in range(X.shape[0]):
        _nndsvd(X[b], Wt[b], H[b], fill)
