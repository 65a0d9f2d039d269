"""Separation metrics: BSS-Eval v3 SDR/SIR/SAR, SI-SDR(i) and STFT distance, batched.

BSS-Eval follows mir_eval's ``bss_eval_sources`` (BSS-Eval v3, 512-tap distortion
filters, one window over the whole signal as museval ``window=inf``) with the sources
of a mixture scored jointly. The block-Toeplitz layout and the conversion of projection
coherences into decibels come from :mod:`fast_bss_eval`; what this module adds is

- the split between the work that depends only on the references (their correlations,
  :class:`BssEvalReferences`) and the work per estimate, so that scoring several systems
  against the same references (the mixture, the oracle, each model) shares it;
- solving the projection systems with the block Levinson recursion
  (:mod:`marsctl.metrics.toeplitz`, ``O(L^2 S^3)``) instead of a dense ``O((L S)^3)``
  solve, checked by its residual with a dense LU fallback (mir_eval's own solve).

Everything is computed in float64: in float32 the metrics drift by up to 0.4 dB from
mir_eval. ``bench/metrics_speed.py`` measures the speed against mir_eval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


import torch
from fast_bss_eval.torch.linalg import block_toeplitz
from fast_bss_eval.torch.metrics import _base_metrics_bss_eval

from marsctl.audio.stft import Spectrogram
from marsctl.config import SignalConfig
from marsctl.metrics.toeplitz import block_toeplitz_matvec, solve_block_toeplitz

#: mir_eval's bss_eval_sources distortion filter length
BSS_EVAL_FILTER_LENGTH = 512
#: energy below which a signal counts as silent (then BSS-Eval and SI-SDR are undefined)
SILENCE_ENERGY = 1e-10
#: the range every reported dB score is held to. The floor is the score of a silent or failed (NaN/Inf)
#: estimate; the ceiling that of an estimate equal to its reference, whose SI-SDR is +inf and whose
#: BSS-Eval SDR is float64 rounding (140-160 dB): above +60 dB no separation is audibly better, and an
#: uncapped perfect source would outweigh a mean of real ones.
DB_FLOOR = -60.0
DB_CEILING = 60.0


@dataclass(frozen=True)
class BssEvalScores:
    """Per-source BSS-Eval scores, each ``[..., n_sources]`` in dB (float64)."""

    sdr: torch.Tensor
    sir: torch.Tensor
    sar: torch.Tensor


def _as_float64(x) -> torch.Tensor:
    return torch.as_tensor(x).to(torch.float64)


#: mixtures per FFT pass when computing correlations (small enough for the FFT buffers to stay in cache)
_FFT_CHUNK = 4

#: relative residual above which the structured solve is redone densely
_RESIDUAL_TOLERANCE = 1e-8


def _dense_solve(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve ``matrix x = rhs`` as mir_eval does: LU with partial pivoting (``numpy.linalg.solve``),
    and least squares only where the matrix is exactly singular, with the deterministic SVD-based
    ``gelsd`` driver (numpy's ``lstsq``), never the rank-revealing ``gelsy`` whose result varied
    between identical calls on tonal sources."""
    solution, info = torch.linalg.solve_ex(matrix, rhs)
    singular = info != 0
    if bool(singular.any()):
        solution[singular] = torch.linalg.lstsq(matrix[singular], rhs[singular], driver="gelsd").solution
    return solution


