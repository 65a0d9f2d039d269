"""``marsctl train``: supervised training of the separator (``sup``) and MARS-Sep RL fine-tuning (``rl``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import typer

from marsctl.cli.common import console, user_errors
from marsctl.cli.launch import Launch, resolve_spec, training_stage, with_launch_options

train_app = typer.Typer(
    help="Train separators: 'sup' (supervised, the RL starting point), then 'rl' (MARS-Sep RL fine-tuning).",
    no_args_is_help=True,
    rich_markup_mode="rich",
)

DATA_OPTION = typer.Option(None, "--data", "-d", metavar="DIR", help="Dataset from 'marsctl data build' (or a Hub dataset id).")
MAX_STEPS_OPTION = typer.Option(None, "--max-steps", metavar="N", help="Total optimizer steps.")
BATCH_SIZE_OPTION = typer.Option(None, "--batch-size", metavar="N", help="Mixtures per step and process.")

SUP_HELP = (
    "Train a query-conditioned separator with supervision (OmniSep weighted-BCE mask loss).\n\n"
    "Example: [bold]marsctl train sup --recipe recipes/train/soundfont-small.yaml --data data/soundfont --out runs/sup[/]\n\n"
    "Re-running the same command after an interruption resumes from the last checkpoint. The run directory is itself "
    "a model: pass it to 'marsctl separate --model' or 'marsctl eval --model'."
)


@train_app.command("sup", help=SUP_HELP)
@with_launch_options
def sup(
    data: Optional[str] = DATA_OPTION,
    out: Path = typer.Option(..., "--out", "-o", metavar="DIR", help="Run directory: the best model, checkpoints/, tensorboard/, metrics.jsonl."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", metavar="YAML", help="Training recipe (a YAML file like those in recipes/train/); the options below override it."),
    encoder: Optional[str] = typer.Option(None, "--encoder", metavar="SPEC", help="Query encoder: an aligned encoder directory, 'builtin' or 'laion-clap:630k-audioset'."),
    max_steps: Optional[int] = MAX_STEPS_OPTION,
    batch_size: Optional[int] = BATCH_SIZE_OPTION,
    learning_rate: Optional[float] = typer.Option(None, "--lr", metavar="X", help="Peak AdamW learning rate (after warmup)."),
    seed: Optional[int] = typer.Option(None, "--seed", metavar="N", help="Seed for mixing, query weights and initialisation."),
    init_model: Optional[str] = typer.Option(None, "--init-model", metavar="MODEL", help="Warm start from this separator's weights: 'default' (shipped), a 'train sup' run directory or a Hub id; the architecture must match the recipe's."),
    **launch_options: Any,
) -> None:
    from marsctl.train.supervised import load_supervised_config, train_supervised

    options = {"data": data, "encoder": encoder, "max_steps": max_steps, "batch_size": batch_size, "learning_rate": learning_rate,
               "seed": seed, "init_model": init_model}
    flags = {"data": "--data", "encoder": "--encoder", "max_steps": "--max-steps", "batch_size": "--batch-size",
             "learning_rate": "--lr", "seed": "--seed", "init_model": "--init-model"}

    def load(overrides: dict[str, Any]):
        overrides = {**overrides, "data": resolve_spec(data, "dataset") if data else None,
                     "init_model": resolve_spec(init_model, "model") if init_model and init_model != "default" else init_model}
        config = load_supervised_config(recipe, overrides)
        if not config.data:
            raise typer.BadParameter("--data is required (or set 'data' in the recipe)")
        return config

    def train(config) -> dict:
        result = train_supervised(config, out, device=launch_options["device"], resume=launch_options["resume"],
                                  log=lambda message: console.print(message, highlight=False))
        if result.best_si_sdri is not None:
            say(f"done: step {result.step}, best validation SI-SDRi {result.best_si_sdri:.2f} dB; model in {out}")
        else:
            say(f"done: step {result.step}; model in {out}")
        return {"step": result.step, "best_val_si_sdri_db": result.best_si_sdri}

    def identity(config) -> tuple[dict, dict]:
        from marsctl.config import to_mapping
        from marsctl.hub import optional_artifact

        encoder_dir = optional_artifact(config.encoder, "model")
        init_dir = optional_artifact(config.init_model, "model")
        # paths and worker counts do not change the result; the data, encoder and starting weights are fingerprinted as inputs
        inputs = {"data": Path(config.data) if config.data else None, "encoder": encoder_dir, "init_model": init_dir}
        return {**to_mapping(config), "data": None, "num_workers": None, "encoder": None if encoder_dir else config.encoder,
                "init_model": None if init_dir else config.init_model}, inputs

    with user_errors():
        _run(["train", "sup"], launch_options, out, recipe, options, flags, load, train, identity,
             stage="train.sup", kind="separator", reused_what="the separator trained with the same config and data")


RL_HELP = (
    "Fine-tune a supervised separator with reinforcement learning (MARS-Sep).\n\n"
    "For each mixture one forward pass gives a Beta mask policy; G masks are sampled from it and scored by the "
    "registered reward terms (semantic anchor similarity, query similarity, SI-SDR against the known target, an "
    "energy guard against reward hacking; weights under 'rewards:' in the recipe). The default estimator, "
    "'pathwise', differentiates the rewards through reparameterized masks; 'score_function' is the paper's clipped "
    "surrogate with an entropy bonus and a KL penalty to the starting model. What each gains: docs/results.md.\n\n"
    "Example: [bold]marsctl train rl --init-model runs/sup --reward-encoder runs/align/encoder --data data/soundfont --out runs/rl[/]\n\n"
    "On a CPU, from the packaged default model (a few minutes): "
    "[bold]marsctl train rl --recipe recipes/train/rl-soundfont-small.yaml --data data/soundfont --out runs/rl[/]\n\n"
    "On a plain folder of mixtures (no references): give --queries, a CSV of 'path,query' rows as for 'marsctl "
    "separate --queries', and reward terms that need no reference (recipe rl-folder): "
    "[bold]marsctl train rl --recipe rl-folder --init-model runs/sup --reward-encoder runs/align/encoder --data mixes/ "
    "--queries mixes/queries.csv --out runs/rl-folder[/]\n\n"
    "Re-running the same command after an interruption resumes from the last checkpoint. The run directory is itself "
    "a model for 'marsctl separate --model' and 'marsctl eval --model'."
)


@train_app.command("rl", help=RL_HELP)
@with_launch_options
def rl(
    init_model: Optional[str] = typer.Option(None, "--init-model", metavar="MODEL", help="Starting separator: 'default' (shipped), a 'train sup' run directory or a Hub id; also the reference policy of the KL term."),
    data: Optional[str] = typer.Option(None, "--data", "-d", metavar="DIR", help="Dataset from 'marsctl data build' (or a Hub dataset id), or a plain folder of mixtures with --queries."),
    queries: Optional[str] = typer.Option(None, "--queries", metavar="FILE", help="Per-file queries for a plain folder given as --data (CSV/TSV/JSON, as for 'marsctl separate --queries'): fine-tunes with reference-free reward terms only; validation logs the mean reward terms on held-out files (no SI-SDRi)."),
    out: Path = typer.Option(..., "--out", "-o", metavar="DIR", help="Run directory: the fine-tuned model, checkpoints/, tensorboard/, metrics.jsonl."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", metavar="YAML", help="RL recipe (a YAML file like recipes/train/rl.yaml); the options below override it."),
    reward_encoder: Optional[str] = typer.Option(None, "--reward-encoder", metavar="SPEC", help="Frozen reward encoder: an aligned encoder directory from 'marsctl align' (default: the query encoder)."),
    encoder: Optional[str] = typer.Option(None, "--encoder", metavar="SPEC", help="Query encoder (default: the one the starting separator was trained with)."),
    group_size: Optional[int] = typer.Option(None, "--group-size", "-G", metavar="G", help="Masks sampled per mixture from one forward pass (default 8)."),
    ppo_epochs: Optional[int] = typer.Option(None, "--ppo-epochs", "-K", metavar="K", help="Optimization epochs per rollout batch (default 1)."),
    max_steps: Optional[int] = MAX_STEPS_OPTION,
    batch_size: Optional[int] = BATCH_SIZE_OPTION,
    learning_rate: Optional[float] = typer.Option(None, "--lr", metavar="X", help="Peak AdamW learning rate (default 2e-4)."),
    baseline: Optional[str] = typer.Option(None, "--baseline", metavar="NAME", help="'group' (advantages centred on the group mean) or 'moving_average' (the paper's baseline)."),
    estimator: Optional[str] = typer.Option(None, "--estimator", metavar="NAME", help="'pathwise' (default: rewards differentiated through the sampled masks) or 'score_function' (the paper's clipped surrogate; any reward)."),
    seed: Optional[int] = typer.Option(None, "--seed", metavar="N", help="Seed for mixing, targets and mask sampling."),
    **launch_options: Any,
) -> None:
    from marsctl.rl.trainer import load_rl_config, train_rl

    options = {"init_model": init_model, "data": data, "queries": queries, "reward_encoder": reward_encoder, "encoder": encoder, "group_size": group_size,
               "ppo_epochs": ppo_epochs, "max_steps": max_steps, "batch_size": batch_size, "learning_rate": learning_rate,
               "baseline": baseline, "estimator": estimator, "seed": seed}
    flags = {"init_model": "--init-model", "data": "--data", "queries": "--queries", "reward_encoder": "--reward-encoder", "encoder": "--encoder",
             "group_size": "--group-size", "ppo_epochs": "--ppo-epochs", "max_steps": "--max-steps", "batch_size": "--batch-size",
             "learning_rate": "--lr", "baseline": "--baseline", "estimator": "--estimator", "seed": "--seed"}

    def load(overrides: dict[str, Any]):
        for key, repo_type in (("init_model", "model"), ("data", "dataset"), ("reward_encoder", "model")):
            if overrides.get(key) and overrides[key] != "default":
                overrides[key] = resolve_spec(overrides[key], repo_type)
        config = load_rl_config(recipe, overrides)
        if not config.data:
            raise typer.BadParameter("--data is required (or set 'data' in the recipe)")
        if not config.init_model:
            raise typer.BadParameter("--init-model is required (or set 'init_model' in the recipe)")
        return config

    def train(config) -> dict:
        result = train_rl(config, out, device=launch_options["device"], resume=launch_options["resume"],
                          log=lambda message: console.print(message, highlight=False))
        final = next((h for h in reversed(result.history) if "val_reward" in h), None)
        if final is not None and "val_si_sdri" not in final:  # a plain folder (--queries): no references, no SI-SDRi
            say(f"done: step {result.step}, validation reward {final['val_reward']:.4f} on held-out files; model in {out}")
            return {"step": result.step, "val_reward": final["val_reward"]}
        if final is not None:
            say(f"done: step {result.step}, validation reward {final['val_reward']:.4f}, SI-SDRi {final['val_si_sdri']:.2f} dB; model in {out}")
            return {"step": result.step, "val_reward": final["val_reward"], "val_si_sdri_db": final["val_si_sdri"]}
        say(f"done: step {result.step}; model in {out}")
        return {"step": result.step}

    def identity(config) -> tuple[dict, dict]:
        from marsctl.config import to_mapping
        from marsctl.hub import optional_artifact

        inputs = {key: optional_artifact(getattr(config, key), repo_type)
                  for key, repo_type in (("init_model", "model"), ("data", "dataset"), ("reward_encoder", "model"), ("encoder", "model"))}
        inputs["queries"] = Path(config.queries) if config.queries else None  # the per-file queries of a plain folder
        # artifact paths are fingerprinted as inputs; worker counts do not change the result
        return {**to_mapping(config), "num_workers": None, **{k: None for k, v in inputs.items() if v is not None}}, inputs

    with user_errors():
        _run(["train", "rl"], launch_options, out, recipe, options, flags, load, train, identity,
             stage="train.rl", kind="rl-policy", reused_what="the policy fine-tuned with the same config and inputs")


def say(message: str) -> None:
    """The final line of a training command: printed by rank 0 only (the others' history is not the run's)."""
    from marsctl.train.distributed import process_rank

    if process_rank() == 0:
        console.print(message, highlight=False)


def _run(command: list[str], launch_options: dict[str, Any], out: Path, recipe: Optional[Path], options: dict[str, Any],
         flags: dict[str, str], load: Callable, train: Callable, identity: Callable, **stage: Any) -> None:
    """Run a training command: here, or re-launched under torchrun (``--gpus/--procs/--nnodes``); with
    ``--reuse`` / ``--push-to`` handled once, by the launching process of node 0."""
    from marsctl.train.distributed import under_torchrun

    launch = Launch(*(launch_options[k] for k in ("gpus", "procs", "nnodes", "node_rank", "master_addr", "master_port")))
    device, resume, num_workers = launch_options["device"], launch_options["resume"], launch_options["num_workers"]
    hub = {"push_to": launch_options["push_to"], "reuse": launch_options["reuse"], **stage}
    if launch.relaunch_needed():
        from marsctl.train.distributed import check_cuda

        check_cuda(device or ("cuda" if launch.gpus > 1 else None), launch.gpus)  # one line, before torchrun starts
        given = [("--recipe", recipe), *((flags[k], v) for k, v in options.items()), ("--num-workers", num_workers)]
        child = launch.child_command([*command, "--out", str(out)], given, device, resume)
        if launch.node_rank == 0:
            training_stage(load(dict(options)), identity, out, lambda: launch.run(child), world_size=launch.world_size, **hub)
        else:
            launch.run(child)
        return
    from marsctl.train.distributed import check_cuda

    check_cuda(device)
    config = load({**options, "num_workers": num_workers})
    if under_torchrun():  # one rank of a distributed run: the launching process does the rest
        train(config)
        return
    training_stage(load(dict(options)), identity, out, lambda: train(config), world_size=1, **hub)


def register(app: typer.Typer) -> None:
    app.add_typer(train_app, name="train")
