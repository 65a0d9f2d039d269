"""``marsctl align``: progressive alignment of the reward encoder (stages 1 -> 2 -> 3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from marsctl.cli.common import console, err_console, user_errors
from marsctl.cli.hub import PUSH_TO_OPTION, REUSE_OPTION

ALIGN_HELP = (
    "Align a query/reward encoder on a dataset, in stages: "
    "1 audio<->text (symmetric InfoNCE), 2 audio<->audio of the same class (InfoNCE + triplet + consistency), "
    "3 audio<->image (InfoNCE + triplet). Pretrained trunks stay frozen; projection heads, the temperature, "
    "small from-scratch trunks and the reward anchor z* are trained. Each stage starts from the previous "
    "stage's best checkpoint.\n\n"
    "After every stage it prints and saves text->audio / audio->text R@1 and R@5 on held-out clips and the "
    "target-vs-mixture similarity gap, and zero-shot classification accuracy of clean targets and of their "
    "mixtures (and, with --separator, of a separator's estimates). Rerun the same command after a kill to resume. The aligned encoder is "
    "written to OUT/encoder (use it as --encoder / reward encoder elsewhere).\n\n"
    "Example: marsctl align --encoder builtin --data data/soundfont --stages 1,2 --recipe quick --out runs/align"
)


SUMMARY_METRICS = (
    "text_to_audio_R@1", "text_to_audio_R@5", "audio_to_text_R@1", "audio_to_text_R@5",
    "audio_to_audio_R@1", "audio_to_image_R@1", "image_to_audio_R@1",
    "gap_text", "gap_audio", "gap_anchor", "chance_R@1",
    "zero_shot_target_acc", "zero_shot_mixture_acc", "zero_shot_estimate_acc", "gap_text_estimate",
)


def summary_table(summary: dict[str, Any]) -> Table:
    """Held-out metrics of the starting encoder and after each stage, side by side."""
    columns = [("before", summary.get("initial", {}))]
    columns += [(f"stage {k} {r['name']}", r["report"]) for k, r in summary["stages"].items()]
    split = columns[-1][1].get("split", "?")
    table = Table(title=f"held-out retrieval and target-vs-mixture gap ({split} split)")
    table.add_column("metric")
    for name, _ in columns:
        table.add_column(name, justify="right")
    for key in SUMMARY_METRICS:
        if any(key in metrics for _, metrics in columns):
            table.add_row(key, *(f"{m[key]:.3f}" if key in m else "-" for _, m in columns))
    return table


def align_cmd(
    data: str = typer.Option(
        ..., "--data", "-d",
        help="Dataset built by 'marsctl data build': a directory (with manifests/clips.parquet) or a Hub id org/name[@rev].",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory: checkpoints, logs, metrics.json and the aligned encoder/."),
    encoder: Optional[str] = typer.Option(
        None, "--encoder", "-e",
        help="Starting encoder: 'builtin' (offline), 'aisfx' (offline, aiSFX's pretrained sound-effects CNN as the audio tower; pip install --no-deps aisfx), 'default' (the shipped separator's aligned encoder), 'laion-clap:630k-audioset', 'laion-clap:PATH.pt', or a saved encoder directory. Default: the recipe's.",
    ),
    image_model: Optional[str] = typer.Option(
        None, "--image-model",
        help="With a built-in --encoder: a CLIP-family vision model (local directory or Hub id, e.g. openai/clip-vit-base-patch32) as the frozen image trunk instead of the small CNN.",
    ),
    stages: Optional[str] = typer.Option(None, "--stages", help="Stages to run, e.g. 1,2,3 or 1,2 (audio-only data). Default: the recipe's."),
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="Align recipe: a name in recipes/align (default, quick) or a YAML path."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:1 ... or auto (cuda when available)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (default: the recipe's)."),
    separator: Optional[str] = typer.Option(
        None, "--separator",
        help="Also separate the held-out mixtures once with this separator ('default', a 'marsctl train sup' run directory "
             "or Hub id) and report, after every stage, how often the encoder classifies its estimates as the target class.",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    push_to: Optional[str] = PUSH_TO_OPTION,
    reuse: bool = REUSE_OPTION,
) -> None:
    with user_errors():
        import torch

        from marsctl.align.config import load_align_config, parse_stages
        from marsctl.align.trainer import Reporter, run_alignment
        from marsctl.hub import optional_artifact, resolve_artifact, run_stage

        overrides: dict[str, Any] = {"encoder": encoder, "seed": seed, "image_model": image_model}
        if stages is not None:
            overrides["stages"] = parse_stages(stages)
        if separator is not None:
            overrides["eval"] = {"separator": separator}
        config = load_align_config(recipe, overrides)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        reporter = Reporter(log=lambda line: err_console.print(line, highlight=False, markup=False), progress=not quiet)
        data_dir = resolve_artifact(data, "dataset")
        summary: dict[str, Any] = {}

        def _align() -> dict[str, Any]:
            summary.update(run_alignment(config, data_dir, out, device=device, reporter=reporter))
            return {f"stage{k}": r.get("report", {}) for k, r in summary.get("stages", {}).items()}  # for the card

        # --reuse / --push-to act on the aligned encoder (OUT/encoder), keyed by config + data + starting encoder
        inputs = {"data": data_dir, "encoder": optional_artifact(config.encoder, "model")}
        outcome = run_stage("align", config, inputs, Path(out) / "encoder", _align, kind="reward-encoder",
                            reuse=reuse, push_to=push_to)
        if outcome.reused:
            console.print(f"reused the encoder aligned with the same config and data: {outcome.path}", highlight=False)
            return
        if outcome.pushed is not None:
            console.print(f"pushed to the Hub: {outcome.pushed.spec}", highlight=False)
        console.print(summary_table(summary))
        skipped = {k: v for r in summary["stages"].values() for k, v in r.get("skipped_clips", {}).items()}
        skipped.update(summary.get("skipped_heldout_clips", {}))
        console.print(f"aligned encoder: {summary['final_encoder']}  (metrics: {Path(out) / 'metrics.json'})")
        if skipped:
            err_console.print(f"[yellow]{len(skipped)} clip(s) could not be read and were skipped (listed in metrics.json)")
            raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command(
        "align", help=ALIGN_HELP, no_args_is_help=True,
        short_help="Align the query/reward encoder in stages (audio-text, audio-audio, audio-image).",
    )(align_cmd)
