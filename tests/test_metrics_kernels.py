"""The specialised Levinson kernels (1 x 1 symmetric, 2 x 2) against a dense solve and the general kernel."""

from __future__ import annotations

import numpy as np
import torch
from fast_bss_eval.torch.linalg import block_toeplitz

from marsctl.metrics import toeplitz
from marsctl.metrics.toeplitz import solve_block_toeplitz


def correlation_lags(batch: int, S: int, n: int, seed: int) -> torch.Tensor:
    """Lags ``[batch, 2n, S, S]`` of the correlations of random coloured signals (a Gram matrix, as in BSS-Eval)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, S, 2000, dtype=torch.float64, generator=gen)
    x = torch.nn.functional.conv1d(x.reshape(-1, 1, 2000), torch.randn(1, 1, 9, dtype=torch.float64, generator=gen)).reshape(batch, S, -1)
    X = torch.fft.rfft(x, n=4096)
    acf = torch.fft.irfft(X.unsqueeze(-2) * X.conj().unsqueeze(-3), n=4096).permute(0, 3, 1, 2)
    return torch.cat([acf[:, :n], acf[:, -n:]], dim=1)


def dense_solution(lags: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    batch, n, S, K = rhs.shape
    return torch.linalg.solve(block_toeplitz(lags), rhs.reshape(batch, n * S, K)).reshape(batch, n, S, K)


def test_symmetric_scalar_kernel_equals_a_dense_solve_and_the_general_kernel():
    lags = correlation_lags(5, 1, 40, seed=1)
    rhs = torch.randn(5, 40, 1, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    fast = solve_block_toeplitz(lags, rhs, symmetric=True)
    general = solve_block_toeplitz(lags, rhs, symmetric=False)
    dense = dense_solution(lags, rhs)
    scale = dense.abs().max()
    assert (fast - dense).abs().max() / scale < 1e-10
    assert (fast - general).abs().max() / scale < 1e-10


def test_symmetric_flag_changes_the_kernel_for_one_source_only():
    """With one source ``symmetric=True`` reads R[0..n-1] only: on a matrix that is not symmetric
    it gives another (wrong) answer, which shows the flag really selects the other kernel."""
    n = 12
    lags = torch.zeros(1, 2 * n, 1, 1, dtype=torch.float64)
    lags[0, 0] = 4.0
    lags[0, 1] = 1.0  # R[1]
    lags[0, 2 * n - 1] = -0.5  # R[-1] != R[1]
    rhs = torch.randn(1, n, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    general = solve_block_toeplitz(lags, rhs)
    assert torch.allclose(general, dense_solution(lags, rhs), atol=1e-12)
    assert not torch.allclose(solve_block_toeplitz(lags, rhs, symmetric=True), general, atol=1e-3)


def test_two_by_two_kernel_equals_a_dense_solve_and_the_general_kernel():
    lags = correlation_lags(7, 2, 64, seed=3)
    rhs = torch.randn(7, 64, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    fast = solve_block_toeplitz(lags, rhs)
    dense = dense_solution(lags, rhs)
    pos, neg = toeplitz._lag_blocks(lags, 64)
    inv_r0 = torch.linalg.inv(pos[:, 0])

    def batch_last(t: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(t.movedim(0, -1).numpy())

    general = torch.from_numpy(toeplitz._block_levinson(batch_last(pos), batch_last(neg), batch_last(rhs), batch_last(inv_r0))).movedim(-1, 0)
    scale = dense.abs().max()
    assert (fast - dense).abs().max() / scale < 1e-9
    assert (fast - general).abs().max() / scale < 1e-9


def test_two_by_two_kernel_solves_a_non_symmetric_block_toeplitz_system():
    """The 2 x 2 kernel does not assume R[-k] = R[k]^T (a diagonally dominant random matrix)."""
    gen = torch.Generator().manual_seed(5)
    n = 16
    lags = 0.05 * torch.randn(3, 2 * n, 2, 2, dtype=torch.float64, generator=gen)
    lags[:, 0] += 2 * torch.eye(2, dtype=torch.float64)
    rhs = torch.randn(3, n, 2, 1, dtype=torch.float64, generator=gen)
    assert torch.allclose(solve_block_toeplitz(lags, rhs), dense_solution(lags, rhs), atol=1e-10)
