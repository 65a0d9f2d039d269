"""Structured solver for the block-Toeplitz systems of BSS-Eval's projections.

BSS-Eval projects an estimate onto the span of the shifted references by solving
``M x = y`` where ``M`` is the (positive definite) correlation matrix of the shifted
references: block Toeplitz, block ``(i, j)`` being the ``S x S`` lag-``(j - i)``
correlation ``R[j - i]``. A dense solve of the ``512 S`` unknowns costs ``O((512 S)^3)``;
the block Levinson recursion (Whittle 1963; Wiggins and Robinson 1965) solves it in
``O(512^2 S^3)`` using only the lags, which is what makes scoring hundreds of mixtures
cheap. The recursion is weakly stable for positive definite matrices; callers check the
residual with :func:`block_toeplitz_matvec` and fall back to a dense solve where it is
not small (e.g. a nearly singular reference set).
"""

from __future__ import annotations

import numba
import numpy as np
import torch


def _lag_blocks(lags: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``lags`` ``[..., 2n, S, S]`` (lags 0..n-1 then -n..-1, fast_bss_eval's layout)
    into ``pos[k] = R[k]`` and ``neg[k] = R[-k]`` for ``k = 0..n-1``."""
    pos = lags[..., :n, :, :]
    neg = torch.cat([lags[..., :1, :, :], lags[..., n + 1 :, :, :].flip(-3)], dim=-3)
    return pos, neg


@numba.njit(cache=True, nogil=True)
def _inverse_identity_minus_product(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover
    """``out[..., i] = (I - a[..., i] @ b[..., i])^-1`` for small ``[S, S, B]`` blocks (Gauss-Jordan, partial pivoting)."""
    S, _, n_batch = a.shape
    work = np.empty((S, S))
    inv = np.empty((S, S))
    for item in range(n_batch):
        for i in range(S):
            for j in range(S):
                acc = 0.0
                for k in range(S):
                    acc += a[i, k, item] * b[k, j, item]
                work[i, j] = (1.0 if i == j else 0.0) - acc
                inv[i, j] = 1.0 if i == j else 0.0
        for col in range(S):
            pivot = col
            for row in range(col + 1, S):
                if abs(work[row, col]) > abs(work[pivot, col]):
                    pivot = row
            if pivot != col:
                for j in range(S):
                    work[col, j], work[pivot, j] = work[pivot, j], work[col, j]
                    inv[col, j], inv[pivot, j] = inv[pivot, j], inv[col, j]
            scale = 1.0 / work[col, col]
            for j in range(S):
                work[col, j] *= scale
                inv[col, j] *= scale
            for row in range(S):
                if row != col:
                    factor = work[row, col]
                    for j in range(S):
                        work[row, j] -= factor * work[col, j]
                        inv[row, j] -= factor * inv[col, j]
        for i in range(S):
            for j in range(S):
                out[i, j, item] = inv[i, j]


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _block_levinson(pos: np.ndarray, neg: np.ndarray, rhs: np.ndarray, inv_r0: np.ndarray) -> np.ndarray:  # pragma: no cover
    """Block Levinson recursion, batch-innermost: ``pos/neg`` ``[n, S, S, B]``, ``rhs`` ``[n, S, K, B]``,
    ``inv_r0`` ``[S, S, B]``. The batch is the innermost axis so every update is a long,
    contiguous (SIMD) loop; the blocks themselves are tiny (S is the number of sources).
    Plain indexing throughout (no per-block array views in the inner loops, whose creation
    cost more than the arithmetic on a batch of a few dozen mixtures)."""
    n, S, K, B = rhs.shape
    # f, b: forward/backward solutions; E_f, E_b, E_x: their errors; gains and updated blocks
    fwd = np.zeros((n, S, S, B))
    bwd = np.zeros((n, S, S, B))
    x = np.zeros((n, S, K, B))
    err_fwd = np.empty((S, S, B))
    err_bwd = np.empty((S, S, B))
    err_x = np.empty((S, K, B))
    alpha = np.empty((S, S, B))
    delta = np.empty((S, S, B))
    fwd_gain = np.empty((S, S, B))
    bwd_gain = np.empty((S, S, B))
    new_f = np.empty((S, S, B))
    new_b = np.empty((S, S, B))
    fwd[0] = inv_r0
    bwd[0] = inv_r0
    for a in range(S):
        for k in range(K):
            for c in range(S):
                for i in range(B):
                    x[0, a, k, i] += inv_r0[a, c, i] * rhs[0, c, k, i]
    for m in range(1, n):
        # E_f = sum_j R[j-m] f_j and E_x = sum_j R[j-m] x_j over j < m; E_b = sum_j R[j+1] b_j over j < m
        err_fwd[:] = 0.0
        err_bwd[:] = 0.0
        err_x[:] = 0.0
        for j in range(m):
            for a in range(S):
                for c in range(S):
                    for d in range(S):
                        for i in range(B):
                            err_fwd[a, d, i] += neg[m - j, a, c, i] * fwd[j, c, d, i]
                            err_bwd[a, d, i] += pos[j + 1, a, c, i] * bwd[j, c, d, i]
                    for k in range(K):
                        for i in range(B):
                            err_x[a, k, i] += neg[m - j, a, c, i] * x[j, c, k, i]
        _inverse_identity_minus_product(err_bwd, err_fwd, alpha)  # a = (I - E_b E_f)^-1
        _inverse_identity_minus_product(err_fwd, err_bwd, delta)  # d = (I - E_f E_b)^-1
        fwd_gain[:] = 0.0
        bwd_gain[:] = 0.0
        for a in range(S):
            for d in range(S):
                for c in range(S):
                    for i in range(B):
                        fwd_gain[a, d, i] += err_fwd[a, c, i] * alpha[c, d, i]
                        bwd_gain[a, d, i] += err_bwd[a, c, i] * delta[c, d, i]
        # f' = [f;0] a - [0;b] E_f a ;  b' = [0;b] d - [f;0] E_b d  (in place, last block first)
        for j in range(m, -1, -1):
            new_f[:] = 0.0
            new_b[:] = 0.0
            for a in range(S):
                for d in range(S):
                    for c in range(S):
                        if j < m:
                            for i in range(B):
                                new_f[a, d, i] += fwd[j, a, c, i] * alpha[c, d, i]
                                new_b[a, d, i] -= fwd[j, a, c, i] * bwd_gain[c, d, i]
                        if j > 0:
                            for i in range(B):
                                new_f[a, d, i] -= bwd[j - 1, a, c, i] * fwd_gain[c, d, i]
                                new_b[a, d, i] += bwd[j - 1, a, c, i] * delta[c, d, i]
            fwd[j] = new_f
            bwd[j] = new_b
        for a in range(S):
            for k in range(K):
                for i in range(B):
                    err_x[a, k, i] = rhs[m, a, k, i] - err_x[a, k, i]  # y_m - E_x
        # x' = [x;0] + b' (y_m - E_x)
        for j in range(m + 1):
            for a in range(S):
                for c in range(S):
                    for k in range(K):
                        for i in range(B):
                            x[j, a, k, i] += bwd[j, a, c, i] * err_x[c, k, i]
    return x


def solve_block_toeplitz(lags: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve ``M x = rhs`` for block-Toeplitz ``M`` given by its lags.

    ``lags``: ``[..., 2n, S, S]`` with ``M[i, j] = R[j - i]``, lags ``0..n-1`` first then
    ``-n..-1`` (the layout of ``fast_bss_eval``'s ``compute_stats_2``); ``rhs``:
    ``[..., n, S, K]``. Returns ``x`` shaped like ``rhs`` (float64, on the CPU).

    Order-``m`` recursion (``T_m`` the leading ``m x m`` blocks): forward ``f`` solves
    ``T_m f = [I 0 .. 0]^T``, backward ``b`` solves ``T_m b = [0 .. 0 I]^T``. With
    ``E_f = sum_j R[j-m] f_j``, ``E_b = sum_j R[j] b_{j-1}`` and ``E_x = sum_j R[j-m] x_j``:
    ``f' = [f;0] a - [0;b] E_f a`` with ``a = (I - E_b E_f)^-1``,
    ``b' = [0;b] d - [f;0] E_b d`` with ``d = (I - E_f E_b)^-1``, and
    ``x' = [x;0] + b' (y_m - E_x)``. Compiled with numba, with the batch as the innermost
    axis so that every update is one long SIMD loop; a torch loop over the ``n`` steps
    spends its time in per-call overhead and temporaries instead.
    """
    n, S, K = rhs.shape[-3:]
    batch = rhs.shape[:-3]
    pos, neg = _lag_blocks(lags.reshape(-1, 2 * n, S, S), n)

    def batch_last(t: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(t.detach().cpu().to(torch.float64).movedim(0, -1).numpy())

    inv_r0, info = torch.linalg.inv_ex(pos[:, 0])
    inv_r0[info != 0] = float("nan")  # singular lag-0 block: let the caller's residual check see it
    solution = _block_levinson(batch_last(pos), batch_last(neg), batch_last(rhs.reshape(-1, n, S, K)), batch_last(inv_r0))
    return torch.from_numpy(solution).movedim(-1, 0).reshape(*batch, n, S, K)


def block_toeplitz_matvec(lags: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``M x`` for the block-Toeplitz ``M`` of :func:`solve_block_toeplitz`, by FFT convolution.

    ``(M x)_i = sum_k R[k] x_{i+k}``; ``x`` is ``[..., n, S, K]``.
    """
    n = x.shape[-3]
    pos, neg = _lag_blocks(lags, n)
    # g[k'] = R[(n - 1) - k'] for k' = 0..2n-2, so that (M x)_i = (g * x)[i + n - 1]
    kernel = torch.cat([pos.flip(-3), neg[..., 1:, :, :]], dim=-3)
    size = 1 << (3 * n - 2).bit_length()
    kf = torch.fft.rfft(kernel, n=size, dim=-3)
    xf = torch.fft.rfft(x, n=size, dim=-3)
    conv = torch.fft.irfft(kf @ xf, n=size, dim=-3)
    return conv[..., n - 1 : 2 * n - 1, :, :]
