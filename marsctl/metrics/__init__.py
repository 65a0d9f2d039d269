"""Separation metrics as pure functions: BSS-Eval v3 SDR/SIR/SAR, SI-SDR(i), STFT distance.

Scoring folders and datasets, floors for silent estimates and reports: :mod:`marsctl.eval`.
"""

from marsctl.metrics.separation import (
    BssEvalReferences,
    BssEvalScores,
    bss_eval_sources,
    si_sdr,
    si_sdr_improvement,
    stft_distance,
)

__all__ = [
    "BssEvalReferences",
    "BssEvalScores",
    "bss_eval_sources",
    "si_sdr",
    "si_sdr_improvement",
    "stft_distance",
]
