"""Separation metrics against mir_eval (the reference implementation) on varied signals."""

from __future__ import annotations

import warnings

import mir_eval
import numpy as np
import pytest
import torch

from marsctl.metrics import BssEvalReferences, bss_eval_sources, si_sdr, si_sdr_improvement, stft_distance
from marsctl.eval.report import summarize
from marsctl.metrics.toeplitz import block_toeplitz_matvec, solve_block_toeplitz

SR = 16_000
TOLERANCE_DB = 0.01


def mir_eval_sources(ref: np.ndarray, est: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdr, sir, sar, _ = mir_eval.separation.bss_eval_sources(ref, est, compute_permutation=False)
    return np.stack([sdr, sir, sar])


def varied_examples(rng: np.random.Generator):
    """References of different character: noise, coloured noise, harmonic tones, chirps,
    sparse clicks, plus 3-source mixtures and different lengths; estimates with leakage,
    filtering, delays, noise and a near-perfect one."""
    T = SR  # one second keeps mir_eval fast
    t = np.arange(T) / SR
    noise = rng.standard_normal(T)
    coloured = np.convolve(rng.standard_normal(T), np.hanning(32), "same")
    harmonic = sum(np.sin(2 * np.pi * 220 * k * t) / k for k in range(1, 8)) * (1 + 0.3 * np.sin(2 * np.pi * 2 * t))
    chirp = np.sin(2 * np.pi * (200 + 1500 * t) * t)
    clicks = np.zeros(T)
    clicks[rng.integers(0, T, 40)] = rng.standard_normal(40) * 3
    clicks = np.convolve(clicks, np.exp(-np.arange(200) / 30), "same")
    examples = []
    for a, b in [(noise, harmonic), (coloured, chirp), (harmonic, clicks), (chirp, noise)]:
        ref = np.stack([a, b])
        leak = ref + 0.3 * ref[::-1] + 0.01 * rng.standard_normal(ref.shape)
        filtered = np.stack([np.convolve(r, [0.6, 0.3, 0.1], "same") for r in ref]) + 0.05 * rng.standard_normal(ref.shape)
        delayed = np.roll(ref, 7, axis=-1) + 0.2 * rng.standard_normal(ref.shape)
        near_perfect = ref + 1e-3 * rng.standard_normal(ref.shape)
        for est in (leak, filtered, delayed, near_perfect):
            examples.append((ref, est))
    three = np.stack([noise, harmonic, chirp])
    examples.append((three, three + 0.4 * three[[1, 2, 0]] + 0.1 * rng.standard_normal(three.shape)))
    short = np.stack([coloured[:7000], clicks[:7000]])
    examples.append((short, short[::-1] * 0.2 + short + 0.02 * rng.standard_normal(short.shape)))
    return examples


def test_bss_eval_matches_mir_eval_within_0_01_db():
    rng = np.random.default_rng(1234)
    worst = 0.0
    for ref, est in varied_examples(rng):
        expected = mir_eval_sources(ref, est)
        got = bss_eval_sources(torch.from_numpy(ref), torch.from_numpy(est))
        got = np.stack([got.sdr.numpy(), got.sir.numpy(), got.sar.numpy()])
        worst = max(worst, float(np.abs(got - expected).max()))
        assert np.allclose(got, expected, atol=TOLERANCE_DB), (got, expected)
    assert worst < TOLERANCE_DB


def test_estimate_inside_the_reference_span_has_effectively_infinite_sar():
    """With no artifact at all, SAR is limited by float64 round-off (mir_eval reaches ~250 dB,
    the coherence formulation ~150 dB): both are far beyond any real separation."""
    rng = np.random.default_rng(2)
    ref = rng.standard_normal((2, 8000))
    est = ref + 0.3 * ref[::-1]
    got = bss_eval_sources(torch.from_numpy(ref), torch.from_numpy(est))
    expected = mir_eval_sources(ref, est)
    assert np.allclose(got.sdr.numpy(), expected[0], atol=TOLERANCE_DB)
    assert np.allclose(got.sir.numpy(), expected[1], atol=TOLERANCE_DB)
    assert (got.sar.numpy() > 100).all() and (expected[2] > 100).all()


def test_batched_equals_single_and_several_systems_share_references():
    rng = np.random.default_rng(7)
    examples = [e for e in varied_examples(rng) if e[0].shape == (2, SR)][:6]
    refs = torch.from_numpy(np.stack([r for r, _ in examples]))
    ests = torch.from_numpy(np.stack([e for _, e in examples]))
    batched = bss_eval_sources(refs, ests)
    for i in range(len(examples)):
        single = bss_eval_sources(refs[i], ests[i])
        assert torch.allclose(batched.sdr[i], single.sdr, atol=1e-8)
        assert torch.allclose(batched.sir[i], single.sir, atol=1e-8)
    shared = BssEvalReferences(refs)
    other = ests + 0.1 * torch.from_numpy(rng.standard_normal(ests.shape))
    many = shared.score_many([ests, other, refs])
    assert torch.allclose(many[0].sdr, batched.sdr, atol=1e-8)
    assert torch.allclose(many[1].sdr, bss_eval_sources(refs, other).sdr, atol=1e-8)
    assert (many[2].sdr > 100).all()  # a perfect estimate scores far above any real one


def test_float32_input_is_computed_in_float64():
    rng = np.random.default_rng(3)
    ref, est = varied_examples(rng)[0]
    expected = mir_eval_sources(ref.astype(np.float32).astype(np.float64), est.astype(np.float32).astype(np.float64))
    got = bss_eval_sources(torch.from_numpy(ref).float(), torch.from_numpy(est).float())
    assert got.sdr.dtype == torch.float64
    assert np.allclose(got.sdr.numpy(), expected[0], atol=TOLERANCE_DB)


def test_single_source_sir_is_infinite_and_sdr_matches():
    rng = np.random.default_rng(5)
    ref = rng.standard_normal((1, 8000))
    est = ref + 0.3 * rng.standard_normal((1, 8000))
    got = bss_eval_sources(torch.from_numpy(ref), torch.from_numpy(est))
    expected = mir_eval_sources(ref, est)
    assert np.allclose(got.sdr.numpy(), expected[0], atol=TOLERANCE_DB)
    assert np.isinf(got.sir.numpy()).all()


def test_identical_references_fall_back_to_a_dense_solve():
    """Two identical references make the projection system singular: the structured solver's
    residual check must catch it and the dense least-squares fallback must give mir_eval's numbers."""
    rng = np.random.default_rng(11)
    a = rng.standard_normal(6000)
    ref = np.stack([a, a])
    est = ref + 0.2 * rng.standard_normal(ref.shape)
    got = bss_eval_sources(torch.from_numpy(ref), torch.from_numpy(est))
    assert torch.isfinite(got.sdr).all()
    expected = mir_eval_sources(ref, est)
    assert np.allclose(got.sdr.numpy(), expected[0], atol=TOLERANCE_DB)


def test_block_levinson_solves_random_block_toeplitz_systems():
    from fast_bss_eval.torch.linalg import block_toeplitz

    torch.manual_seed(0)
    for S in (1, 2, 3):
        x = torch.randn(4, S, 3000, dtype=torch.float64)
        n = 30
        X = torch.fft.rfft(x, n=4096)
        acf = torch.fft.irfft(X.unsqueeze(-2) * X.conj().unsqueeze(-3), n=4096).permute(0, 3, 1, 2)
        lags = torch.cat([acf[:, :n], acf[:, -n:]], dim=1)
        rhs = torch.randn(4, n, S, 2, dtype=torch.float64)
        dense = torch.linalg.solve(block_toeplitz(lags), rhs.reshape(4, n * S, 2)).reshape(4, n, S, 2)
        assert torch.allclose(solve_block_toeplitz(lags, rhs), dense, atol=1e-10)
        assert torch.allclose(block_toeplitz_matvec(lags, dense), rhs, atol=1e-10)


def test_si_sdr_definition_and_improvement():
    rng = np.random.default_rng(0)
    ref = torch.from_numpy(rng.standard_normal((2, 4000)))
    noise = torch.from_numpy(rng.standard_normal((2, 4000)))
    est = ref + 0.1 * noise
    # scale invariance and the closed form for orthogonal-ish noise
    assert torch.allclose(si_sdr(ref, 3.0 * est), si_sdr(ref, est))
    r = ref - ref.mean(-1, keepdim=True)
    e = est - est.mean(-1, keepdim=True)
    target = (e * r).sum(-1, keepdim=True) / (r * r).sum(-1, keepdim=True) * r
    expected = 10 * torch.log10((target**2).sum(-1) / ((e - target) ** 2).sum(-1))
    assert torch.allclose(si_sdr(ref, est), expected)
    mixture = ref.sum(0)
    improvement = si_sdr_improvement(ref, est, mixture)
    assert torch.allclose(improvement, si_sdr(ref, est) - si_sdr(ref, mixture.expand_as(ref)))
    assert (improvement > 0).all()


def test_stft_distance():
    rng = np.random.default_rng(0)
    ref = torch.from_numpy(rng.standard_normal((3, 8000)))
    assert torch.allclose(stft_distance(ref, ref), torch.zeros(3, dtype=torch.float64))
    near, far = stft_distance(ref, ref * 1.01), stft_distance(ref, ref * 2)
    assert (near > 0).all() and (far > near).all()


def test_summarize_mean_and_standard_error():
    s = summarize([1.0, 2.0, 3.0, None, float("nan"), 4.0])
    assert s.count == 4 and s.mean == pytest.approx(2.5)
    assert s.standard_error == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)
    assert summarize([]).mean is None and summarize([5.0]).standard_error is None


def test_tonal_sources_score_the_same_every_time_and_equal_mir_eval():
    """Two harmonic references (220 and 330 Hz, 5 partials) are ill-conditioned enough for the
    Levinson residual check to hand them to the dense solve; it must be deterministic and
    equal to mir_eval (the gelsy least-squares fallback gave a different SIR/SAR per call)."""
    t = np.arange(2 * SR) / SR
    refs = np.stack([sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6)) for f0 in (220.0, 330.0)])
    rng = np.random.default_rng(0)
    est = refs + 0.2 * refs[::-1] + 1e-3 * rng.standard_normal(refs.shape)
    expected = mir_eval_sources(refs, est)
    runs = []
    for _ in range(3):
        got = bss_eval_sources(torch.from_numpy(refs), torch.from_numpy(est))
        runs.append(np.stack([got.sdr.numpy(), got.sir.numpy(), got.sar.numpy()]))
    for run in runs:
        np.testing.assert_array_equal(run, runs[0])
        assert np.allclose(run, expected, atol=TOLERANCE_DB), (run, expected)
