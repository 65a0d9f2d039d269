"""Supervised training of the query-conditioned separator (OmniSep / CLIPSep recipe).

One loop, one line per equation:

    X, S_n        STFTs of the mixture and of each source n as it sits in the mix
    |X|~, |S_n|~  magnitudes warped to the log-frequency grid
    q_n           query of source n: normalize(sum_m w_m e_m(n)), w ~ Query-Mixup (random, sum 1)
    z_n           separator logits for (x, q_n); P_n = sigmoid(z_n)
    G_n           = 1[ |S_n|~ > 0.5 |X|~ ]                       binary ground-truth mask
    W             = clamp(log(1 + |X|~), 1e-3, 10)                 loud bins count more
    L             = mean_{n,f,t} W * BCE(P_n, G_n)                 OmniSep's weighted BCE
    theta        <- AdamW(theta, clip(grad L, max_norm)), LR linear warmup then cosine decay

Every ``val_every`` steps the model separates the fixed validation mixtures (each
source with its own text query) and the mean SI-SDRi is logged; the best model is kept
as the run's artifact (``<run>/config.json`` + ``model.safetensors`` + ``README.md``).
Checkpoints, exact resume, the validation cadence, logging, DDP and the progress bar are
the shared training loop's (:mod:`marsctl.train.loop`); this module gives its step.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from marsctl.config import SignalConfig, ValidatedConfig, load_recipe, setting, to_mapping
from marsctl.data.augment import AugmentConfig
from marsctl.data.manifest import training_labels
from marsctl.errors import MarsctlError
from marsctl.models.encoder_base import QueryEncoder
from marsctl.models.policy import DEFAULT_KAPPA
from marsctl.models.separator import Separator, SeparatorConfig, check_num_levels, save_separator
from marsctl.queries import QueryBuilder
from marsctl.train.distributed import DistributedContext, bf16_autocast
from marsctl.train.loop import Scores, require_dataset, run_training, step_seed
from marsctl.train.loop_config import TrainingLoopConfig, resolve_recipe_paths
from marsctl.recorded_paths import portable_config
from marsctl.train.safety import check_finite_step
from marsctl.train.validation import validation_si_sdri


@dataclasses.dataclass(frozen=True)
class ArchitectureConfig(ValidatedConfig):
    """U-Net and policy settings (the query size comes from the encoder); the ranges are
    :class:`~marsctl.models.separator.SeparatorConfig`'s, num_levels is checked against the
    recipe's signal by :class:`SupervisedConfig`."""

    num_levels: int = setting(7, ge=1)
    base_channels: int = setting(32, ge=1, le=4096)
    max_channel_multiplier: int = setting(8, ge=1, le=1024)
    mask_channels: int = setting(32, ge=1, le=4096)
    kappa: float = setting(DEFAULT_KAPPA, gt=0)


@dataclasses.dataclass(frozen=True)
class SupervisedConfig(TrainingLoopConfig):
    """Everything ``marsctl train sup`` needs; recipes under ``recipes/train/`` fill it.

    The shared loop settings (data, optimizer, schedule, validation, checkpoints, launch) and
    their defaults are :class:`~marsctl.train.loop_config.TrainingLoopConfig`'s."""

    #: query encoder spec for ``marsctl.models.encoders.load_encoder`` (frozen during training)
    encoder: str = "builtin"
    signal: SignalConfig = dataclasses.field(default_factory=SignalConfig)
    architecture: ArchitectureConfig = dataclasses.field(default_factory=ArchitectureConfig)
    #: OmniSep's log(1 + |X|) bin weights; False gives plain BCE
    weighted_loss: bool = True
    #: a source "owns" a bin when its magnitude exceeds this fraction of the mixture's
    mask_threshold: float = setting(0.5, ge=0)
    #: warm start: separator weights to start from (``default``, a run directory or a Hub id);
    #: its architecture and query size must match this recipe's. Empty = random init.
    init_model: str = ""
    #: augmentation of the training mixtures (simulated rooms, gain, EQ, time shift, SNR range;
    #: :mod:`marsctl.data.augment`); all off by default
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_num_levels(self.architecture.num_levels, self.signal)

    def separator_config(self, query_dim: int) -> SeparatorConfig:
        return SeparatorConfig(query_dim=query_dim, signal=self.signal, **to_mapping(self.architecture))


