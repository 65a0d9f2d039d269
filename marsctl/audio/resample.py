"""Band-limited resampling with torchaudio."""

from __future__ import annotations

import numpy as np
import torch
import torchaudio.functional as AF

# Kaiser-windowed sinc; roll-off and width as librosa/resampy "kaiser_fast".
_RESAMPLE_KW = dict(
    lowpass_filter_width=16,
    rolloff=0.85,
    resampling_method="sinc_interp_kaiser",
    beta=8.555_622_641_276_15,
)


def resample(waveform: torch.Tensor | np.ndarray, orig_sr: int, target_sr: int) -> torch.Tensor:
    """Resample along the last axis. Returns a float32 tensor (the input itself if rates match)."""
    wave = torch.as_tensor(waveform, dtype=torch.float32)
    if orig_sr == target_sr:
        return wave
    if orig_sr <= 0 or target_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {target_sr}")
    return AF.resample(wave, orig_sr, target_sr, **_RESAMPLE_KW)
