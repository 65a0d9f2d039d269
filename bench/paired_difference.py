"""Paired difference of two ``marsctl eval --model`` reports on the same fixed test mixtures.

Each source of each test mixture is scored by both models; the per-source differences
(B - A) remove the spread between mixtures that dominates each model's own standard error.

    python bench/paired_difference.py reports/sup/scores.csv reports/rl/scores.csv [--metric si_sdri] [--json out.json]

Prints mean +- standard error of the difference, the share of sources B improves, and the
same per class (markdown).
"""

from __future__ import annotations

import argparse
import csv
import math
from collections import defaultdict
from pathlib import Path

MODEL_SYSTEM = "model (text query)"
#: the scores.csv columns in decibels (the text-audio scores are 100 x cosine)
DECIBEL_METRICS = ("sdr", "sir", "sar", "si_sdr", "si_sdri", "sdri", "sir_i", "sar_i")


def read_scores(path: Path, system: str, metric: str, classes: set[str] | None = None) -> dict[tuple[str, str], tuple[str, float]]:
    """``(mixture, source) -> (class, value)`` of one system's rows (only the sources of ``classes`` when given)."""
    rows = {}
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row["system"] == system and row.get(metric) not in (None, "") and (classes is None or row["class"] in classes):
                rows[(row["mixture"], row["source"])] = (row["class"], float(row[metric]))
    if not rows:
        raise SystemExit(f"{path}: no '{metric}' scores for system '{system}'" + (f" and classes {sorted(classes)}" if classes else ""))
    return rows


def class_set(text: str | None) -> set[str] | None:
    """``--classes "a,b"`` as a set (None: every class)."""
    return {name.strip() for name in text.split(",") if name.strip()} if text else None


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the finite values (marsctl's report summary; NaN when undefined)."""
    from marsctl.eval.report import summarize

    summary = summarize(values)
    return (math.nan if summary.mean is None else summary.mean), (math.nan if summary.standard_error is None else summary.standard_error)


def finite_or_none(value):
    """JSON has no NaN: an undefined mean or SE (e.g. the SE of a class with one source) is written as null,
    in nested dicts and lists too."""
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list):
        return [finite_or_none(item) for item in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path, help="scores.csv of model A (e.g. the starting model)")
    parser.add_argument("b", type=Path, help="scores.csv of model B (e.g. the fine-tuned model)")
    parser.add_argument("--metric", default="si_sdri")
    parser.add_argument("--system", default=MODEL_SYSTEM, help="the system rows to compare")
    parser.add_argument("--classes", metavar="A,B,...", help="compare only the sources of these classes (comma-separated)")
    parser.add_argument("--json", help="write the numbers here too")
    args = parser.parse_args()

    classes = class_set(args.classes)
    a, b = read_scores(args.a, args.system, args.metric, classes), read_scores(args.b, args.system, args.metric, classes)
    keys = sorted(set(a) & set(b))
    if len(keys) != len(a) or len(keys) != len(b):
        raise SystemExit(f"the reports score different sources ({len(a)} in A, {len(b)} in B, {len(keys)} in both)")
    diffs = [b[k][1] - a[k][1] for k in keys if math.isfinite(a[k][1]) and math.isfinite(b[k][1])]
    by_class: dict[str, list[float]] = defaultdict(list)
    for k in keys:
        by_class[a[k][0]].append(b[k][1] - a[k][1])
    mean_a, se_a = mean_se([a[k][1] for k in keys])
    mean_b, se_b = mean_se([b[k][1] for k in keys])
    mean_d, se_d = mean_se(diffs)
    wins = sum(d > 0 for d in diffs) / len(diffs)
    unit = " dB" if args.metric in DECIBEL_METRICS else ""
    print(f"{args.metric}: A {mean_a:.2f} ± {se_a:.2f}, B {mean_b:.2f} ± {se_b:.2f}; "
          f"B - A = {mean_d:+.2f} ± {se_d:.2f}{unit} (paired, n = {len(diffs)}), B better on {100 * wins:.0f} % of sources\n")
    print(f"| class | B - A {args.metric}{f' ({unit.strip()})' if unit else ''} | B better | n |\n|---|---:|---:|---:|")
    per_class = {}
    for label in sorted(by_class):
        m, se = mean_se(by_class[label])
        share = sum(d > 0 for d in by_class[label]) / len(by_class[label])
        per_class[label] = {"mean": m, "se": se, "better_share": share, "n": len(by_class[label])}
        print(f"| {label} | {m:+.2f} ± {se:.2f} | {100 * share:.0f} % | {len(by_class[label])} |")
    if args.json:
        from marsctl.files import write_json_atomic

        write_json_atomic(args.json, finite_or_none({"a": str(args.a), "b": str(args.b), "metric": args.metric, "n": len(diffs),
                                                     "mean_a": mean_a, "se_a": se_a, "mean_b": mean_b, "se_b": se_b,
                                                     "mean_difference": mean_d, "se_difference": se_d, "better_share": wins,
                                                     "per_class": per_class}))


if __name__ == "__main__":
    main()