def load_supervised_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> SupervisedConfig:
    """A recipe YAML (or the defaults) with command-line overrides (``None`` values ignored)."""
    config = load_recipe(SupervisedConfig, path, overrides, where="train sup")
    config = resolve_recipe_paths(config, path, ("data", "encoder", "init_model"), overrides)
    if config.init_model == "default":  # the shipped separator's directory, so that runs fingerprint its weights
        from marsctl.pretrained import DEFAULT_SEPARATOR_DIR

        config = dataclasses.replace(config, init_model=str(DEFAULT_SEPARATOR_DIR))
    return config


def load_initial_weights(model: Separator, spec: str) -> None:
    """Copy the weights of the separator ``spec`` (a run directory or a Hub id) into ``model``;
    a different architecture or query size is one error naming both."""
    from marsctl.models.separator import load_separator

    start = load_separator(spec)
    if start.model.config != model.config:
        ours, theirs = to_mapping(model.config), to_mapping(start.model.config)
        differ = ", ".join(f"{key} {theirs.get(key)!r} != {ours.get(key)!r}" for key in ours if ours.get(key) != theirs.get(key))
        raise MarsctlError(f"init_model {spec}: its separator does not match this recipe's ({differ})")
    model.load_state_dict(start.model.state_dict())


def weighted_bce_mask_loss(
    logits: torch.Tensor, source_magnitudes: torch.Tensor, mixture_magnitude: torch.Tensor, weighted: bool = True, threshold: float = 0.5
) -> torch.Tensor:
    """OmniSep's loss: mean_{n,f,t} W * BCE(sigmoid(z_n), 1[|S_n| > threshold |X|]).

    ``logits`` and ``source_magnitudes`` are ``[B, S, F, T]``; ``mixture_magnitude`` ``[B, F, T]``
    (all on the warped log-frequency grid). W = clamp(log1p(|X|), 1e-3, 10) when ``weighted``.
    """
    target = (source_magnitudes > threshold * mixture_magnitude.unsqueeze(1)).float()
    weight = torch.clamp(torch.log1p(mixture_magnitude), 1e-3, 10.0) if weighted else torch.ones_like(mixture_magnitude)
    weight = weight.unsqueeze(1).expand_as(target)
    return F.binary_cross_entropy_with_logits(logits.float(), target, weight=weight)


@dataclasses.dataclass
class TrainResult:
    model: Separator
    run_dir: Path
    step: int
    best_si_sdri: float | None
    history: list[dict[str, Any]]


def _model_card(config: SupervisedConfig, step: int, best: float | None, val_count: int) -> str:
    score = f"{best:.2f} dB" if best is not None else "not measured (no validation mixtures)"
    return (
        "# marsctl separator (supervised)\n\n"
        "Query-conditioned mask separator (7-level U-Net on the log-frequency magnitude, Beta mask policy), "
        "trained by `marsctl train sup` with OmniSep's weighted BCE mask loss.\n\n"
        f"- training data: `{config.data}`\n- query encoder: `{config.encoder}`\n"
        + (f"- started from: `{config.init_model}`\n" if config.init_model else "")
        + f"- steps: {step} (batch {config.batch_size} per process), AdamW lr {config.learning_rate}, warmup {config.warmup_steps}\n"
        f"- query modalities: {', '.join(config.query_modalities)} (Query-Mixup: {config.query_mixup})\n"
        f"- best validation SI-SDRi: {score} over {val_count} sources of fixed `{config.val_split}` mixtures\n\n"
        "Full settings are in `config.json` (`training`).\n"
    )


