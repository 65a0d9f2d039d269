"""Evaluation reports: per-source rows, mean ± standard error summaries, JSON/CSV/Markdown output.

The one report writer of ``marsctl eval``, for folders and for models: whatever produced
the scores, a report is a list of :class:`SourceScores` rows plus the files that failed.
Rows of several systems (``group["system"]``: the mixture, the model per query modality,
the IRM oracle) are only ever summarised per system, never in one mean across systems.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from marsctl.eval.scoring import DB_FLOOR, SEPARATION_METRICS
from marsctl.files import write_json_atomic, write_text_atomic

#: metric columns in display order, with their labels (the text-audio scores: see SCORE_METRICS)
METRICS: dict[str, str] = {
    "sdr": "SDR (dB)",
    "sir": "SIR (dB)",
    "sar": "SAR (dB)",
    "si_sdr": "SI-SDR (dB)",
    "si_sdri": "SI-SDRi (dB)",
    "stft_distance": "STFT L1",
}
#: text-audio scores of model evaluations (marsctl.models.judge), each a column only when some row has it:
#: the independent judge's, and the model's own query/reward encoder's (which RL optimises)
SCORE_METRICS: dict[str, str] = {
    "judge_score": "Judge score",
    "reward_encoder_score": "Reward-encoder score (not independent)",
}
assert tuple(METRICS) == SEPARATION_METRICS


@dataclass
class SourceScores:
    """The scores of one separated source. ``None`` means undefined (see ``note``)."""

    mixture: str
    source: str
    sdr: float | None = None
    sir: float | None = None
    sar: float | None = None
    si_sdr: float | None = None
    si_sdri: float | None = None
    stft_distance: float | None = None
    #: 100 x cosine of the label's text embedding and the estimate's audio embedding (models only),
    #: by an independent judge encoder (``--judge``) ...
    judge_score: float | None = None
    #: ... and by the model's own query/reward encoder (not independent: RL optimises it)
    reward_encoder_score: float | None = None
    #: extra grouping keys (e.g. system, class, query modality)
    group: dict[str, str] = field(default_factory=dict)
    note: str = ""

    def metric(self, name: str) -> float | None:
        value = getattr(self, name)
        return value if value is not None and math.isfinite(value) else None


@dataclass(frozen=True)
class Failure:
    """A file that could not be evaluated, and why."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True)
class MetricSummary:
    mean: float | None
    standard_error: float | None
    count: int

    def format(self, digits: int = 2) -> str:
        if self.mean is None:
            return "n/a"
        if self.standard_error is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.standard_error:.{digits}f}"


def summarize(values: Iterable[float | None]) -> MetricSummary:
    """Mean and standard error of the mean (sample std / sqrt(n)) of the defined values."""
    data = [v for v in values if v is not None and math.isfinite(v)]
    n = len(data)
    if n == 0:
        return MetricSummary(None, None, 0)
    mean = math.fsum(data) / n
    if n == 1:
        return MetricSummary(mean, None, 1)
    variance = math.fsum((v - mean) ** 2 for v in data) / (n - 1)
    return MetricSummary(mean, math.sqrt(variance / n), n)


@dataclass(frozen=True)
class GroupSummary:
    """The summary of the rows sharing the values ``key`` of some grouping keys."""

    key: tuple[str, ...]
    n: int  # rows in the group
    metrics: dict[str, MetricSummary]


@dataclass
class EvalReport:
    """All rows and failures of one evaluation, with the settings that produced them.

    ``single_system`` False (a model evaluation with its reference systems) leaves out the
    overall "all" summary: means are per ``group["system"]`` only.
    """

    rows: list[SourceScores]
    failures: list[Failure]
    settings: dict[str, Any] = field(default_factory=dict)
    single_system: bool = True

    @property
    def metrics(self) -> dict[str, str]:
        """The metric columns of this report (each text-audio score only when some row has one)."""
        scores = {name: label for name, label in SCORE_METRICS.items() if any(getattr(r, name) is not None for r in self.rows)}
        return {**METRICS, **scores}

    def summary(self, rows: Sequence[SourceScores] | None = None) -> dict[str, MetricSummary]:
        rows = self.rows if rows is None else rows
        return {name: summarize(r.metric(name) for r in rows) for name in self.metrics}

    def grouped(self, keys: Sequence[str]) -> list[GroupSummary]:
        """Summaries per combination of ``keys`` (``"source"`` or keys of ``SourceScores.group``), in order of first appearance."""
        groups: dict[tuple[str, ...], list[SourceScores]] = {}
        for row in self.rows:
            key = tuple(row.source if k == "source" else row.group.get(k, "") for k in keys)
            groups.setdefault(key, []).append(row)
        return [GroupSummary(key, len(rows), self.summary(rows)) for key, rows in groups.items()]

    def summary_by(self, key: str) -> dict[str, dict[str, MetricSummary]]:
        """Summaries per value of ``key``: ``"source"`` or a key of ``SourceScores.group``."""
        return {g.key[0]: g.metrics for g in sorted(self.grouped((key,)), key=lambda g: g.key)}

    def to_dict(self, group_keys: Sequence[str] = ()) -> dict[str, Any]:
        def summary_dict(summary: dict[str, MetricSummary]) -> dict[str, Any]:
            return {name: dataclasses.asdict(s) for name, s in summary.items()}

        return {
            "settings": self.settings,
            "counts": {
                "mixtures": len({r.mixture for r in self.rows}),
                "sources": len(self.rows),
                "failures": len(self.failures),
            },
            **({"summary": summary_dict(self.summary())} if self.single_system else {}),
            "by": {key: {v: summary_dict(s) for v, s in self.summary_by(key).items()} for key in group_keys},
            "rows": [self._row_dict(r) for r in self.rows],
            "failures": [dataclasses.asdict(f) for f in self.failures],
        }

    def _row_dict(self, row: SourceScores) -> dict[str, Any]:
        data = {"mixture": row.mixture, "source": row.source, **row.group}
        data.update({name: row.metric(name) for name in self.metrics})
        data["note"] = row.note
        return data


