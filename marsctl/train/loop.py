"""The training loop of ``train sup`` and ``train rl``: one loop, two step functions.

A trainer describes itself as a :class:`TrainingTask` (its model, its step function, its
validation and how it saves its artifact); :func:`run_training` does the rest, the same way
for both:

* a lock on the run directory (a second run into the same ``--out`` is refused), and a user's
  non-empty folder refused as ``--out`` (:mod:`marsctl.train.safety`);
* a stop at the first non-finite loss (the task raises :class:`~marsctl.train.safety.NonFiniteLoss`
  before its optimizer step), with one line naming the step and the last good checkpoint; weights
  that are not finite are never checkpointed or saved;
* AdamW with linear warmup and cosine decay (``TrainingLoopConfig.lr_lambda``);
* exact resume from the latest complete checkpoint, chosen by rank 0 for every rank (model,
  optimizer, scheduler, RNG state, history, the task's own state), refused when a setting in
  ``task.resume_keys`` or the number of processes changed;
* DDP under torchrun (only rank 0 validates, writes files and shows progress);
* no host sync on unlogged steps (the step time is synchronized on logged steps only);
* the step-indexed batch order (:class:`~marsctl.train.data.StepBatchSampler`);
* validation every ``val_every`` steps (and at step 0 when the task asks for it), the best
  validation SI-SDRi, checkpoints every ``checkpoint_every`` steps;
* logging: ``metrics.jsonl`` (one line per logged step), TensorBoard scalars (``train/*`` and
  ``val/*``), ``history.json`` at the end, and a progress bar.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from marsctl.config import SignalConfig, to_mapping
from marsctl.errors import MarsctlError
from marsctl.files import write_json_atomic, write_text_atomic
from marsctl.models.separator import Separator
from marsctl.progress import StepProgress
from marsctl.train import checkpoint as ckpt
from marsctl.train.curves import write_curves
from marsctl.train.data import EpochIndexedDataset, StepBatchSampler, collate, fixed_mixtures, mixing_dataset
from marsctl.train.distributed import DistributedContext
from marsctl.train.lock import RunLock
from marsctl.recorded_paths import portable_mapping
from marsctl.train.safety import NonFiniteLoss, check_finite_weights, check_run_folder, clear_checkpoints, stop_message
from marsctl.train.loop_config import TrainingLoopConfig

#: seeds of one step: stream s of rank r at step t is seed * 1_000_003 + t * 9_973 + r * RANK_STRIDE + s
SEED_STREAMS = 2
RANK_STRIDE = SEED_STREAMS  # rank r's streams never meet rank r+1's
_STEP_STRIDE = 9_973


def step_seed(seed: int, step: int, rank: int = 0, stream: int = 0, world_size: int = 1) -> int:
    """The seed of random stream ``stream`` (< SEED_STREAMS) of ``rank`` at ``step``: distinct for every
    (step, rank, stream) of a run with at most 9_973 / SEED_STREAMS processes. (RL: stream 0 draws the
    queries and targets, stream 1 the masks.)"""
    if not 0 <= stream < SEED_STREAMS:
        raise ValueError(f"stream must be in 0..{SEED_STREAMS - 1}, got {stream}")
    if world_size * RANK_STRIDE > _STEP_STRIDE:
        raise MarsctlError(f"at most {_STEP_STRIDE // RANK_STRIDE} processes per run, got {world_size}")
    return seed * 1_000_003 + step * _STEP_STRIDE + rank * RANK_STRIDE + stream


@dataclasses.dataclass
class Scores:
    """Validation SI-SDRi (dB): the best so far and the latest, None before the first validation."""

    best: float | None = None
    last: float | None = None


class TrainingTask(Protocol):
    """What a trainer gives the loop. A task may also define ``training_data(is_main)`` returning
    (its training Dataset, its validation set, the collate function) to bring its own data instead
    of the dataset's dynamic mixing (``train rl`` on a plain folder: :mod:`marsctl.rl.folder_data`)."""

    #: shown on the progress bar ("train sup")
    title: str
    model: Separator
    signal: SignalConfig
    #: settings that must equal the checkpoint's to resume
    resume_keys: tuple[str, ...]
    #: validate before the first step too (every validation curve starts at step 0)
    validate_at_start: bool
    #: "best": the run directory holds the model of the best validation SI-SDRi; "latest": the latest checkpoint's
    artifact: str

    def train_step(self, step: int, batch: dict[str, Any], train_model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   log: bool) -> dict[str, Any]:
        """One step of ``optimizer`` (``train_model`` is the model or its DDP wrapper); the metrics to log when ``log``."""

    def validate(self, val_set: list) -> dict[str, float]:
        """``val_*`` metrics on the fixed validation mixtures, ``val_si_sdri`` among them."""

    def save_artifact(self, directory: Path, step: int, scores: Scores) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        """The task's own state for the checkpoint (merged into the training state)."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def status(self, record: dict[str, Any], scores: Scores) -> str | None:
        """The progress bar's status after a logged step (None: unchanged)."""


