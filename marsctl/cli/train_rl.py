"""``marsctl train rl``: MARS-Sep RL fine-tuning of a supervised separator (registered under ``train``)."""

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


def rl(
    init_model: Optional[str] = typer.Option(None, "--init-model", "-m", help="Starting separator: a 'marsctl train sup' run directory or Hub id. It is also the frozen reference policy of the KL term."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Dataset directory from 'marsctl data build' (or a Hub dataset id)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory: the fine-tuned model, checkpoints/, tensorboard/, metrics.jsonl and history.json go here."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", help="RL recipe YAML (e.g. recipes/train/rl.yaml); options below override it."),
    reward_encoder: Optional[str] = typer.Option(None, "--reward-encoder", help="Frozen reward encoder: an aligned encoder directory from 'marsctl align' (default: the separator's query encoder)."),
    encoder: Optional[str] = typer.Option(None, "--encoder", help="Query encoder override (default: the one the starting separator was trained with)."),
    group_size: Optional[int] = typer.Option(None, "--group-size", "-G", help="G: masks sampled per mixture from one forward pass (default 8)."),
    ppo_epochs: Optional[int] = typer.Option(None, "--ppo-epochs", "-K", help="K: optimization epochs per rollout batch (default 1)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Total rollout steps."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Mixtures per step and process."),
    learning_rate: Optional[float] = typer.Option(None, "--lr", help="Peak AdamW learning rate (default 2e-4)."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="'group' (advantages centred on the group mean) or 'moving_average' (the paper's beta = 0.92 baseline)."),
    estimator: Optional[str] = typer.Option(None, "--estimator", help="'score_function' (the paper's clipped surrogate; any reward) or 'pathwise' (rewards differentiated through reparameterized masks; measured to work far better, needs differentiable rewards). See BENCHMARKS.md section 5."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for mixing, targets and mask sampling."),
    num_workers: Optional[int] = NUM_WORKERS_OPTION,
    device: Optional[str] = DEVICE_OPTION,
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from the latest checkpoint in --out (default) or start over."),
    gpus: int = GPUS_OPTION,
    procs: int = PROCS_OPTION,
    nnodes: int = NNODES_OPTION,
    node_rank: int = NODE_RANK_OPTION,
    master_addr: str = MASTER_ADDR_OPTION,
    master_port: int = MASTER_PORT_OPTION,
    push_to: Optional[str] = PUSH_TO_OPTION,
    reuse: bool = REUSE_OPTION,
) -> None:
    """Fine-tune a supervised separator with reinforcement learning (MARS-Sep).

    For each mixture one forward pass gives a Beta mask policy; G masks are sampled from it,
    scored by the frozen reward encoder (semantic anchor similarity, query similarity, SI-SDR
    against the known target, an energy guard against reward hacking; weights in the recipe),
    and the policy is updated with a clipped surrogate, an entropy bonus and a KL penalty to
    the starting model (the paper's loss). '--estimator pathwise' instead differentiates the
    rewards through reparameterized masks: measured on a CPU, only that one improved a separator
    (BENCHMARKS.md section 5).

    Example: [bold]marsctl train rl --init-model runs/sup --reward-encoder runs/align/encoder --data data/soundfont --out runs/rl[/]

    On a CPU, from the packaged default model (about 4 minutes, +0.5 dB SI-SDRi on held-out mixtures):
    [bold]marsctl train rl --recipe recipes/train/rl-soundfont-small.yaml --data data/soundfont --out runs/rl[/]

    Re-running the same command after an interruption resumes from the last checkpoint.
    The run directory is itself a model for 'marsctl separate --model' and 'marsctl eval --model'.
    """
    from marsctl.rl.trainer import load_rl_config, train_rl
    from marsctl.train.distributed import under_torchrun

    launch = Launch(gpus, procs, nnodes, node_rank, master_addr, master_port)
    with user_errors():
        if launch.relaunch_needed():
            child = launch.child_command(
                ["train", "rl", "--out", str(out)],
                [("--init-model", init_model), ("--data", data), ("--recipe", recipe), ("--reward-encoder", reward_encoder),
                 ("--encoder", encoder), ("--group-size", group_size), ("--ppo-epochs", ppo_epochs), ("--max-steps", max_steps),
                 ("--batch-size", batch_size), ("--lr", learning_rate), ("--baseline", baseline), ("--estimator", estimator), ("--seed", seed),
                 ("--num-workers", num_workers)],
                device, resume,
            )
            if node_rank == 0:  # --reuse / --push-to / provenance.json: once, from the launching process of node 0
                _rl_stage(recipe, out, lambda: launch.run(child), push_to, reuse, init_model=init_model, data=data,
                          reward_encoder=reward_encoder, encoder=encoder, group_size=group_size, ppo_epochs=ppo_epochs,
                          max_steps=max_steps, batch_size=batch_size, learning_rate=learning_rate, baseline=baseline, estimator=estimator,
                          seed=seed, world_size=launch.world_size)
            else:
                launch.run(child)
            return
        overrides = {
            "init_model": resolve_spec(init_model, "model") if init_model else None,
            "data": resolve_spec(data, "dataset") if data else None,
            "reward_encoder": resolve_spec(reward_encoder, "model") if reward_encoder else None,
            "encoder": encoder,
            "group_size": group_size,
            "ppo_epochs": ppo_epochs,
            "max_steps": max_steps,
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "baseline": baseline,
            "estimator": estimator,
            "seed": seed,
            "num_workers": num_workers,
        }
        config = load_rl_config(recipe, overrides)
        if not config.data:
            raise typer.BadParameter("--data is required (or set 'data' in the recipe)")
        if not config.init_model:
            raise typer.BadParameter("--init-model is required (or set 'init_model' in the recipe)")

        def _train() -> dict:
            result = train_rl(config, out, device=device, resume=resume, log=lambda message: console.print(message, highlight=False))
            final = next((h for h in reversed(result.history) if "val_reward" in h), None)
            if final is not None:
                console.print(f"done: step {result.step}, validation reward {final['val_reward']:.4f}, SI-SDRi {final['val_si_sdri']:.2f} dB; model in {out}")
                return {"step": result.step, "val_reward": final["val_reward"], "val_si_sdri_db": final["val_si_sdri"]}
            console.print(f"done: step {result.step}; model in {out}")
            return {"step": result.step}

        if under_torchrun():  # one rank of a distributed run: the launching process does the rest
            _train()
            return
        _rl_stage(recipe, out, _train, push_to, reuse, world_size=1,
                  **{k: v for k, v in overrides.items() if k != "num_workers"})


def _rl_stage(recipe, out, run, push_to, reuse, *, world_size: int, **overrides) -> None:
    """``--reuse`` / ``--push-to`` around an RL run, keyed by the RL config and its input artifacts."""
    from marsctl.config import to_mapping
    from marsctl.hub import optional_artifact, run_stage
    from marsctl.rl.trainer import load_rl_config

    for key, repo_type in (("init_model", "model"), ("data", "dataset"), ("reward_encoder", "model")):
        if overrides.get(key):
            overrides[key] = resolve_spec(overrides[key], repo_type)
    config = load_rl_config(recipe, overrides)
    inputs = {
        "init_model": optional_artifact(config.init_model, "model"),
        "data": optional_artifact(config.data, "dataset"),
        "reward_encoder": optional_artifact(config.reward_encoder, "model"),
        "encoder": optional_artifact(config.encoder, "model"),
    }
    # artifact paths are fingerprinted as inputs; worker counts do not change the result
    identity = {**to_mapping(config), "num_workers": None, **{k: None for k, v in inputs.items() if v is not None},
                "world_size": world_size}  # batch_size is per process
    outcome = run_stage("train.rl", identity, inputs, out, run, kind="rl-policy", reuse=reuse, push_to=push_to)
    if outcome.reused:
        console.print(f"reused the policy fine-tuned with the same config and inputs: {outcome.path}", highlight=False)
    if outcome.pushed is not None:
        console.print(f"pushed to the Hub: {outcome.pushed.spec}", highlight=False)


def register_rl(train_app: typer.Typer) -> None:
    """Add ``rl`` to the ``marsctl train`` group."""
    train_app.command("rl")(rl)
