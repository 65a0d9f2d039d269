"""Summary tables of an :class:`~marsctl.eval.report.EvalReport`: Markdown files and rich tables.

Every cell is ``mean ± standard error``; a cell whose metric is defined for fewer sources
than the row has (SIR of single sources, SI-SDRi without the mixture) shows its own
``(n=k)``. Rows of several systems are listed per system, never averaged together.
"""

from __future__ import annotations

from typing import Any, Sequence

from rich import box
from rich.table import Table

from marsctl.eval.report import EvalReport, GroupSummary, MetricSummary, score_note

#: systems in display order; others after them
SYSTEM_ORDER = {"mixture": 0, "model": 1, "oracle-irm": 2}
#: widest name column (characters) before a name is folded over lines
NAME_WIDTH = 18
#: short column labels of the per-system tables
#: (judge_score: the independent judge's text-audio score; reward_encoder_score: the model's own encoder's, not independent)
SHORT_LABELS = {"sdr": "SDR", "sir": "SIR", "sar": "SAR", "si_sdr": "SI-SDR", "si_sdri": "SI-SDRi", "stft_distance": "STFT dist",
                "judge_score": "Judge", "reward_encoder_score": "Reward enc."}


def cell(summary: MetricSummary, n: int, digits: int = 2) -> str:
    """``mean ± se``, with ``(n=k)`` when the metric is defined for ``k < n`` sources."""
    text = summary.format(digits)
    return text if summary.count == n or summary.mean is None else f"{text} (n={summary.count})"


def _stacked(text: str) -> str:
    """A cell over lines (mean, ± SE, n) so that a table of all metrics fits 80 columns."""
    return text.replace(" ± ", "\n± ").replace(" (n=", "\n(n=")


def _narrow_table(title: str) -> Table:
    return Table(title=title, box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)


def _digits(metric: str) -> int:
    return 4 if metric == "stft_distance" else 2


def markdown_summary(report: EvalReport, group_keys: Sequence[str] = ()) -> str:
    """``summary.md``: the overall row (single-system reports only) and one table per group key."""
    metrics = report.metrics
    header = "| | " + " | ".join(metrics.values()) + " | n |\n|---|" + "---:|" * (len(metrics) + 1)
    lines = ["# Evaluation summary", "", "Mean ± standard error over sources.", ""]
    note = score_note(report)
    if note:
        lines += note.rstrip("\n").split("\n") + [""]

    def add(name: str, summary: dict[str, Any], n: int) -> None:
        lines.append(f"| {name} | " + " | ".join(cell(summary[m], n) for m in metrics) + f" | {n} |")

    if report.single_system:
        lines.append(header)
        add("all", report.summary(), len(report.rows))
    for key in group_keys:
        lines += ["", f"## By {key}", "", header]
        for group in sorted(report.grouped((key,)), key=lambda g: g.key):
            add(group.key[0], group.metrics, group.n)
    if report.failures:
        lines += ["", f"## Failures ({len(report.failures)})", ""]
        lines += [f"- `{f.path}`: {f.reason}" for f in report.failures]
    return "\n".join(lines) + "\n"


def summary_table(report: EvalReport, title: str = "Evaluation", group_key: str | None = None) -> Table:
    """A rich table of mean ± SE per metric (one row overall, or one per group value); dB but the STFT distance."""
    table = _narrow_table(title)
    groups = [GroupSummary(("all",), len(report.rows), report.summary())] if group_key is None else sorted(report.grouped((group_key,)), key=lambda g: g.key)
    # names are not cut ("acoustic-guitar"): as wide as the longest one, up to NAME_WIDTH, then folded
    table.add_column(group_key or "", style="bold", overflow="fold", min_width=min(NAME_WIDTH, max(len(str(g.key[0])) for g in groups)))
    for metric, label in report.metrics.items():
        label = SHORT_LABELS.get(metric, label)  # short labels so that a table of all metrics fits 80 columns
        table.add_column(label, justify="right", overflow="fold", min_width=max(len(w) for w in label.split()))
    table.add_column("n", justify="right")
    for group in groups:
        table.add_row(group.key[0], *(_stacked(cell(group.metrics[m], group.n)) for m in report.metrics), str(group.n))
    return table


