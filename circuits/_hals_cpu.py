"""A fused HALS kernel for the CPU, compiled with numba (private; used by :mod:`circuits.nmf`).

Why a kernel: on the CPU the batched torch solver spends its time streaming every matrix's
``X`` through memory twice per iteration in ``k``-wide products (memory-bound), plus op
dispatch per iteration. Here each matrix is solved start to finish by one thread while its
``X`` (e.g. ``[25, 1024]`` float32 = 100 KB) stays in that core's cache, with no dispatch at
all; the matrices are shared out over the cores. The arithmetic is exactly the torch solver's
(and scikit-learn's ``solver="cd"``): per iteration one cyclic coordinate-descent sweep over
``W`` then one over ``H``, with the projected-gradient stopping rule per matrix.

Each matrix is computed by the same code whatever the batch, so results do not depend on
batching or on the number of threads.

Import fails with ``ImportError`` when numba is not installed; callers fall back to torch.
"""

from __future__ import annotations

import threading

import numpy as np
import numba
from numba import njit, prange

__all__ = ["hals_batch", "LOCK"]

# numba's fallback threading layer ("workqueue") aborts the process if two Python threads
# enter parallel code at once; callers hold this lock around hals_batch.
LOCK = threading.Lock()

# fastmath lets LLVM vectorise the reductions (reassociation); the data are checked finite.
_FLAGS = dict(fastmath=True, cache=True, nogil=True, error_model="numpy")


@njit(**_FLAGS)
def _sweep_rows(F, G, P, grad):  # pragma: no cover - compiled
    """One cyclic sweep over the rows of ``F [k, L]`` (in place), minimising ``||X - A F||``.

    ``G = A^T A [k, k]``, ``P = A^T X [k, L]``; ``grad [L]`` is scratch. Returns the L1 norm
    of the projected gradient before the updates (scikit-learn's violation), in float64.
    """
    k, L = F.shape
    viol = 0.0
    for t in range(k):
        for j in range(L):
            grad[j] = -P[t, j]
        for r in range(k):
            g = G[t, r]
            for j in range(L):
                grad[j] += g * F[r, j]
        hess = G[t, t]
        move = hess != 0  # else the t-th factor of A is zero: grad is 0 too, nothing moves
        zero = grad[0] * 0  # typed zero: keeps float32 data in float32, so the loops vectorise
        v = zero  # vectorised partial sums keep this accurate
        for j in range(L):
            f = F[t, j]
            gj = grad[j]
            pg = gj if f > 0 else min(gj, zero)
            v += abs(pg)
            if move:
                F[t, j] = max(f - gj / hess, zero)
        viol += v
    return viol


@njit(**_FLAGS)
def _dot_rows(F, Y, out):  # pragma: no cover - compiled
    """``out = F Y^T``: ``F [k, L]``, ``Y [r, L]`` → ``out [k, r]``, looping over ``Y``'s rows
    outermost so each row is read from memory once and dotted with the ``k`` rows of ``F``."""
    k, L = F.shape
    for i in range(Y.shape[0]):
        for t in range(k):
            s = F[t, 0] * 0
            for j in range(L):
                s += F[t, j] * Y[i, j]
            out[t, i] = s


@njit(**_FLAGS)
def _solve_one(X, Wt, H, update_H, max_iter, tol, noise_scale, A, G, P, grad):  # pragma: no cover - compiled
    """HALS on one matrix ``X [m, n]`` from ``Wt [k, m]`` (W transposed), ``H [k, n]``, in place.

    ``A [k, m]``, ``G [k, k]``, ``P [k, n]``, ``grad [max(m, n)]`` are scratch.
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
        viol = _sweep_rows(Wt, G, A, grad[:m])
        if update_H:
            # H step: P = W^T X [k, n] (axpys over the rows of X), G = W^T W
            for t in range(k):
                for j in range(n):
                    P[t, j] = 0
            for i in range(m):
                for t in range(k):
                    w = Wt[t, i]
                    if w != 0:
                        for j in range(n):
                            P[t, j] += w * X[i, j]
            _dot_rows(Wt, Wt, G)
            viol += _sweep_rows(H, G, P, grad[:n])
        if it == 1:
            vinit = viol
        if vinit == 0 or viol <= tol * vinit or viol <= noise:
            return it, True
    return max_iter, False


@njit(**_FLAGS)
def _residual_norm(X, Wt, H, r):  # pragma: no cover - compiled
    """``||X - Wt^T H||_F`` in float64; ``r [n]`` is scratch."""
    m, n = X.shape
    k = H.shape[0]
    total = 0.0
    for i in range(m):
        for j in range(n):
            r[j] = X[i, j]
        for t in range(k):
            w = Wt[t, i]
            for j in range(n):
                r[j] -= w * H[t, j]
        s = r[0] * 0
        for j in range(n):
            s += r[j] * r[j]
        total += s
    return np.sqrt(total)


@njit(parallel=True, **_FLAGS)
def hals_batch(X, Wt, H, update_H, max_iter, tol, noise_scale, n_iter, converged, error):  # pragma: no cover - compiled
    """HALS on every matrix of ``X [B, m, n]`` (in place on ``Wt [B, k, m]``, ``H [B, k, n]``).

    ``noise_scale``: the violation floor's factor (see :func:`_solve_one`); fills
    ``n_iter [B]`` (int64), ``converged [B]`` (bool) and ``error [B]`` (float64,
    ``||X - W H||_F``, computed while ``X`` is still in cache). ``X``, ``Wt``, ``H`` must be
    C-contiguous and share one float dtype.
    """
    B, m, n = X.shape
    k = H.shape[1]
    for b in prange(B):
        A = np.empty((k, m), X.dtype)
        G = np.empty((k, k), X.dtype)
        P = np.empty((k, n), X.dtype)
        grad = np.empty(max(m, n), X.dtype)
        it, ok = _solve_one(X[b], Wt[b], H[b], update_H, max_iter, tol, noise_scale, A, G, P, grad)
        n_iter[b] = it
        converged[b] = ok
        error[b] = _residual_norm(X[b], Wt[b], H[b], grad)