class SupervisedTask:
    """The supervised step, validation and artifact for :func:`marsctl.train.loop.run_training`."""

    title = "train sup"
    resume_keys = ("signal", "architecture", "encoder", "num_sources")
    validate_at_start = False
    artifact = "best"

    def __init__(self, config: SupervisedConfig, model: Separator, encoder: QueryEncoder, dataset_dir: Path, ctx: DistributedContext):
        self.config, self.model, self.ctx, self.signal = config, model, ctx, config.signal
        self.queries = QueryBuilder(encoder, dataset_dir, config.signal.sample_rate, config.query_modalities, config.query_mixup)
        self.use_bf16 = bf16_autocast(config.bf16, ctx.device)  # hardware bf16 only (logged by the loop)
        self.val_sources = 0
        self.known_labels = training_labels(dataset_dir)  # recorded with the model: the classes it was trained on

    def train_step(self, step: int, batch: dict[str, Any], train_model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   log: bool) -> dict[str, Any]:
        config, ctx, model = self.config, self.ctx, self.model
        generator = torch.Generator().manual_seed(step_seed(config.seed, step, ctx.rank, 0, ctx.world_size))
        query = self.queries.batch(batch, generator).to(ctx.device, non_blocking=True)  # q_n [B, S, D]
        mixture = batch["mixture"].to(ctx.device, non_blocking=True)  # [B, T]
        sources = batch["sources"].to(ctx.device, non_blocking=True)  # [B, S, T]
        with torch.no_grad():
            _, mixture_magnitude, _ = model.analyze(mixture)  # |X|~ [B, F, T]
            _, source_magnitudes, _ = model.analyze(sources)  # |S_n|~ [B, S, F, T]
        with torch.autocast(device_type=ctx.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            logits = train_model(mixture, query)  # z_n [B, S, F, T]
        # L = mean W * BCE(sigmoid(z_n), 1[|S_n|~ > 0.5 |X|~])
        loss = weighted_bce_mask_loss(logits, source_magnitudes, mixture_magnitude, config.weighted_loss, config.mask_threshold)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)  # clip(grad L, max_norm)
        # a NaN/Inf loss stops the run before AdamW writes it into the weights (one host sync per step,
        # as torch.amp.GradScaler's inf check)
        loss_value, grad_value = torch.stack([loss.detach().float(), grad_norm.detach().float()]).tolist()
        check_finite_step(step, {"loss": loss_value, "gradient norm": grad_value}, ctx.all_reduce_mean if ctx.enabled else None)
        optimizer.step()  # theta <- AdamW(theta, ...)
        return ctx.mean_metrics({"loss": loss.detach()}, {"grad_norm": grad_norm}) if log else {}

    def validate(self, val_set: list) -> dict[str, float]:
        metrics = validation_si_sdri(self.model, val_set, self.queries, self.ctx.device)
        self.model.train()
        self.val_sources = sum(len(m.labels) for m in val_set)
        return {"val_si_sdri": metrics["si_sdri"]}

    def save_artifact(self, directory: Path, step: int, scores: Scores) -> None:
        shown = portable_config(self.config, directory)  # paths relative to the artifact, Hub ids or ~/...
        extra = {"training": {**to_mapping(shown), "step": step, "best_val_si_sdri_db": scores.best}, "labels": self.known_labels}
        save_separator(self.model, directory, encoder=self.config.encoder, extra=extra,
                       card=_model_card(shown, step, scores.best, self.val_sources))

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def status(self, record: dict[str, Any], scores: Scores) -> str:
        shown = f"loss {record['loss']:.4f}" if "loss" in record else ""
        return shown + (f"  best val SI-SDRi {scores.best:.2f} dB" if scores.best is not None else "")


def train_supervised(
    config: SupervisedConfig,
    run_dir: str | Path,
    encoder: QueryEncoder | None = None,
    device: str | None = None,
    resume: bool = True,
    progress: bool = True,
    on_step_end: Callable[[int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train (or resume training of) a separator into ``run_dir``. See the module docstring.
    ``log`` (rank 0 only) gets the loop's lines: the precision, the checkpoint resumed from."""
    ctx = DistributedContext.from_env(device)
    dataset_dir = require_dataset(config.data)
    if encoder is None:
        from marsctl.models.encoders import load_encoder

        encoder = load_encoder(config.encoder, device=str(ctx.device))
    encoder.eval().requires_grad_(False)
    torch.manual_seed(config.seed + ctx.rank)
    model = Separator(config.separator_config(encoder.embedding_dim))
    if config.init_model:
        load_initial_weights(model, config.init_model)  # a checkpoint in run_dir, if any, still wins (resume)
    model = model.to(ctx.device)
    task = SupervisedTask(config, model, encoder, dataset_dir, ctx)
    model.train()
    say = log if log is not None and ctx.is_main else None
    result = run_training(task, config, run_dir, ctx, resume=resume, progress=progress, on_step_end=on_step_end, log=say)
    return TrainResult(model=model, run_dir=Path(run_dir), step=result.step, best_si_sdri=result.scores.best, history=result.history)
