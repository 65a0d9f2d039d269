"""STFT, the log-frequency warp and chunked overlap-add."""

from __future__ import annotations

import torch

from marsctl.audio import LogFrequencyWarp, Spectrogram, overlap_add
from marsctl.config import SignalConfig


def test_stft_settings_and_perfect_reconstruction():
    cfg = SignalConfig()
    spec = Spectrogram(cfg)
    wave = torch.randn(2, 3, cfg.segment_samples)
    stft = spec.stft(wave)
    assert stft.shape == (2, 3, 513, cfg.segment_samples // 256 + 1)
    assert stft.shape[-1] == spec.num_frames(cfg.segment_samples)
    back = spec.istft(stft, cfg.segment_samples)
    assert torch.allclose(back, wave, atol=1e-5)


def test_spectrogram_moves_with_to():
    spec = Spectrogram().to(torch.float64)
    assert spec.window.dtype == torch.float64


def test_log_warp_shapes_monotone_and_inverse():
    warp = LogFrequencyWarp(513, 256)
    x = torch.rand(4, 1, 513, 10)
    warped = warp(x)
    assert warped.shape == (4, 1, 256, 10)
    # a constant spectrum stays constant in both directions (rows of weights sum to one)
    ones = torch.ones(1, 513, 3)
    assert torch.allclose(warp(ones), torch.ones(1, 256, 3))
    assert torch.allclose(warp.inverse(torch.ones(1, 256, 3)), torch.ones(1, 513, 3))
    # low frequencies get more log bins than high ones: the first linear bins spread over many
    impulse = torch.zeros(513, 1)
    impulse[2] = 1
    assert (warp(impulse) > 0).sum() > 1
    # smooth spectra survive the round trip
    freq = torch.linspace(0, 1, 513)
    smooth = (torch.exp(-3 * freq) + 0.2 * torch.cos(6 * freq)).unsqueeze(-1)
    assert (warp.inverse(warp(smooth)) - smooth).abs().max() < 0.02
    assert LogFrequencyWarp.from_config(SignalConfig()).n_log == 256


def test_log_warp_matches_clipsep_grid():
    """Bin i reads the linear axis at g = (21**((y+1)/2) - 11)/10 (Sound-of-Pixels warpgrid)."""
    warp = LogFrequencyWarp(513, 256)
    linear_axis = torch.arange(513, dtype=torch.float32).unsqueeze(-1)  # value = bin index
    positions = warp(linear_axis).squeeze(-1)
    y = torch.linspace(-1, 1, 256, dtype=torch.float64)
    expected = ((torch.pow(21.0, (y + 1) / 2) - 11) / 10 + 1) / 2 * 512
    assert torch.allclose(positions.double(), expected, atol=1e-3)


def test_warp_is_differentiable():
    warp = LogFrequencyWarp()
    x = torch.rand(1, 513, 4, requires_grad=True)
    warp.inverse(warp(x)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_overlap_add_identity_any_length():
    for length in (1, 100, 1000, 1001, 4097):
        signal = torch.randn(2, length)
        out = overlap_add(lambda chunks: chunks, signal, chunk_samples=256, overlap=0.25, batch_size=3)
        assert out.shape == signal.shape
        assert torch.allclose(out, signal, atol=1e-6)


def test_overlap_add_matches_whole_signal_processing_for_a_pointwise_map():
    signal = torch.randn(10_000)
    out = overlap_add(lambda c: 0.5 * c + c**2, signal, chunk_samples=1024, overlap=0.5)
    assert torch.allclose(out, 0.5 * signal + signal**2, atol=1e-5)


def test_overlap_add_bounds_batch_size_and_crossfades():
    seen = []

    def process(chunks):
        seen.append(chunks.shape[0])
        return torch.ones_like(chunks) * chunks.mean(dim=-1, keepdim=True)

    signal = torch.cat([torch.zeros(5000), torch.ones(5000)])
    out = overlap_add(process, signal, chunk_samples=1000, overlap=0.5, batch_size=4)
    assert max(seen) <= 4 and sum(seen) >= 19
    # the step becomes a smooth, monotone ramp
    assert torch.all(out[1:] - out[:-1] >= -1e-6)
    assert out[0] == 0 and out[-1] == 1


def test_overlap_add_rejects_bad_arguments():
    import pytest

    with pytest.raises(ValueError):
        overlap_add(lambda c: c, torch.zeros(0), 10)
    with pytest.raises(ValueError):
        overlap_add(lambda c: c, torch.zeros(10), 10, overlap=1.0)
    with pytest.raises(ValueError, match="process returned"):
        overlap_add(lambda c: c[..., :5], torch.zeros(100), 10)
