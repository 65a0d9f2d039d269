"""RL variants over several seeds: per seed, pooled per source, and the spread between seeds.

``bench/rl_reward_experiments.py`` run with ``--set seed=N`` into one ``--out`` per seed (same start, same
test mixtures) gives one paired comparison per seed, whose ± SE covers the test sources but not the run-to-run
spread of RL. This script reads the runs' ``eval-*/scores.csv`` and reports, for each variant and comparison
(against the start, and anchor + SI-SDR against SI-SDR alone):

* ``per seed``: B − A over the test sources, mean ± SE (as in each run's summary);
* ``pooled``: each source's B − A averaged over the seeds that ran the variant, then mean ± SE over sources;
* ``between seeds``: the mean of the seeds' means ± their standard deviation / sqrt(n) (n >= 2), the
  uncertainty to quote for "does this reward gain", since it includes the RL run's own randomness.

    python bench/rl_seed_summary.py runs/rl-seed0 runs/rl-seed1 runs/rl-seed2 [--metric si_sdri] [--json out.json]

``--compare B:A`` names other report pairs (``eval-B`` against ``eval-A``), e.g. ``adapted:start`` for the runs of
``bench/rl_domain_adaptation.py``; ``--classes A,B`` keeps only the sources of those classes (e.g. classes held
out of the start's training).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired_difference import MODEL_SYSTEM, class_set, finite_or_none, mean_se, read_scores  # noqa: E402

#: (B, A): the comparisons of bench/rl_reward_experiments.py's summary
COMPARISONS = [(variant, "start") for variant in ("supervised", "sisdr", "anchor", "query", "anchor_sisdr", "query_contrast",
                                                  "anchor_score_function")] + [("anchor_sisdr", "sisdr")]


def seed_differences(run: Path, b: str, a: str, metric: str, classes: set[str] | None = None) -> dict[tuple[str, str], float] | None:
    """Per-source B − A of one run directory, or None when it lacks either report."""
    paths = [run / f"eval-{name}" / "scores.csv" for name in (b, a)]
    if not all(path.is_file() for path in paths):
        return None
    scores_b, scores_a = (read_scores(path, MODEL_SYSTEM, metric, classes) for path in paths)
    if set(scores_b) != set(scores_a):
        raise SystemExit(f"{run}: eval-{b} and eval-{a} score different sources")
    return {key: scores_b[key][1] - scores_a[key][1] for key in scores_a
            if math.isfinite(scores_b[key][1]) and math.isfinite(scores_a[key][1])}


def summarize_runs(runs: list[Path], metric: str, comparisons: list[tuple[str, str]] | None = None,
                   classes: set[str] | None = None) -> list[dict]:
    rows = []
    for b, a in comparisons or COMPARISONS:
        per_seed = {str(run): diffs for run in runs if (diffs := seed_differences(run, b, a, metric, classes)) is not None}
        if not per_seed:
            continue
        keys = set.intersection(*(set(diffs) for diffs in per_seed.values()))
        if any(len(diffs) != len(keys) for diffs in per_seed.values()):
            raise SystemExit(f"{b} vs {a}: the runs score different test sources; compare runs on the same test mixtures")
        seed_means = {run: mean_se(list(diffs.values())) for run, diffs in per_seed.items()}
        pooled = mean_se([statistics.fmean(diffs[key] for diffs in per_seed.values()) for key in keys])
        means = [mean for mean, _ in seed_means.values()]
        between = (statistics.fmean(means), statistics.stdev(means) / math.sqrt(len(means))) if len(means) > 1 else (means[0], math.nan)
        rows.append({"variant": b, "vs": a, "seeds": len(per_seed), "sources": len(keys),
                     "per_seed": {run: {"mean": m, "se": se} for run, (m, se) in seed_means.items()},
                     "pooled": {"mean": pooled[0], "se": pooled[1]}, "between_seeds": {"mean": between[0], "sem": between[1]}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="rl_reward_experiments.py --out directories, one per seed")
    parser.add_argument("--metric", default="si_sdri")
    parser.add_argument("--compare", nargs="*", metavar="B:A", help="report pairs to compare (default: the RL variants against the start, and anchor_sisdr:sisdr)")
    parser.add_argument("--classes", metavar="A,B,...", help="only the sources of these classes (comma-separated)")
    parser.add_argument("--json", help="write the numbers here too")
    args = parser.parse_args()
    comparisons = [tuple(pair.split(":", 1)) for pair in args.compare] if args.compare else None
    if comparisons and any(len(pair) != 2 for pair in comparisons):
        raise SystemExit("--compare takes B:A pairs of eval-report names, e.g. adapted:start")
    rows = summarize_runs(args.runs, args.metric, comparisons, class_set(args.classes))
    if not rows:
        raise SystemExit("no run has a variant's eval report beside its eval-start report")
    print(f"| variant | vs | seeds | per seed ({args.metric}) | pooled per source | between seeds (mean ± SEM) |\n|---|---|---:|---|---:|---:|")
    for row in rows:
        seeds = ", ".join(f"{v['mean']:+.2f} ± {v['se']:.2f}" for v in row["per_seed"].values())
        between = row["between_seeds"]
        print(f"| {row['variant']} | {row['vs']} | {row['seeds']} | {seeds} | {row['pooled']['mean']:+.2f} ± {row['pooled']['se']:.2f} | "
              f"{between['mean']:+.2f} ± {between['sem']:.2f} |")
    if args.json:
        from marsctl.files import write_json_atomic

        write_json_atomic(args.json, finite_or_none({"metric": args.metric, "runs": [str(run) for run in args.runs], "rows": rows}))


if __name__ == "__main__":
    main()