@dataclasses.dataclass
class LoopResult:
    step: int
    scores: Scores
    history: list[dict[str, Any]]


def require_dataset(data: str) -> Path:
    dataset_dir = Path(data)
    if not dataset_dir.is_dir():
        raise MarsctlError(f"{dataset_dir}: no such dataset directory")
    return dataset_dir


def resume_state(run_dir: Path, ctx: DistributedContext, log: Callable[[str], None]) -> dict[str, Any] | None:
    """The training state to resume from, the same step on every rank (None: start at step 0).

    Rank 0 picks the latest *complete* checkpoint (a missing, truncated or unreadable model file or
    training state falls back to the previous step, with one line saying so) and broadcasts its
    step; every other rank reads that step and fails loudly, with every rank, when it cannot (a rank
    that resumed from its own latest would train other parameters and hang in a collective)."""
    chosen, state = -1, None
    if ctx.is_main:
        for step in reversed(ckpt.list_checkpoints(run_dir)):
            try:
                state = ckpt.read_checkpoint(ckpt.checkpoint_dir(run_dir, step))
            except MarsctlError as exc:
                log(f"{exc}: skipping this checkpoint, resuming from an earlier complete one")
                continue
            chosen = step
            break
        if chosen < 0 and ckpt.list_checkpoints(run_dir):
            log(f"{run_dir}: no complete checkpoint to resume from; starting at step 0")
    chosen = ctx.broadcast_int(chosen)
    problem = None
    if not ctx.is_main and chosen >= 0:
        try:
            state = ckpt.read_checkpoint(ckpt.checkpoint_dir(run_dir, chosen))
        except MarsctlError as exc:
            problem = str(exc)
    if not ctx.all_true(problem is None):
        raise MarsctlError(f"rank {ctx.rank}: cannot read checkpoint step {chosen}, which rank 0 resumes from: {problem}" if problem else
                           f"rank {ctx.rank}: another rank cannot read checkpoint step {chosen} of {run_dir}, which rank 0 resumes from")
    return state


def check_world_size(run_dir: Path, state: dict[str, Any], world_size: int) -> None:
    """Refuse to resume with another number of processes than the checkpoint's: the global batch and
    the step-indexed sampler's order would change (skipped and repeated items)."""
    saved = state.get("world_size")
    if saved is not None and int(saved) != world_size:
        raise MarsctlError(f"{run_dir}: cannot resume, the checkpoint was trained by {saved} process(es) and this run has {world_size} "
                           f"(the global batch and the data order would change); relaunch with {saved} (--gpus/--procs) or use a new --out")


def restore_checkpoint(directory: Path, state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       scheduler: Any, device: torch.device) -> None:
    """Load a checkpoint's model, optimizer, scheduler and RNG states. ``state`` is on the CPU (the
    RNG states must be CPU tensors, and AdamW keeps its ``step`` on the CPU: one on the GPU costs a
    sync per parameter per step); ``load_state_dict`` moves the moments to the parameters' device."""
    from safetensors.torch import load_file

    weights_device = next(model.parameters()).device
    model.load_state_dict(load_file(str(Path(directory) / ckpt.MODEL_FILE), device=str(weights_device)))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    ckpt.set_rng_state(state["rng"], device)