def _csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else (f"{v:.6f}" if isinstance(v, float) else v) for v in row])
    return buffer.getvalue()


def score_note(report: EvalReport) -> str:
    """What the text-audio score columns of a model evaluation mean (a paragraph; empty without them)."""
    metrics, settings = report.metrics, report.settings
    if "judge_score" not in metrics and "reward_encoder_score" not in metrics:
        return ""
    lines = []
    if "judge_score" in metrics:
        lines.append(f"- Judge: 100 × cosine of the label's text and the estimate's audio embedding by the independent "
                     f"judge encoder `{settings.get('judge') or 'given'}`.")
    else:
        lines.append("- No independent judge was given (`--judge`).")
    if "reward_encoder_score" in metrics:
        spec = settings.get("reward_encoder") or settings.get("encoder") or "of the model"
        role = settings.get("reward_encoder_role") or "the model's own query encoder"
        lines.append(f"- Reward enc.: the same cosine by the reward encoder `{spec}` ({role}); "
                     "RL optimises this encoder's score, so it is not an independent measure.")
    return "\n".join(lines) + "\n\n"


def write_report(report: EvalReport, out_dir: str | Path, group_keys: Sequence[str] = ()) -> dict[str, Path]:
    """Write ``report.json``, ``scores.csv`` (one row per source), ``summary.csv`` and ``summary.md``;
    for a report of several systems also ``model_summary.json`` / ``model_summary.md`` (mean ± SE
    and n per system and query modality, overall and per class).

    Every file is written atomically. Returns the paths written, by kind.
    """
    from marsctl.eval.tables import markdown_summary, markdown_table, system_entries

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "report.json",
        "scores_csv": out / "scores.csv",
        "summary_csv": out / "summary.csv",
        "markdown": out / "summary.md",
    }
    metrics = report.metrics
    write_json_atomic(paths["json"], report.to_dict(group_keys))
    extra = sorted({k for r in report.rows for k in r.group})
    write_text_atomic(
        paths["scores_csv"],
        _csv_text(
            ["mixture", "source", *extra, *metrics, "note"],
            ([r.mixture, r.source, *(r.group.get(k, "") for k in extra), *(r.metric(m) for m in metrics), r.note] for r in report.rows),
        ),
    )
    summary_rows = []
    groups = [("all", "all", report.summary())] if report.single_system else []
    for key in group_keys:
        groups += [(key, value, s) for value, s in report.summary_by(key).items()]
    for key, value, summary in groups:
        for metric, s in summary.items():
            summary_rows.append([key, value, metric, s.mean, s.standard_error, s.count])
    write_text_atomic(paths["summary_csv"], _csv_text(["group", "value", "metric", "mean", "standard_error", "n"], summary_rows))
    write_text_atomic(paths["markdown"], markdown_summary(report, group_keys))
    if not report.single_system:
        overall, per_class = system_entries(report), system_entries(report, by_class=True)
        paths["model_summary_json"] = out / "model_summary.json"
        write_json_atomic(paths["model_summary_json"], {"meta": report.settings, "overall": overall, "per_class": per_class})
        paths["model_summary_md"] = out / "model_summary.md"
        write_text_atomic(
            paths["model_summary_md"],
            f"# Evaluation of {report.settings.get('model', 'model')} on {report.settings.get('data', 'data')}\n\n"
            "Mean ± standard error over sources (dB); silent or failed "
            f"estimates are scored at {DB_FLOOR:g} dB.\n\n" + score_note(report) + markdown_table(overall)
            + "\n## Per class\n\n" + markdown_table(per_class),
        )
    return paths