def system_entries(report: EvalReport, by_class: bool = False) -> list[dict[str, Any]]:
    """Mean, SE and n of every metric per (system, query modality[, class]), as plain dicts
    (``model_summary.json``): ``{"system", "query_modality"[, "label"], "n", "<metric>_mean", "_se", "_n"}``."""
    keys = ("system", "query_modality", *(("class",) if by_class else ()))
    out = []
    for group in report.grouped(keys):
        system, modality = group.key[:2]
        system = system.removesuffix(f" ({modality} query)")  # the display name of marsctl.eval.model.system_name
        entry: dict[str, Any] = {"system": system, "query_modality": modality, "n": group.n}
        if by_class:
            entry["label"] = group.key[2]
        for metric, s in group.metrics.items():
            entry[f"{metric}_mean"], entry[f"{metric}_se"], entry[f"{metric}_n"] = s.mean, s.standard_error, s.count
        out.append(entry)
    return sorted(out, key=lambda e: (SYSTEM_ORDER.get(e["system"], 9), e["query_modality"], e.get("label", "")))


def _entry_cells(entry: dict[str, Any], metrics: Sequence[str]) -> list[str]:
    return [cell(MetricSummary(entry[f"{m}_mean"], entry[f"{m}_se"], entry.get(f"{m}_n", entry["n"])), entry["n"], _digits(m)) for m in metrics]


def markdown_table(entries: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of :func:`system_entries`: mean ± SE (dB; text-audio scores x100)."""
    metrics = [m for m in SHORT_LABELS if entries and f"{m}_mean" in entries[0]]
    head = ["system", "query", *(["class"] if entries and "label" in entries[0] else []), "n", *(SHORT_LABELS[m] for m in metrics)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in entries:
        cells = [e["system"], e["query_modality"], *([e["label"]] if "label" in e else []), str(e["n"])]
        lines.append("| " + " | ".join(cells + _entry_cells(e, metrics)) + " |")
    return "\n".join(lines) + "\n"


#: the columns of the CLI's tables: separation metrics, and (a second table) the text-audio scores
RICH_SEPARATION_METRICS = ("sdr", "sir", "sar", "si_sdri")
RICH_SCORE_METRICS = ("judge_score", "reward_encoder_score")


def summary_rich_table(entries: Sequence[dict[str, Any]], title: str = "Evaluation",
                       metrics: Sequence[str] = RICH_SEPARATION_METRICS) -> Table:
    """A rich table of :func:`system_entries` (for the CLI) with the columns ``metrics`` that the
    entries have (default: SDR, SIR, SAR, SI-SDRi; ``RICH_SCORE_METRICS`` for the text-audio
    scores); fits 80 columns by folding, never truncating."""
    metrics = [m for m in metrics if entries and f"{m}_mean" in entries[0]]
    table = _narrow_table(title)
    text_columns = [("system", "system"), ("query", "query_modality"), *([("class", "label")] if entries and "label" in entries[0] else [])]
    for column, key in text_columns:  # names are not cut: as wide as the longest one (up to NAME_WIDTH, then folded)
        table.add_column(column, min_width=min(NAME_WIDTH, max([len(column)] + [len(str(e[key])) for e in entries])), overflow="fold")
    table.add_column("n", justify="right")
    for metric in metrics:
        label = SHORT_LABELS[metric]
        table.add_column(label, justify="right", min_width=max(len(word) for word in label.split()), overflow="fold")
    for e in entries:
        cells = [e["system"], e["query_modality"], *([e["label"]] if "label" in e else []), str(e["n"])]
        table.add_row(*cells, *(_stacked(c) for c in _entry_cells(e, metrics)))
    return table