def _solve_projection(lags: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve the block-Toeplitz projection system by block Levinson, checked by its residual.

    Batch entries whose relative residual exceeds ``_RESIDUAL_TOLERANCE`` (ill-conditioned
    reference sets: tonal sources, two identical references) are solved again densely, the
    way mir_eval solves every system (:func:`_dense_solve`), so the result is deterministic
    and equal to mir_eval's.
    """
    solution = solve_block_toeplitz(lags, rhs, symmetric=True)  # a Gram matrix: R[-k] = R[k]^T
    residual = block_toeplitz_matvec(lags, solution) - rhs
    scale = rhs.flatten(-3).norm(dim=-1).clamp_min(torch.finfo(rhs.dtype).tiny)
    relative = residual.flatten(-3).norm(dim=-1) / scale
    bad = ~(relative <= _RESIDUAL_TOLERANCE)  # NaN counts as bad
    if bool(bad.any()):
        n, S, K = rhs.shape[-3:]
        dense = _dense_solve(block_toeplitz(lags[bad]), rhs[bad].reshape(-1, n * S, K))
        solution[bad] = dense.reshape(-1, n, S, K)
    return solution


class BssEvalReferences:
    """The reference-only half of BSS-Eval, computed once and reused for every estimate.

    ``references`` is ``[..., n_sources, n_samples]``. :meth:`score` takes estimates of
    the same shape (the j-th estimate is scored against the j-th reference; the other
    references are the interference) and returns :class:`BssEvalScores`;
    :meth:`score_many` scores several systems' estimates in one pass.
    """

    def __init__(self, references: torch.Tensor, filter_length: int = BSS_EVAL_FILTER_LENGTH):
        refs = _as_float64(references)
        if refs.ndim < 2:
            raise ValueError(f"references must be [..., n_sources, n_samples], got shape {tuple(refs.shape)}")
        self.shape = refs.shape
        self.filter_length = L = filter_length
        # Correlations are needed up to lag L only, so T + L points avoid circular wrap-around.
        self.n_fft = 1 << (refs.shape[-1] + L - 1).bit_length()
        # Spectra and correlations are computed a few mixtures at a time (_FFT_CHUNK), so that
        # the full-length FFT buffers stay in cache instead of streaming through memory.
        flat = refs.reshape(-1, *refs.shape[-2:])
        self._spectra: list[torch.Tensor] = []
        lags = []
        for start in range(0, flat.shape[0], _FFT_CHUNK):
            spectra = torch.fft.rfft(flat[start : start + _FFT_CHUNK], n=self.n_fft, dim=-1)
            self._spectra.append(spectra)
            full = torch.fft.irfft(spectra.unsqueeze(-2) * spectra.conj().unsqueeze(-3), n=self.n_fft, dim=-1)
            lags.append(torch.cat([full[..., :L], full[..., -L:]], dim=-1))
        # BSS-Eval works on unit-norm signals; the norms scale the correlations instead of the
        # signals, which saves a pass over the audio.
        self._norms = refs.norm(dim=-1).clamp_min(1e-12)  # [..., S]
        # Auto- and cross-correlations of the references, lags 0..L-1 then -L..-1: [..., S, S, 2L]
        acf = torch.cat(lags).reshape(*refs.shape[:-1], refs.shape[-2], 2 * L)
        acf = acf / (self._norms.unsqueeze(-1) * self._norms.unsqueeze(-2)).unsqueeze(-1)
        self._lags_all = acf.permute(*range(acf.ndim - 3), -1, -3, -2).contiguous()  # [..., 2L, S, S]
        # each reference's own autocorrelation, as a batch of 1 x 1 "blocks": [..., S, 2L, 1, 1]
        self._lags_own = torch.diagonal(acf, dim1=-3, dim2=-2).movedim(-1, -2)[..., None, None].contiguous()

    def score(self, estimates: torch.Tensor) -> BssEvalScores:
        return self.score_many([estimates])[0]

    def score_many(self, estimate_sets: Sequence[torch.Tensor]) -> list[BssEvalScores]:
        """Score several systems' estimates (each shaped like the references) in one pass."""
        ests = [_as_float64(e) for e in estimate_sets]
        for est in ests:
            if est.shape != self.shape:
                raise ValueError(f"estimates shape {tuple(est.shape)} differs from references {tuple(self.shape)}")
        L, n_sets, S = self.filter_length, len(ests), self.shape[-2]
        est = torch.stack(ests, dim=-3)  # [..., E, S, T]
        est_norms = est.norm(dim=-1).clamp_min(1e-12)  # [..., E, S]
        flat = est.reshape(-1, *est.shape[-3:])  # [B, E, S, T]
        parts = []
        for chunk, ref_spectra in enumerate(self._spectra):
            spectra = torch.fft.rfft(flat[chunk * _FFT_CHUNK : (chunk + 1) * _FFT_CHUNK], n=self.n_fft, dim=-1)
            cross = ref_spectra.conj()[:, :, None, None, :] * spectra.unsqueeze(-4)
            parts.append(torch.fft.irfft(cross, n=self.n_fft, dim=-1)[..., :L])
        xcorr = torch.cat(parts).reshape(*est.shape[:-3], S, n_sets, S, L)  # [..., S_ref, E, S_est, L]
        xcorr = xcorr / (self._norms[..., :, None, None, None] * est_norms[..., None, :, :, None])
        # coherence of each estimate with its own reference's shifts (SDR)
        own = torch.diagonal(xcorr, dim1=-4, dim2=-2)  # [..., E, L, S]
        rhs_own = own.permute(*range(own.ndim - 3), -1, -2, -3)[..., None, :]  # [..., S, L, 1, E]
        sol = _solve_projection(self._lags_own, rhs_own.contiguous())
        coh_sdr = (rhs_own * sol).sum(dim=(-3, -2))  # [..., S, E]
        # coherence with the shifts of all references (SAR)
        rhs_all = xcorr.flatten(-3, -2).movedim(-1, -3)  # [..., L, S_ref, E*S_est]
        sol = _solve_projection(self._lags_all, rhs_all.contiguous())
        coh_sar = (rhs_all * sol).sum(dim=(-3, -2)).unflatten(-1, (n_sets, S))  # [..., E, S]
        coh_sdr = coh_sdr.movedim(-1, -2)  # [..., E, S]
        neg_sdr, neg_sir, neg_sar = _base_metrics_bss_eval(coh_sdr, coh_sar, clamp_db=None)
        return [
            BssEvalScores(sdr=-neg_sdr[..., e, :], sir=-neg_sir[..., e, :], sar=-neg_sar[..., e, :]) for e in range(n_sets)
        ]


def bss_eval_sources(references: torch.Tensor, estimates: torch.Tensor, filter_length: int = BSS_EVAL_FILTER_LENGTH) -> BssEvalScores:
    """BSS-Eval v3 SDR/SIR/SAR of ``estimates`` against ``references``, both ``[..., S, T]``.

    Matches ``mir_eval.separation.bss_eval_sources(ref, est, compute_permutation=False)``
    to well under 0.01 dB. With one source, SIR is +inf (there is no interference to
    measure); callers should report it as undefined.
    """
    return BssEvalReferences(references, filter_length).score(estimates)


def _scaled_target_and_noise(references: torch.Tensor, estimates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SI-SDR's decomposition (zero-mean, float64): ``alpha s`` (the estimate's projection on the
    reference) and the rest ``y - alpha s``."""
    ref = _as_float64(references)
    est = _as_float64(estimates)
    ref = ref - ref.mean(dim=-1, keepdim=True)
    est = est - est.mean(dim=-1, keepdim=True)
    scale = (est * ref).sum(-1, keepdim=True) / (ref * ref).sum(-1, keepdim=True)
    target = scale * ref
    return target, est - target


def si_sdr(references: torch.Tensor, estimates: torch.Tensor) -> torch.Tensor:
    """Scale-invariant SDR in dB along the last axis (Le Roux et al. 2019), zero-mean, float64."""
    target, noise = _scaled_target_and_noise(references, estimates)
    return 10 * torch.log10((target * target).sum(-1) / (noise * noise).sum(-1))


def bounded_db(values: torch.Tensor, floor_mask: torch.Tensor | None = None) -> torch.Tensor:
    """dB scores held to ``[DB_FLOOR, DB_CEILING]`` (+inf is the ceiling, -inf the floor; NaN, undefined,
    stays NaN); ``floor_mask`` marks scores set to the floor (silent or failed estimates)."""
    values = torch.nan_to_num(values, nan=math.nan, posinf=DB_CEILING, neginf=DB_FLOOR).clamp(DB_FLOOR, DB_CEILING)
    return values if floor_mask is None else torch.where(floor_mask, torch.full_like(values, DB_FLOOR), values)


def failed_or_silent(estimates: torch.Tensor) -> torch.Tensor:
    """True where an estimate (last axis) has NaN/Inf samples or no energy: it scores the floor."""
    est = _as_float64(estimates)
    return ~torch.isfinite(est).all(-1) | silent(torch.nan_to_num(est, nan=0.0, posinf=0.0, neginf=0.0))


def bounded_si_sdr_improvement(references: torch.Tensor, estimates: torch.Tensor, mixtures: torch.Tensor) -> torch.Tensor:
    """:func:`si_sdr_improvement` with the scoring rules of ``marsctl eval``: a silent or failed estimate's
    SI-SDR is the floor and a perfect one's the ceiling (:func:`bounded_db`), so neither is left out of a
    mean; NaN only where the reference is silent."""
    ref = _as_float64(references)
    est = _as_float64(estimates)
    mix = _as_float64(mixtures)
    if mix.ndim == ref.ndim - 1:
        mix = mix.unsqueeze(-2)
    score = bounded_db(si_sdr(ref, torch.nan_to_num(est, nan=0.0, posinf=0.0, neginf=0.0)), failed_or_silent(est))
    improvement = score - bounded_db(si_sdr(ref, mix.expand_as(ref)))
    return improvement.masked_fill(silent(ref), math.nan)


def segment_index(length: int, segments: int, device=None) -> torch.Tensor:
    """Which of ``segments`` equal consecutive segments each of ``length`` positions (samples or
    STFT frames) falls in: ``floor(i * segments / length)``."""
    return torch.arange(length, device=device) * segments // length


def segment_sums(values: torch.Tensor, segments: int) -> torch.Tensor:
    """Sums of ``values`` ``[..., L]`` over ``segments`` consecutive segments of the last axis -> ``[..., segments]``."""
    index = segment_index(values.shape[-1], segments, values.device)
    return values.new_zeros(*values.shape[:-1], segments).index_add_(-1, index, values)


def segmental_si_sdr(references: torch.Tensor, estimates: torch.Tensor, segments: int) -> torch.Tensor:
    """SI-SDR with the error split over ``segments`` consecutive time segments -> ``[..., segments]`` dB.

    The scaled target ``alpha s`` is the whole signal's (as in :func:`si_sdr`); segment k scores
    ``10 log10((||alpha s||^2 / K) / ||alpha s - y||^2_k)``: its share of the target energy against
    its own error, so silent-target segments are defined too. ``segments = 1`` is :func:`si_sdr`.
    """
    target, noise = _scaled_target_and_noise(references, estimates)
    return 10 * torch.log10((target * target).sum(-1, keepdim=True) / segments / segment_sums(noise * noise, segments))


def si_sdr_improvement(references: torch.Tensor, estimates: torch.Tensor, mixtures: torch.Tensor) -> torch.Tensor:
    """SI-SDRi: SI-SDR of the estimate minus SI-SDR of the unprocessed mixture, per source.

    ``mixtures`` is ``[..., T]`` (one per mixture) or broadcastable to ``references``.
    """
    ref = _as_float64(references)
    mix = _as_float64(mixtures)
    if mix.ndim == ref.ndim - 1:
        mix = mix.unsqueeze(-2)
    return si_sdr(ref, estimates) - si_sdr(ref, mix.expand_as(ref))


def stft_distance(references: torch.Tensor, estimates: torch.Tensor, config: SignalConfig = SignalConfig()) -> torch.Tensor:
    """Mean absolute difference between magnitude spectrograms (design STFT), along the last axis."""
    spec = Spectrogram(config).to(torch.float64)
    ref_mag = spec.stft(_as_float64(references)).abs()
    est_mag = spec.stft(_as_float64(estimates)).abs()
    return (ref_mag - est_mag).abs().mean(dim=(-2, -1))


def silent(signals: torch.Tensor) -> torch.Tensor:
    """True where a signal (last axis) has (numerically) no energy."""
    x = _as_float64(signals)
    return (x * x).sum(-1) <= SILENCE_ENERGY
