"""Which reward makes RL improve the separator? Paired experiments from one start (issue 15, item 5).

Each variant fine-tunes the same supervised start with ``marsctl train rl`` (the base recipe with
another reward mix or estimator), then every run and the start are scored by ``marsctl eval
--model`` on the same fixed test mixtures (held-out recording groups and melodies) with an
independent judge encoder, and compared per source against the start (and (c) against SI-SDR
alone) with ``bench/union_breakdown.py``'s paired differences (mean ± SE).

    python bench/rl_reward_experiments.py --start runs/union-small --data data/union \\
        --reward-encoder runs/align-union/encoder --judge runs/align-union-judge/encoder \\
        --out runs/rl-experiments [--steps 150] [--only anchor query] [--set learning_rate=1e-4]

Variants (the reward weights R = sum_i w_i r_i; energy_guard is the guard):
- ``sisdr``: SI-SDR + guard (the earlier RL gain; the reference for (c))
- ``anchor``: (a) the paper's reward: the semantic anchor z* (target audio fused with the text) + guard
- ``query``: (b) reference-free: query similarity (text query only) + guard
- ``anchor_sisdr``: (c) anchor + SI-SDR + guard
- ``query_contrast``: (b') reference-free: the estimate like the query, the residual unlike it + guard
- ``anchor_score_function``: (e) the anchor reward with the paper's score-function estimator
- ``supervised``: not RL, the control for "is RL better than more supervised training?": the start's own
  ``train sup`` recipe (its run's ``train_config.json``) continued from the start for the same steps, mixtures
  per step, peak learning rate and warm-up as the RL variants (it trains both sources of each mixture, so it
  sees twice the targets)

Every stage resumes: a finished run or report is reused. Results: ``<out>/summary.json`` and
``<out>/summary.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

VARIANTS = {
    "sisdr": {"rewards": {"semantic_anchor": 0.0, "query_similarity": 0.0, "si_sdr": 1.0, "energy_guard": 1.0}},
    "anchor": {"rewards": {"semantic_anchor": 1.0, "query_similarity": 0.0, "si_sdr": 0.0, "energy_guard": 1.0}},
    "query": {"rewards": {"semantic_anchor": 0.0, "query_similarity": 1.0, "si_sdr": 0.0, "energy_guard": 1.0}},
    "anchor_sisdr": {"rewards": {"semantic_anchor": 1.0, "query_similarity": 0.0, "si_sdr": 1.0, "energy_guard": 1.0}},
    "query_contrast": {"rewards": {"semantic_anchor": 0.0, "query_similarity": 0.0, "si_sdr": 0.0, "energy_guard": 1.0, "query_contrast": 1.0}},
    "anchor_score_function": {"rewards": {"semantic_anchor": 1.0, "query_similarity": 0.0, "si_sdr": 0.0, "energy_guard": 1.0},
                              "estimator": "score_function", "group_size": 8},
}
#: (variant, compared with): the paired comparisons reported
COMPARISONS = [("sisdr", "start"), ("anchor", "start"), ("query", "start"), ("anchor_sisdr", "start"),
               ("anchor_sisdr", "sisdr"), ("anchor_score_function", "start"), ("query_contrast", "start"),
               ("query_contrast", "query"), ("supervised", "start"), ("sisdr", "supervised"), ("anchor", "supervised"),
               ("anchor_sisdr", "supervised")]
SUPERVISED = "supervised"
MARSCTL = [sys.executable, "-m", "marsctl"]


def run(command: list[str]) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--start", type=Path, required=True, help="the supervised run every variant starts from")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--reward-encoder", type=Path, required=True, help="the aligned encoder RL optimises against")
    parser.add_argument("--judge", type=Path, required=True, help="an independently aligned encoder for eval")
    parser.add_argument("--recipe", type=Path, default=Path(__file__).parents[1] / "recipes" / "train" / "rl-union-small.yaml")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--only", nargs="*", choices=sorted([*VARIANTS, SUPERVISED]), help="run only these variants")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe settings for every variant (YAML values)")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load(args.recipe.read_text(encoding="utf-8"))
    variants = args.only or [*VARIANTS, SUPERVISED]
    reports = {"start": args.out / "eval-start"}
    settings = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    for name in variants:
        if name == SUPERVISED:
            recipe = supervised_control_recipe(args.start, {**base, **settings}, args.steps, args.data)
            recipe_path = args.out / "sup-supervised.yaml"
            command = "sup"
        else:
            recipe = {**base, **settings, **VARIANTS[name], "max_steps": args.steps, "init_model": str(args.start.resolve()),
                      "data": str(args.data.resolve()), "reward_encoder": str(args.reward_encoder.resolve())}
            recipe_path = args.out / f"rl-{name}.yaml"
            command = "rl"
        recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
        run([*MARSCTL, "train", command, "--recipe", str(recipe_path), "--out", str(args.out / name)])
        reports[name] = args.out / f"eval-{name}"
    # variants scored by an earlier invocation into the same --out join the summary
    reports.update({name: args.out / f"eval-{name}" for name in [*VARIANTS, SUPERVISED]
                    if name not in reports and (args.out / f"eval-{name}" / "scores.csv").is_file()})
    for name, report in reports.items():
        if not (report / "scores.csv").is_file():
            model = args.start if name == "start" else args.out / name
            run([*MARSCTL, "eval", "--model", str(model), "--data", str(args.data), "--judge", str(args.judge), "--out", str(report)])
    summary: dict = {"start": str(args.start), "steps": args.steps, "reward_encoder": str(args.reward_encoder),
                     "judge": str(args.judge), "comparisons": {}}
    lines = ["| variant | vs | SI-SDRi difference (dB) | everyday pairs | instrument pairs | judge difference | better |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for variant, other in COMPARISONS:
        if variant not in reports or other not in reports:
            continue
        numbers = {}
        for metric in ("si_sdri", "judge_score"):
            out = args.out / f"paired-{variant}-vs-{other}-{metric}.json"
            run([sys.executable, str(Path(__file__).with_name("union_breakdown.py")), "--data", str(args.data), "--metric", metric,
                 str(reports[other] / "scores.csv"), str(reports[variant] / "scores.csv"), "--json", str(out)])
            numbers[metric] = next(iter(json.loads(out.read_text())["paired"].values()))
        summary["comparisons"][f"{variant} vs {other}"] = numbers
        d, j = numbers["si_sdri"], numbers["judge_score"]

        def cell(entry: dict | None) -> str:
            return f"{entry['mean']:+.2f} ± {entry['se']:.2f}" if entry else ""

        lines.append(f"| {variant} | {other} | {cell(d['all'])} | {cell(d.get('pairs: everyday'))} | {cell(d.get('pairs: instruments'))} | "
                     f"{cell(j['all'])} | {100 * d['better_share']:.0f} % |")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    (args.out / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


def supervised_control_recipe(start: Path, rl_recipe: dict, steps: int, data: Path) -> dict:
    """The start's ``train sup`` recipe (its run's train_config.json) continued from the start with the RL
    variants' budget: steps, mixtures per step, peak learning rate, warm-up, validation cadence."""
    config_path = start / "train_config.json"
    if not config_path.is_file():
        raise SystemExit(f"{config_path}: no such file; the supervised control needs the start's 'train sup' run directory")
    recipe = json.loads(config_path.read_text(encoding="utf-8"))
    recipe.update(init_model=str(start.resolve()), data=str(data.resolve()), max_steps=steps, batch_size=rl_recipe["batch_size"],
                  learning_rate=rl_recipe["learning_rate"], warmup_steps=rl_recipe["warmup_steps"],
                  val_every=rl_recipe["val_every"], val_mixtures=rl_recipe["val_mixtures"],
                  checkpoint_every=rl_recipe["checkpoint_every"], seed=recipe["seed"] + 1)  # not the start's first batches again
    return recipe


if __name__ == "__main__":
    main()