def wrap_ddp(model: torch.nn.Module, ctx: DistributedContext) -> torch.nn.Module:
    """``model`` under DDP when there are several processes (else itself). Buffers are broadcast from
    rank 0 only when the model trains them: RL runs its BatchNorm in inference mode (frozen statistics)."""
    if not ctx.enabled:
        return model
    return DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                                   broadcast_buffers=model.training)


def run_training(
    task: TrainingTask,
    config: TrainingLoopConfig,
    run_dir: str | Path,
    ctx: DistributedContext,
    resume: bool = True,
    progress: bool = True,
    on_step_end: Callable[[int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> LoopResult:
    """Train ``task.model`` into ``run_dir`` (see the module docstring); closes ``ctx`` at the end."""
    run_dir = Path(run_dir)
    if ctx.is_main:
        check_run_folder(run_dir)  # a user's folder is refused before anything is written into it
    lock = RunLock(run_dir) if ctx.is_main else None
    try:
        if lock is not None:
            lock.acquire()
        ctx.barrier()
        return _train(task, config, run_dir, ctx, resume, progress, on_step_end, log or (lambda message: None))
    finally:
        if lock is not None:
            lock.release()
        ctx.close()


def _train(task, config, run_dir: Path, ctx: DistributedContext, resume, progress, on_step_end, log) -> LoopResult:
    from torch.utils.tensorboard import SummaryWriter

    model = task.model
    dataset_dir = require_dataset(config.data)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, config.lr_lambda())
    start_step, scores, history = 0, Scores(), []

    if not resume and ctx.is_main:
        clear_checkpoints(run_dir)  # starting over: old steps must not be resumed later (other files stay)
    ctx.barrier()
    state = resume_state(run_dir, ctx, log) if resume else None
    if state is not None:
        saved, current = state.get("config", {}), to_mapping(config)
        for key in task.resume_keys:
            if key in saved and saved[key] != current[key]:
                raise MarsctlError(f"{run_dir}: cannot resume, '{key}' differs from the checkpoint's; use a new --out or --no-resume")
        check_world_size(run_dir, state, ctx.world_size)
        restore_checkpoint(ckpt.checkpoint_dir(run_dir, int(state["step"])), state, model, optimizer, scheduler, ctx.device)
        task.load_state_dict(state)
        start_step, history = int(state["step"]), list(state.get("history", []))
        scores = Scores(best=state.get("best_si_sdri"), last=next((h["val_si_sdri"] for h in reversed(history) if "val_si_sdri" in h), None))
        log(f"resuming from {ckpt.checkpoint_dir(run_dir, start_step)} (step {start_step})")

    log(f"precision: {'bf16 autocast' if getattr(task, 'use_bf16', False) else 'fp32'} on {ctx.device}")
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest convolutions once
    train_model = wrap_ddp(model, ctx)

    # a task may bring its own data (train rl on a plain folder): (training Dataset, validation set, collate)
    own_data = getattr(task, "training_data", None)
    if own_data is not None:
        base, val_set, collate_items = own_data(ctx.is_main)
    else:
        # the recipe's augment section changes the training mixtures only (never val_set's)
        augment = getattr(config, "augment", None)
        base, collate_items = mixing_dataset(dataset_dir, "train", task.signal, config.num_sources, seed=config.seed, augment=augment), collate
        val_set = fixed_mixtures(dataset_dir, config.val_split, task.signal, config.val_mixtures, config.num_sources) if ctx.is_main else []
    dataset = EpochIndexedDataset(base)
    sampler = StepBatchSampler(len(dataset), config.batch_size, config.seed, start_step, config.max_steps, ctx.rank, ctx.world_size)
    # the loader draws its workers' base seed from its own generator, not from the global RNG (which
    # the checkpoint restores): a resumed run's RNG then goes through exactly the uninterrupted run's draws
    loader_seeds = torch.Generator().manual_seed(step_seed(config.seed, start_step, ctx.rank, 0, ctx.world_size))
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_items, num_workers=config.num_workers, persistent_workers=False,
                        generator=loader_seeds, pin_memory=ctx.device.type == "cuda")  # pinned: copies to the GPU without blocking

    writer = SummaryWriter(str(run_dir / "tensorboard")) if ctx.is_main else None
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "train_config.json", portable_mapping(to_mapping(config), run_dir))  # no home paths
        # metrics.jsonl: one line per logged step, for `tail -f`; restarted from the checkpoint's history on resume
        write_text_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))

    def write_record(record: dict[str, Any]) -> None:
        history.append(record)
        with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as metrics_file:
            metrics_file.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and value is not None:
                name = f"val/{key.removeprefix('val_')}" if key.startswith("val_") else f"train/{key}"
                writer.add_scalar(name, value, record["step"])
        if any(key.startswith("val_") for key in record):
            write_curves(run_dir, history)  # curves.png beside TensorBoard

    def validate(step: int) -> dict[str, float]:
        metrics = task.validate(val_set)
        scores.last = metrics.get("val_si_sdri")  # None without references (train rl on a plain folder)
        if scores.last is not None and (scores.best is None or scores.last > scores.best):
            scores.best = scores.last
            if task.artifact == "best":
                check_finite_weights(model, f"{run_dir} (step {step})")
                task.save_artifact(run_dir, step, scores)
        return metrics

    def save_checkpoint(step: int) -> None:
        check_finite_weights(model, f"{ckpt.checkpoint_dir(run_dir, step)}")
        state = {
            "step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": ckpt.rng_state(ctx.device),
            "best_si_sdri": scores.best, "history": history, "config": to_mapping(config), "world_size": ctx.world_size,
            **task.state_dict(),
        }
        ckpt.save_checkpoint(run_dir, step, lambda directory: task.save_artifact(directory, step, scores), state, keep=config.keep_checkpoints)

    bar = StepProgress(task.title, config.max_steps, start_step) if ctx.is_main and progress else None
    if ctx.is_main and start_step == 0 and val_set and task.validate_at_start:
        write_record({"step": 0, **validate(0)})

    step = start_step
    step_seconds, steps_timed = 0.0, 0
    try:
        for step, batch in enumerate(loader, start=start_step + 1):
            started = time.perf_counter()
            logged = step % config.log_every == 0 or step == config.max_steps
            try:
                metrics = task.train_step(step, batch, train_model, optimizer, logged)
            except NonFiniteLoss as exc:  # raised before the optimizer applied the step: nothing is saved
                raise MarsctlError(stop_message(run_dir, exc, ckpt.latest_checkpoint(run_dir))) from None
            scheduler.step()
            if logged and ctx.device.type == "cuda":
                # the GPU work queued since the last logged step ends here: their mean time is right
                # without a host sync on every step
                torch.cuda.synchronize(ctx.device)
            step_seconds, steps_timed = step_seconds + time.perf_counter() - started, steps_timed + 1

            record: dict[str, Any] = {}
            if logged:
                record = {"step": step, **metrics, "lr": scheduler.get_last_lr()[0], "step_time_s": step_seconds / steps_timed}
                step_seconds, steps_timed = 0.0, 0
            if ctx.is_main and val_set and (step % config.val_every == 0 or step == config.max_steps):
                record = {**record, "step": step, **validate(step)}
            if ctx.is_main and record:
                write_record(record)
                if bar is not None:
                    bar.update(step, task.status(record, scores))
            if ctx.is_main and (step % config.checkpoint_every == 0 or step == config.max_steps):
                save_checkpoint(step)
                if task.artifact == "latest" or not val_set:
                    task.save_artifact(run_dir, step, scores)
            if bar is not None:
                bar.update(step)
            if on_step_end is not None:
                on_step_end(step)
    finally:
        if bar is not None:
            bar.stop()
        if writer is not None:
            writer.close()
    if ctx.is_main:
        write_json_atomic(run_dir / "history.json", history)
    ctx.barrier()
    return LoopResult(step=step, scores=scores, history=history)
