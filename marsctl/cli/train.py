"""``marsctl train``: supervised training of the separator (``sup``); RL fine-tuning registers here too."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from marsctl.cli.common import console, user_errors
from marsctl.cli.hub import PUSH_TO_OPTION, REUSE_OPTION
from marsctl.cli.launch import (
    DEVICE_OPTION,
    GPUS_OPTION,
    MASTER_ADDR_OPTION,
    MASTER_PORT_OPTION,
    NNODES_OPTION,
    NODE_RANK_OPTION,
    NUM_WORKERS_OPTION,
    PROCS_OPTION,
    Launch,
    resolve_spec,
)

train_app = typer.Typer(
    help="Train separators: 'sup' (supervised, the RL starting point), then 'rl' (MARS-Sep RL fine-tuning).",
    no_args_is_help=True,
    rich_markup_mode="rich",
)


@train_app.command("sup")
def sup(
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Dataset directory from 'marsctl data build' (or a Hub dataset id)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory: the best model, checkpoints/, tensorboard/ and history.json go here."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", help="Training recipe YAML (e.g. recipes/train/soundfont-small.yaml); options below override it."),
    encoder: Optional[str] = typer.Option(None, "--encoder", help="Query encoder: an aligned encoder directory, 'builtin' or 'laion-clap:630k-audioset'."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Total optimizer steps."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Mixtures per step and process."),
    learning_rate: Optional[float] = typer.Option(None, "--lr", help="Peak AdamW learning rate (after warmup)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for mixing, query weights and initialisation."),
    num_workers: Optional[int] = NUM_WORKERS_OPTION,
    device: Optional[str] = DEVICE_OPTION,
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from the latest checkpoint in --out (default), or start over (--no-resume deletes the old checkpoints)."),
    gpus: int = GPUS_OPTION,
    procs: int = PROCS_OPTION,
    nnodes: int = NNODES_OPTION,
    node_rank: int = NODE_RANK_OPTION,
    master_addr: str = MASTER_ADDR_OPTION,
    master_port: int = MASTER_PORT_OPTION,
    push_to: Optional[str] = PUSH_TO_OPTION,
    reuse: bool = REUSE_OPTION,
) -> None:
    """Train a query-conditioned separator with supervision (OmniSep weighted-BCE mask loss).

    Example: [bold]marsctl train sup --recipe recipes/train/soundfont-small.yaml --data data/soundfont --out runs/sup[/]

    Re-running the same command after an interruption resumes from the last checkpoint.
    The run directory is itself a model: pass it to 'marsctl separate --model' or 'marsctl eval --model'.
    """
    from marsctl.train.distributed import under_torchrun
    from marsctl.train.supervised import load_supervised_config, train_supervised

    launch = Launch(gpus, procs, nnodes, node_rank, master_addr, master_port)
    with user_errors():
        if launch.relaunch_needed():
            child = launch.child_command(
                ["train", "sup", "--out", str(out)],
                [("--data", data), ("--recipe", recipe), ("--encoder", encoder), ("--max-steps", max_steps), ("--batch-size", batch_size),
                 ("--lr", learning_rate), ("--seed", seed), ("--num-workers", num_workers)],
                device, resume,
            )
            if node_rank == 0:  # --reuse / --push-to / provenance.json: once, from the launching process of node 0
                _sup_stage(data, recipe, encoder, max_steps, batch_size, learning_rate, seed, out, lambda: launch.run(child), push_to, reuse,
                           world_size=launch.world_size)
            else:
                launch.run(child)
            return
        overrides = {
            "data": resolve_spec(data, "dataset") if data else None,
            "encoder": encoder,
            "max_steps": max_steps,
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "seed": seed,
            "num_workers": num_workers,
        }
        config = load_supervised_config(recipe, overrides)
        if not config.data:
            raise typer.BadParameter("--data is required (or set 'data' in the recipe)")

        def _train() -> dict:
            result = train_supervised(config, out, device=device, resume=resume)
            if result.run_dir and (result.best_si_sdri is not None):
                console.print(f"done: step {result.step}, best validation SI-SDRi {result.best_si_sdri:.2f} dB; model in {out}")
            else:
                console.print(f"done: step {result.step}; model in {out}")
            return {"step": result.step, "best_val_si_sdri_db": result.best_si_sdri}

        if under_torchrun():  # one rank of a distributed run: the launching process does the rest
            _train()
            return
        _sup_stage(data, recipe, encoder, max_steps, batch_size, learning_rate, seed, out, _train, push_to, reuse,
                   world_size=1)


def _sup_stage(data, recipe, encoder, max_steps, batch_size, learning_rate, seed, out, run, push_to, reuse, *,
               world_size: int) -> None:
    """``--reuse`` / ``--push-to`` around a supervised run, keyed by the training config, the data and the encoder."""
    from marsctl.config import to_mapping
    from marsctl.hub import optional_artifact, run_stage
    from marsctl.train.supervised import load_supervised_config

    overrides = {"data": resolve_spec(data, "dataset") if data else None, "encoder": encoder, "max_steps": max_steps,
                 "batch_size": batch_size, "learning_rate": learning_rate, "seed": seed}
    config = load_supervised_config(recipe, overrides)
    encoder_dir = optional_artifact(config.encoder, "model")
    # paths and worker counts do not change the result; the data and encoder are fingerprinted as inputs
    identity = {**to_mapping(config), "data": None, "num_workers": None, "encoder": None if encoder_dir else config.encoder,
                "world_size": world_size}  # batch_size is per process
    inputs = {"data": Path(config.data) if config.data else None, "encoder": encoder_dir}
    outcome = run_stage("train.sup", identity, inputs, out, run, kind="separator", reuse=reuse, push_to=push_to)
    if outcome.reused:
        console.print(f"reused the separator trained with the same config and data: {outcome.path}", highlight=False)
    if outcome.pushed is not None:
        console.print(f"pushed to the Hub: {outcome.pushed.spec}", highlight=False)


def register(app: typer.Typer) -> None:
    from marsctl.cli.train_rl import register_rl  # `marsctl train rl` (RL fine-tuning) lives in its own module

    if not any(command.name == "rl" for command in train_app.registered_commands):
        register_rl(train_app)
    app.add_typer(train_app, name="train")
