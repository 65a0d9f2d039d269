"""The one scoring path of ``marsctl eval``: folders, datasets and :func:`score` all end here.

:func:`score_systems` scores one or more systems' estimates against the same references
(the reference-only half of BSS-Eval is shared, see
:class:`~marsctl.metrics.separation.BssEvalReferences`) and returns, per system, float64
tensors ``[..., n_sources]`` of SDR, SIR, SAR, SI-SDR, SI-SDRi (dB) and the STFT distance.

Rules, the same for every caller:

* **Floor.** A silent estimate (energy <= ``SILENCE_ENERGY``) or one with NaN/Inf samples
  (even one: a failed separation) is scored at ``DB_FLOOR`` (-60 dB) for SDR, SIR, SAR and
  SI-SDR (its SI-SDRi is ``DB_FLOOR`` minus the mixture's SI-SDR), and every dB score below the
  floor is raised to it, so a silent output never scores better than a real one and is never
  left out of a mean. Non-finite samples are zeroed before BSS-Eval and the STFT distance, so
  the other sources of the mixture are still scored jointly with it.
* **Ceiling.** Every dB score above ``DB_CEILING`` (+60 dB) is lowered to it: an estimate equal
  to its reference (SI-SDR and SIR +inf, BSS-Eval SDR 140-160 dB of float64 rounding) scores
  +60 dB and is counted, so perfect sources neither vanish from n nor outweigh the rest. The
  mixture's SI-SDR is held to the same range before SI-SDRi is taken.
* **Undefined** (NaN) means there is nothing to measure: SIR of a single source, SI-SDRi
  without the mixture, and every metric of a mixture with a silent reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from marsctl.config import SignalConfig
from marsctl.errors import MarsctlError
from marsctl.metrics.separation import DB_CEILING, DB_FLOOR, BssEvalReferences, bounded_db, si_sdr, silent, stft_distance
#: dB metrics (floored) and all metrics, in display order
DB_METRICS = ("sdr", "sir", "sar", "si_sdr", "si_sdri")
SEPARATION_METRICS = (*DB_METRICS, "stft_distance")


@dataclass
class SystemScores:
    """Scores of one system: each metric ``[..., S]`` float64 (NaN = undefined), and which
    estimates were scored at the floor (``floored``) because they were silent or failed."""

    metrics: dict[str, torch.Tensor]
    floored: torch.Tensor  # bool [..., S]
    reference_silent: torch.Tensor  # bool [..., S]: the mixture has a silent reference

    def notes(self, index: tuple[int, ...]) -> list[str]:
        """Why a source's numbers are what they are (for the report's note column)."""
        notes = []
        if bool(self.reference_silent[index]):
            notes.append("a reference of this mixture is silent: metrics undefined")
        elif bool(self.floored[index]):
            notes.append(f"estimate is silent or not finite: scored at the floor ({DB_FLOOR:g} dB)")
        elif any(bool(self.metrics[name][index] >= DB_CEILING) for name in ("sdr", "si_sdr")):
            notes.append(f"estimate matches its reference: scored at the ceiling (+{DB_CEILING:g} dB)")
        return notes


def _floored(values: torch.Tensor, floor_mask: torch.Tensor) -> torch.Tensor:
    return bounded_db(values, floor_mask)


def score_systems(
    references: torch.Tensor,
    estimate_sets: Sequence[torch.Tensor],
    mixtures: torch.Tensor | None = None,
    signal: SignalConfig | None = None,
) -> list[SystemScores]:
    """Score each of ``estimate_sets`` (each shaped like ``references``, ``[..., S, T]``).

    ``mixtures`` ``[..., T]`` gives SI-SDRi; ``signal`` sets the STFT of the STFT distance
    (default: the design STFT at 16 kHz).
    """
    refs = torch.as_tensor(references).to(torch.float64)
    if refs.ndim < 2:
        raise ValueError(f"references must be [..., n_sources, n_samples], got shape {tuple(refs.shape)}")
    n_sources = refs.shape[-2]
    ests = [torch.as_tensor(e).to(torch.float64) for e in estimate_sets]
    failed = [~torch.isfinite(e).all(-1) for e in ests]
    ests = [torch.nan_to_num(e, nan=0.0, posinf=0.0, neginf=0.0) for e in ests]
    ref_silent = silent(refs).any(-1, keepdim=True).expand(refs.shape[:-1])
    bss = BssEvalReferences(refs).score_many(ests)
    si_mixture = None
    if mixtures is not None:
        mix = torch.as_tensor(mixtures).to(torch.float64).unsqueeze(-2).expand_as(refs)
        si_mixture = bounded_db(si_sdr(refs, mix))
    out = []
    for est, fail, b in zip(ests, failed, bss):
        floor = fail | silent(est)
        metrics = {
            "sdr": _floored(b.sdr, floor),
            "sir": _floored(b.sir, floor) if n_sources > 1 else torch.full_like(b.sdr, math.nan),
            "sar": _floored(b.sar, floor),
            "si_sdr": _floored(si_sdr(refs, est), floor),
        }
        metrics["si_sdri"] = metrics["si_sdr"] - si_mixture if si_mixture is not None else torch.full_like(b.sdr, math.nan)
        metrics["stft_distance"] = stft_distance(refs, est, signal or SignalConfig())
        for name in DB_METRICS:
            metrics[name] = metrics[name].masked_fill(ref_silent, math.nan)
        out.append(SystemScores(metrics, floor & ~ref_silent, ref_silent))
    return out


def fit_length(wave: torch.Tensor, length: int, tolerance: int) -> torch.Tensor | None:
    """Trim or zero-pad ``wave`` (last axis) to ``length`` when it differs by at most
    ``tolerance`` samples (the rounding of a resampling); None when it differs by more."""
    difference = wave.shape[-1] - length
    if abs(difference) > tolerance:
        return None
    if difference > 0:
        return wave[..., :length]
    if difference < 0:
        return torch.nn.functional.pad(wave, (0, -difference))
    return wave


def resampling_tolerance(from_rate: int, to_rate: int) -> int:
    """How many samples a resampling from ``from_rate`` to ``to_rate`` may add or lose by rounding."""
    if from_rate == to_rate or from_rate <= 0:
        return 0
    return max(1, math.ceil(to_rate / from_rate))


def _load(item, sample_rate: int | None) -> tuple[torch.Tensor, int]:
    """A tensor as it is, or an audio file (mono) resampled to ``sample_rate`` when given;
    returns the signal and the rate it was stored at (``sample_rate`` for a tensor)."""
    from marsctl.audio.io import load_audio_native
    from marsctl.audio.resample import resample

    if not isinstance(item, (str, Path)):
        return torch.as_tensor(item), sample_rate or 0
    wave, rate = load_audio_native(item)
    wave = torch.from_numpy(wave)
    if sample_rate is not None and rate != sample_rate:
        return resample(wave, rate, sample_rate), rate
    return wave, rate


def _as_sources(signals, length: int | None, sample_rate: int | None, what: str) -> tuple[torch.Tensor, int | None]:
    """``[..., S, T]`` from a tensor, a file, or a list of files/tensors (one per source), at
    ``sample_rate`` (None: the first file's rate); with ``length``, each source off by a
    resampling's rounding is trimmed or padded to it."""
    items = [signals] if isinstance(signals, (str, Path)) else signals
    if not isinstance(items, (list, tuple)):
        tensor = torch.as_tensor(items)
        return (tensor.unsqueeze(0) if tensor.ndim == 1 else tensor), sample_rate
    waves = []
    for item in items:
        wave, stored_rate = _load(item, sample_rate)
        sample_rate = sample_rate or stored_rate
        target = length if length is not None else (waves[0].shape[-1] if waves else wave.shape[-1])
        fitted = fit_length(wave, target, resampling_tolerance(stored_rate, sample_rate))
        if fitted is None:
            name = item if isinstance(item, (str, Path)) else f"source {len(waves)}"
            raise MarsctlError(f"{name}: {wave.shape[-1]} samples, but the {what} need {target}")
        waves.append(fitted)
    return torch.stack(waves), sample_rate


def score(estimates, references, mixture=None, sample_rate: int | None = None) -> dict[str, torch.Tensor]:
    """Score separated sources against their references; the public scoring API (``marsctl.score``).

    ``estimates`` and ``references``: tensors/arrays ``[S, T]`` (or ``[T]`` for one source,
    or batched ``[..., S, T]``), an audio file, or a list of files/tensors, one per source,
    in the same order. The sources are scored jointly (SIR = leakage of the others).
    ``mixture`` (``[T]``, ``[..., T]`` or a file) adds SI-SDRi. Files are read at
    ``sample_rate`` if given, else at the first reference file's own rate (tensors are
    taken to be at that rate); an estimate file at another rate is resampled, and the one
    sample a resampling may add or lose is trimmed or zero-padded.

    Returns ``{"sdr", "sir", "sar", "si_sdr", "si_sdri", "stft_distance"}``, each a float64
    tensor ``[..., S]`` in dB (STFT distance: mean absolute magnitude difference). NaN means
    undefined (SIR of one source, SI-SDRi without a mixture); silent or non-finite
    estimates score ``DB_FLOOR``.
    """
    refs, rate = _as_sources(references, None, sample_rate, "references")
    rate = rate or 16_000
    ests, _ = _as_sources(estimates, refs.shape[-1], rate, "references")
    if ests.shape != refs.shape:
        raise MarsctlError(f"estimates {tuple(ests.shape)} do not match references {tuple(refs.shape)} ([sources, samples])")
    mix = None
    if mixture is not None:
        mix, stored_rate = _load(mixture, rate)
        mix = fit_length(mix, refs.shape[-1], resampling_tolerance(stored_rate, rate))
        if mix is None:
            raise MarsctlError(f"mixture: its length differs from the references' ({refs.shape[-1]} samples)")
    return score_systems(refs, [ests], mix, SignalConfig(sample_rate=rate))[0].metrics
