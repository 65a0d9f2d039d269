"""Evaluation reports: per-source rows, mean ± standard error summaries, JSON/CSV/Markdown output.

Shared by ``marsctl eval`` on folders and on models: whatever produced the scores, a
report is a list of :class:`SourceScores` rows plus the files that failed.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from rich.table import Table

from marsctl.files import write_json_atomic, write_text_atomic

#: metric columns in display order, with their labels
METRICS: dict[str, str] = {
    "sdr": "SDR (dB)",
    "sir": "SIR (dB)",
    "sar": "SAR (dB)",
    "si_sdr": "SI-SDR (dB)",
    "si_sdri": "SI-SDRi (dB)",
    "stft_distance": "STFT L1",
}


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


@dataclass
class EvalReport:
    """All rows and failures of one evaluation, with the settings that produced them."""

    rows: list[SourceScores]
    failures: list[Failure]
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self, rows: Sequence[SourceScores] | None = None) -> dict[str, MetricSummary]:
        rows = self.rows if rows is None else rows
        return {name: summarize(r.metric(name) for r in rows) for name in METRICS}

    def summary_by(self, key: str) -> dict[str, dict[str, MetricSummary]]:
        """Summaries per value of ``key``: ``"source"`` or a key of ``SourceScores.group``."""
        groups: dict[str, list[SourceScores]] = {}
        for row in self.rows:
            value = row.source if key == "source" else row.group.get(key, "")
            groups.setdefault(value, []).append(row)
        return {value: self.summary(rows) for value, rows in sorted(groups.items())}

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
            "summary": summary_dict(self.summary()),
            "by": {key: {v: summary_dict(s) for v, s in self.summary_by(key).items()} for key in group_keys},
            "rows": [_row_dict(r) for r in self.rows],
            "failures": [dataclasses.asdict(f) for f in self.failures],
        }


def _row_dict(row: SourceScores) -> dict[str, Any]:
    data = {"mixture": row.mixture, "source": row.source, **row.group}
    data.update({name: row.metric(name) for name in METRICS})
    data["note"] = row.note
    return data


def _csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else (f"{v:.6f}" if isinstance(v, float) else v) for v in row])
    return buffer.getvalue()


def summary_table(report: EvalReport, title: str = "Evaluation", group_key: str | None = None) -> Table:
    """A rich table of mean ± SE per metric (one row overall, or one per group value)."""
    table = Table(title=title, show_lines=False)
    table.add_column(group_key or "", style="bold")
    for label in METRICS.values():
        table.add_column(label, justify="right")
    table.add_column("n", justify="right")
    groups = {"all": report.summary()} if group_key is None else report.summary_by(group_key)
    for name, summary in groups.items():
        n = max(s.count for s in summary.values())
        table.add_row(name, *(summary[m].format() for m in METRICS), str(n))
    return table


def markdown_summary(report: EvalReport, group_keys: Sequence[str] = ()) -> str:
    header = "| | " + " | ".join(METRICS.values()) + " | n |\n|---|" + "---:|" * (len(METRICS) + 1) + "\n"
    lines = ["# Evaluation summary", "", "Mean ± standard error over sources.", "", header.rstrip("\n")]

    def add(name: str, summary: dict[str, MetricSummary]) -> None:
        n = max(s.count for s in summary.values())
        lines.append(f"| {name} | " + " | ".join(summary[m].format() for m in METRICS) + f" | {n} |")

    add("all", report.summary())
    for key in group_keys:
        lines += ["", f"## By {key}", "", header.rstrip("\n")]
        for value, summary in report.summary_by(key).items():
            add(value, summary)
    if report.failures:
        lines += ["", f"## Failures ({len(report.failures)})", ""]
        lines += [f"- `{f.path}`: {f.reason}" for f in report.failures]
    return "\n".join(lines) + "\n"


def write_report(report: EvalReport, out_dir: str | Path, group_keys: Sequence[str] = ()) -> dict[str, Path]:
    """Write ``report.json``, ``scores.csv`` (one row per source), ``summary.csv`` and ``summary.md``.

    Every file is written atomically. Returns the paths written, by kind.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "report.json",
        "scores_csv": out / "scores.csv",
        "summary_csv": out / "summary.csv",
        "markdown": out / "summary.md",
    }
    write_json_atomic(paths["json"], report.to_dict(group_keys))
    extra = sorted({k for r in report.rows for k in r.group})
    write_text_atomic(
        paths["scores_csv"],
        _csv_text(
            ["mixture", "source", *extra, *METRICS, "note"],
            ([r.mixture, r.source, *(r.group.get(k, "") for k in extra), *(r.metric(m) for m in METRICS), r.note] for r in report.rows),
        ),
    )
    summary_rows = []
    groups = [("all", "all", report.summary())]
    for key in group_keys:
        groups += [(key, value, s) for value, s in report.summary_by(key).items()]
    for key, value, summary in groups:
        for metric, s in summary.items():
            summary_rows.append([key, value, metric, s.mean, s.standard_error, s.count])
    write_text_atomic(paths["summary_csv"], _csv_text(["group", "value", "metric", "mean", "standard_error", "n"], summary_rows))
    write_text_atomic(paths["markdown"], markdown_summary(report, group_keys))
    return paths
