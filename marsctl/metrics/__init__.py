"""Separation and semantic metrics, and the evaluation reports built from them."""

from marsctl.metrics.report import EvalReport, Failure, MetricSummary, SourceScores, summarize, write_report
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
    "EvalReport",
    "Failure",
    "MetricSummary",
    "SourceScores",
    "bss_eval_sources",
    "si_sdr",
    "si_sdr_improvement",
    "stft_distance",
    "summarize",
    "write_report",
]
