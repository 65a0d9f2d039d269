"""STFT/iSTFT with the design's settings and the log-frequency warp (Sound-of-Pixels/CLIPSep).

The separator sees the log-magnitude warped from the 513 linear STFT bins onto 256
log-spaced bins, predicts its mask on that grid, and the mask is warped back to the
linear grid before it multiplies the mixture STFT (mixture phase).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from marsctl.config import SignalConfig


class Spectrogram(nn.Module):
    """Complex STFT and its inverse: Hann window, ``n_fft``/``hop_length`` from the config."""

    def __init__(self, config: SignalConfig = SignalConfig()):
        super().__init__()
        self.config = config
        self.register_buffer("window", torch.hann_window(config.n_fft), persistent=False)

    def stft(self, waveform: torch.Tensor) -> torch.Tensor:
        """``[..., T]`` real samples -> ``[..., n_fft//2+1, frames]`` complex STFT."""
        lead = waveform.shape[:-1]
        spec = torch.stft(
            waveform.reshape(-1, waveform.shape[-1]).to(self.window.dtype),
            n_fft=self.config.n_fft,
            hop_length=self.config.hop_length,
            window=self.window,
            center=True,
            return_complex=True,
        )
        return spec.reshape(*lead, *spec.shape[-2:])

    def istft(self, spec: torch.Tensor, length: int) -> torch.Tensor:
        """``[..., F, frames]`` complex STFT -> ``[..., length]`` samples."""
        lead = spec.shape[:-2]
        wave = torch.istft(
            spec.reshape(-1, *spec.shape[-2:]),
            n_fft=self.config.n_fft,
            hop_length=self.config.hop_length,
            window=self.window,
            center=True,
            length=length,
        )
        return wave.reshape(*lead, length)

    def num_frames(self, num_samples: int) -> int:
        return num_samples // self.config.hop_length + 1


def _interpolation_matrix(positions: torch.Tensor, n_in: int) -> torch.Tensor:
    """Rows of linear-interpolation weights reading ``n_in`` inputs at fractional ``positions``."""
    positions = positions.clamp(0, n_in - 1)
    lo = positions.floor().long().clamp(max=n_in - 2)
    frac = positions - lo
    matrix = torch.zeros(len(positions), n_in, dtype=torch.float64)
    rows = torch.arange(len(positions))
    matrix[rows, lo] = 1 - frac
    matrix[rows, lo + 1] += frac
    return matrix.float()


class LogFrequencyWarp(nn.Module):
    """Resample the frequency axis between linear STFT bins and log-spaced bins.

    The mapping is the one of Sound-of-Pixels/CLIPSep's ``warpgrid``: log-bin ``i`` of
    ``n_log`` (grid coordinate ``y`` in [-1, 1]) reads the linear axis at
    ``g = (21 ** ((y + 1) / 2) - 11) / 10`` and its inverse is
    ``y = 2 * log(10 g + 11) / log(21) - 1``. Both directions use linear interpolation
    along frequency only, written as fixed matrices so they are cheap and differentiable.
    """

    def __init__(self, n_linear: int = 513, n_log: int = 256):
        super().__init__()
        self.n_linear, self.n_log = n_linear, n_log
        y = torch.linspace(-1, 1, n_log, dtype=torch.float64)
        g = (torch.pow(21.0, (y + 1) / 2) - 11) / 10
        to_log = _interpolation_matrix((g + 1) / 2 * (n_linear - 1), n_linear)
        g_lin = torch.linspace(-1, 1, n_linear, dtype=torch.float64)
        y_lin = 2 * torch.log(10 * g_lin + 11) / math.log(21) - 1
        to_linear = _interpolation_matrix((y_lin + 1) / 2 * (n_log - 1), n_log)
        self.register_buffer("to_log", to_log, persistent=False)
        self.register_buffer("to_linear", to_linear, persistent=False)

    def forward(self, linear: torch.Tensor) -> torch.Tensor:
        """``[..., n_linear, T]`` -> ``[..., n_log, T]``."""
        return self._warp_axis(self.to_log, linear, self.n_linear)

    def inverse(self, warped: torch.Tensor) -> torch.Tensor:
        """``[..., n_log, T]`` -> ``[..., n_linear, T]``."""
        return self._warp_axis(self.to_linear, warped, self.n_log)

    @staticmethod
    def _warp_axis(matrix: torch.Tensor, x: torch.Tensor, n_in: int) -> torch.Tensor:
        if x.shape[-2] != n_in:
            raise ValueError(f"expected {n_in} frequency bins on axis -2, got {x.shape[-2]}")
        return torch.matmul(matrix.to(x.dtype), x)

    @classmethod
    def from_config(cls, config: SignalConfig) -> "LogFrequencyWarp":
        return cls(config.n_linear_bins, config.n_log_bins)
