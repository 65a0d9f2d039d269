"""``marsctl eval``: one scoring path and one report writer for folders of audio and for separators.

* :func:`score`: the public scoring API (tensors or files -> dict of metric tensors);
* :func:`evaluate_folders`: estimates/references folders -> :class:`EvalReport`;
* :func:`evaluate_model_on_dataset` / :func:`evaluate_separator`: a separator on a dataset's
  fixed test mixtures, beside the unprocessed mixture and the ideal-ratio-mask oracle;
* :func:`write_report`: report.json, scores.csv, summary.csv, summary.md (+ model_summary.*).

All of them score with :func:`marsctl.eval.scoring.score_systems` (the pure metrics live in
:mod:`marsctl.metrics`): silent or failed estimates are scored at ``DB_FLOOR`` and counted.
"""

from marsctl.eval.folders import evaluate_folders
from marsctl.eval.report import EvalReport, Failure, MetricSummary, SourceScores, write_report
from marsctl.eval.scoring import DB_FLOOR, score, score_systems

__all__ = [
    "DB_FLOOR",
    "EvalReport",
    "Failure",
    "MetricSummary",
    "SourceScores",
    "evaluate_folders",
    "evaluate_model_on_dataset",
    "evaluate_separator",
    "score",
    "score_systems",
    "summarize",
    "write_evaluation",
    "write_report",
]

_MODEL_API = ("evaluate_model_on_dataset", "evaluate_separator", "summarize", "write_evaluation")


def __getattr__(name: str):
    """The model evaluation (which loads the separator code) is imported on first use."""
    if name in _MODEL_API:
        from marsctl.eval import model

        return getattr(model, name)
    raise AttributeError(f"module 'marsctl.eval' has no attribute {name!r}")
