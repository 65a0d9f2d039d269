"""Scores of ``marsctl eval --model`` reports on a union dataset, broken down by pair kind and soundfont.

The union's fixed test mixtures pair two instruments, two everyday sounds, or one of each
(``pair_type`` / ``source_families`` in mixtures.parquet); instrument sources come from
several soundfonts (clips.parquet ``soundfont``). This prints, per report, mean ± standard
error of a metric for each pair kind and soundfont, and, for two or more reports, the paired
difference of each against the first (per source, same mixtures), which removes the spread
between mixtures.

    python bench/union_breakdown.py --data data/union old/scores.csv new/scores.csv [--json out.json]
"""

from __future__ import annotations

import argparse
import csv
import math
from collections import defaultdict
from pathlib import Path

MODEL_SYSTEM = "model (text query)"


def mean_se(values: list[float]) -> tuple[float, float, int]:
    """Mean, standard error and count of the finite values (marsctl's report summary; NaN when undefined)."""
    from marsctl.eval.report import summarize

    summary = summarize(values)
    nan_if_none = lambda x: math.nan if x is None else x  # noqa: E731
    return nan_if_none(summary.mean), nan_if_none(summary.standard_error), summary.count


def read_rows(path: Path, metric: str) -> dict[str, dict[tuple[str, str], float]]:
    """``system -> (mixture, source) -> value`` of one scores.csv."""
    rows: dict[str, dict[tuple[str, str], float]] = defaultdict(dict)
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row.get(metric) not in (None, ""):
                rows[row["system"]][(row["mixture"], row["source"])] = float(row[metric])
    return rows


def breakdown(values: dict[tuple[str, str], float], groups: dict) -> dict[str, tuple[float, float, int]]:
    """Mean ± SE per pair kind and per soundfont (instrument sources) of per-source values."""
    buckets: dict[str, list[float]] = defaultdict(list)
    for key, value in values.items():
        group = groups.get(key)
        if group is None:
            continue
        buckets["all"].append(value)
        buckets[f"pairs: {group['pair_kind'] or 'unpaired'}"].append(value)
        if group["soundfont"]:
            buckets[f"soundfont: {group['soundfont']}"].append(value)
    return {name: mean_se(buckets[name]) for name in sorted(buckets, key=lambda n: (n != "all", n))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the union dataset the reports were made on")
    parser.add_argument("reports", type=Path, nargs="+", help="scores.csv files; differences are against the first")
    parser.add_argument("--metric", default="si_sdri")
    parser.add_argument("--split", default="test")
    parser.add_argument("--json", type=Path, help="write the numbers here too")
    args = parser.parse_args()

    from marsctl.data.union import source_groups

    groups = source_groups(args.data, args.split)
    reports = [read_rows(path, args.metric) for path in args.reports]
    result: dict = {"data": str(args.data), "metric": args.metric, "reports": [str(p) for p in args.reports], "systems": {}, "paired": {}}
    print(f"{args.metric} by group (mean ± SE, n sources)\n")
    print("| report | system | " + " | ".join(["group", "mean", "n"]) + " |\n|---|---|---|---:|---:|")
    for path, rows in zip(args.reports, reports):
        systems = [s for s in rows if path == args.reports[0] or s == MODEL_SYSTEM]
        for system in sorted(systems):
            table = breakdown(rows[system], groups)
            result["systems"][f"{path}:{system}"] = {k: {"mean": m, "se": se, "n": n} for k, (m, se, n) in table.items()}
            for name, (m, se, n) in table.items():
                print(f"| {path.parent.name} | {system} | {name} | {m:.2f} ± {se:.2f} | {n} |")
    base = reports[0][MODEL_SYSTEM]
    for path, rows in zip(args.reports[1:], reports[1:]):
        other = rows[MODEL_SYSTEM]
        keys = sorted(set(base) & set(other))
        if len(keys) != len(base) or len(keys) != len(other):
            raise SystemExit(f"{path}: scores other sources than {args.reports[0]} ({len(other)} vs {len(base)})")
        diffs = {k: other[k] - base[k] for k in keys}
        table = breakdown(diffs, groups)
        better = sum(d > 0 for d in diffs.values()) / len(diffs)
        result["paired"][str(path)] = {"better_share": better, **{k: {"mean": m, "se": se, "n": n} for k, (m, se, n) in table.items()}}
        print(f"\npaired {args.metric}: {path.parent.name} - {args.reports[0].parent.name} (better on {100 * better:.0f} % of sources)\n")
        print("| group | difference (dB) | n |\n|---|---:|---:|")
        for name, (m, se, n) in table.items():
            print(f"| {name} | {m:+.2f} ± {se:.2f} | {n} |")
    if args.json:
        from marsctl.files import write_json_atomic
        from paired_difference import finite_or_none  # bench/, beside this script

        write_json_atomic(args.json, finite_or_none(result))  # a one-source group's SE is undefined: null


if __name__ == "__main__":
    main()
