"""Reference-free RL adaptation to a domain the separator never saw (issue 15, item 5d).

A separator trained without one soundfont (``bench/recipes/loso-opl3-small.yaml``: no OPL-3) is
fine-tuned with ``marsctl train rl --data FOLDER --queries FILE`` on unlabelled OPL-3 mixtures of
the *training* melodies (``bench/recipes/data-opl3-adapt.yaml``, exported here as a plain folder of
mixture files and a queries CSV naming what to extract: what a user has), with reference-free
reward terms only. Both the start and the adapted model are then scored by ``marsctl eval`` on the
held-out OPL-3 test mixtures (other melodies; ``soundfont-loso-opl3-heldout``) with an independent
judge, and compared per source (``bench/paired_difference.py``).

    python bench/rl_domain_adaptation.py --start runs/loso-opl3 --adapt-data data/opl3-adapt \\
        --test-data data/soundfont-loso-opl3-heldout --reward-encoder runs/align-union/encoder \\
        --judge runs/align-union-judge/encoder --out runs/opl3-adaptation [--steps 300] [--set key=value ...]

Every stage resumes: a finished run or report is reused.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

MARSCTL = [sys.executable, "-m", "marsctl"]
BENCH = Path(__file__).resolve().parent


def run(command: list[str]) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def export_folder(dataset: Path, folder: Path, split: str = "train") -> Path:
    """The dataset's fixed ``split`` mixtures as a plain folder (links to the mixture files) and a
    queries CSV with one row per source label: no references, no targets."""
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    rows = [r for r in pq.read_table(dataset / "manifests" / "mixtures.parquet").to_pylist() if r["split"] == split]
    if not rows:
        raise SystemExit(f"{dataset}: no fixed {split} mixtures")
    queries = []
    for row in rows:
        link = folder / f"{row['mixture_id']}.wav"
        if not link.exists():
            os.symlink((dataset / row["mixture_path"]).resolve(), link)
        queries += [{"path": link.name, "query": label} for label in row["source_labels"]]
    path = folder / "queries.csv"
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "query"])
        writer.writeheader()
        writer.writerows(queries)
    tmp.replace(path)
    print(f"{len(rows)} mixtures, {len(queries)} queries -> {folder}")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--start", type=Path, required=True, help="the separator that never saw the new domain")
    parser.add_argument("--adapt-data", type=Path, required=True, help="dataset whose fixed train mixtures are the unlabelled folder")
    parser.add_argument("--test-data", type=Path, required=True, help="held-out test mixtures of the new domain")
    parser.add_argument("--reward-encoder", type=Path, required=True)
    parser.add_argument("--judge", type=Path, required=True)
    parser.add_argument("--recipe", default="rl-folder", help="the RL recipe (name or YAML)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe settings (YAML values)")
    args = parser.parse_args()

    from marsctl.recipe_paths import find_recipe

    args.out.mkdir(parents=True, exist_ok=True)
    queries = export_folder(args.adapt_data, args.out / "folder")
    recipe = yaml.safe_load(find_recipe("train", args.recipe).read_text(encoding="utf-8"))
    recipe.update({k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)})
    recipe["max_steps"] = args.steps
    recipe_path = args.out / "rl-adapt.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    run([*MARSCTL, "train", "rl", "--recipe", str(recipe_path), "--init-model", str(args.start), "--reward-encoder",
         str(args.reward_encoder), "--data", str(args.out / "folder"), "--queries", str(queries), "--out", str(args.out / "adapted")])
    reports = {"start": args.out / "eval-start", "adapted": args.out / "eval-adapted"}
    for name, report in reports.items():
        if not (report / "scores.csv").is_file():
            model = args.start if name == "start" else args.out / "adapted"
            run([*MARSCTL, "eval", "--model", str(model), "--data", str(args.test_data), "--judge", str(args.judge), "--out", str(report)])
    for metric in ("si_sdri", "judge_score"):
        run([sys.executable, str(BENCH / "paired_difference.py"), str(reports["start"] / "scores.csv"),
             str(reports["adapted"] / "scores.csv"), "--metric", metric, "--json", str(args.out / f"paired-{metric}.json")])
    summary = {metric: json.loads((args.out / f"paired-{metric}.json").read_text()) for metric in ("si_sdri", "judge_score")}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
