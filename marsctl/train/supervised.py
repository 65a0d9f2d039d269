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
Checkpoints (``<run>/checkpoints/step-*``) carry optimizer, scheduler and RNG state and
a run resumes from the latest one exactly. Under torchrun the model is wrapped in DDP;
only rank 0 writes files, logs and shows progress.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from marsctl.config import SignalConfig, load_recipe, to_mapping
from marsctl.errors import MarsctlError
from marsctl.files import write_json_atomic, write_text_atomic
from marsctl.metrics.separation import si_sdr_improvement
from marsctl.models.encoder_base import QueryEncoder
from marsctl.models.policy import DEFAULT_KAPPA
from marsctl.models.query import fuse, query_mixup_weights
from marsctl.models.separator import Separator, SeparatorConfig, save_separator
from marsctl.train import checkpoint as ckpt
from marsctl.train.data import (
    EpochIndexedDataset,
    StepBatchSampler,
    collate,
    fixed_mixtures,
    mixing_dataset,
)
from marsctl.train.distributed import DistributedContext
from marsctl.train.loop_config import TrainingLoopConfig


@dataclasses.dataclass(frozen=True)
class ArchitectureConfig:
    """U-Net and policy settings (the query size comes from the encoder)."""

    num_levels: int = 7
    base_channels: int = 32
    max_channel_multiplier: int = 8
    mask_channels: int = 32
    kappa: float = DEFAULT_KAPPA


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
    mask_threshold: float = 0.5

    def separator_config(self, query_dim: int) -> SeparatorConfig:
        return SeparatorConfig(query_dim=query_dim, signal=self.signal, **to_mapping(self.architecture))


def load_supervised_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> SupervisedConfig:
    """A recipe YAML (or the defaults) with command-line overrides (``None`` values ignored)."""
    return load_recipe(SupervisedConfig, path, overrides, where="train sup")


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


class QueryBuilder:
    """Query embeddings ``[B, S, D]`` for a batch: cached text embeddings of labels, plus the
    sources' own audio and first video frame when those modalities are enabled, fused with
    Query-Mixup weights drawn from a per-step generator."""

    def __init__(self, encoder: QueryEncoder, config: SupervisedConfig, dataset_dir: Path):
        self.encoder, self.config, self.root = encoder, config, dataset_dir
        self._text_cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def text(self, labels: Sequence[str]) -> torch.Tensor:
        missing = sorted({label for label in labels if label not in self._text_cache})
        if missing:
            for label, emb in zip(missing, self.encoder.embed_text(missing).float().cpu()):
                self._text_cache[label] = emb
        return torch.stack([self._text_cache[label] for label in labels])

    @torch.no_grad()
    def image(self, frame_paths: Sequence[Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """First frame of each source (``[N, 3, 224, 224]`` in [0, 1]) and a mask of sources that have one."""
        from torchvision.io import ImageReadMode, decode_image

        images, has = [], []
        for paths in frame_paths:
            if paths:
                img = decode_image(str(self.root / paths[0]), mode=ImageReadMode.RGB).float() / 255.0
                images.append(F.interpolate(img[None], size=(224, 224), mode="bilinear", align_corners=False)[0])
                has.append(True)
            else:
                images.append(torch.zeros(3, 224, 224))
                has.append(False)
        return torch.stack(images), torch.tensor(has)

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any], generator: torch.Generator | None) -> torch.Tensor:
        labels = [label for item in batch["labels"] for label in item]
        n = len(labels)
        embeddings: dict[str, torch.Tensor] = {}
        available: dict[str, torch.Tensor] = {}
        for modality in self.config.query_modalities:
            if modality == "text":
                embeddings["text"] = self.text(labels)
            elif modality == "audio":
                sources = batch["sources"].reshape(n, -1)
                embeddings["audio"] = self.encoder.embed_audio(sources.to(self.encoder.device), self.config.signal.sample_rate).float().cpu()
            elif modality == "image":
                frames = [p for item, item_labels in zip(batch["frame_paths"], batch["labels"]) for p in (item or [[]] * len(item_labels))]
                images, has = self.image(frames)
                if has.any():
                    emb = torch.zeros(n, self.encoder.embedding_dim)
                    emb[has] = self.encoder.embed_image(images[has].to(self.encoder.device)).float().cpu()
                    embeddings["image"] = emb
                    available["image"] = has.float()
        if self.config.query_mixup and len(embeddings) > 1:
            weights = query_mixup_weights(n, list(embeddings), generator)
        else:
            weights = {m: torch.ones(n) for m in embeddings}
        for modality, mask in available.items():
            weights[modality] = weights[modality] * mask
        total = sum(weights.values())
        weights = {m: w / total for m, w in weights.items()}
        fused = fuse(embeddings, weights)
        return fused.reshape(len(batch["labels"]), -1, fused.shape[-1])


@torch.no_grad()
def validate(model: Separator, mixtures, query_builder: QueryBuilder, device: torch.device) -> dict[str, float]:
    """Mean SI-SDRi (dB) over every source of the fixed mixtures, each separated with its own text query."""
    model.eval()
    improvements = []
    for fixed in mixtures:
        mix = torch.from_numpy(fixed.mixture).to(device)[None]
        queries = query_builder.text(fixed.labels).to(device)[None]  # [1, S, D]
        estimates = model.separate(mix, queries)[0].cpu()  # [S, T]
        improvements.append(si_sdr_improvement(torch.from_numpy(fixed.sources), estimates, torch.from_numpy(fixed.mixture)))
    model.train()
    values = torch.cat(improvements)
    values = values[torch.isfinite(values)]
    return {"si_sdri": float(values.mean()) if len(values) else float("nan"), "num_sources": int(len(values))}


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
        f"- steps: {step} (batch {config.batch_size} per process), AdamW lr {config.learning_rate}, warmup {config.warmup_steps}\n"
        f"- query modalities: {', '.join(config.query_modalities)} (Query-Mixup: {config.query_mixup})\n"
        f"- best validation SI-SDRi: {score} over {val_count} sources of fixed `{config.val_split}` mixtures\n\n"
        "Full settings are in `config.json` (`training`).\n"
    )


def train_supervised(
    config: SupervisedConfig,
    run_dir: str | Path,
    encoder: QueryEncoder | None = None,
    device: str | None = None,
    resume: bool = True,
    progress: bool = True,
    on_step_end: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train (or resume training of) a separator into ``run_dir``. See the module docstring."""
    from torch.utils.tensorboard import SummaryWriter

    run_dir = Path(run_dir)
    ctx = DistributedContext.from_env(device)
    dataset_dir = Path(config.data)
    if not dataset_dir.is_dir():
        raise MarsctlError(f"{dataset_dir}: no such dataset directory")
    if encoder is None:
        from marsctl.models.encoders import load_encoder

        encoder = load_encoder(config.encoder, device=str(ctx.device))
    encoder.eval().requires_grad_(False)
    torch.manual_seed(config.seed + ctx.rank)

    model = Separator(config.separator_config(encoder.embedding_dim)).to(ctx.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, config.lr_lambda())
    start_step, best, history = 0, None, []

    if not resume and ctx.is_main and (run_dir / "checkpoints").is_dir():
        shutil.rmtree(run_dir / "checkpoints")  # starting over: old steps must not be resumed later
    ctx.barrier()
    latest = ckpt.latest_checkpoint(run_dir) if resume else None
    if latest is not None:
        state = ckpt.load_training_state(latest, map_location=ctx.device)
        saved = state.get("config", {})
        for key in ("signal", "architecture", "encoder", "num_sources"):
            if key in saved and saved[key] != to_mapping(config)[key]:
                raise MarsctlError(f"{run_dir}: cannot resume, '{key}' differs from the checkpoint's; use a new --out or --no-resume")
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(latest / "model.safetensors"), device=str(ctx.device)))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        start_step, best = int(state["step"]), state.get("best_si_sdri")
        history = list(state.get("history", []))

    train_model: torch.nn.Module = model
    if ctx.enabled:
        train_model = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)

    dataset = EpochIndexedDataset(mixing_dataset(dataset_dir, "train", config.signal, config.num_sources, seed=config.seed))
    sampler = StepBatchSampler(len(dataset), config.batch_size, config.seed, start_step, config.max_steps, ctx.rank, ctx.world_size)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=config.num_workers, persistent_workers=False)
    queries = QueryBuilder(encoder, config, dataset_dir)
    val_set = fixed_mixtures(dataset_dir, config.val_split, config.signal, config.val_mixtures, config.num_sources) if ctx.is_main else []
    use_bf16 = config.bf16 and ctx.device.type == "cuda"

    writer = SummaryWriter(str(run_dir / "tensorboard")) if ctx.is_main else None
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "train_config.json", to_mapping(config))
        # metrics.jsonl: one line per logged step, for `tail -f`; restarted from the checkpoint's history on resume
        write_text_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))

    def save_artifact(directory: Path, step: int) -> None:
        extra = {"training": {**to_mapping(config), "step": step, "best_val_si_sdri_db": best}}
        save_separator(model, directory, encoder=config.encoder, extra=extra, card=_model_card(config, step, best, sum(len(m.labels) for m in val_set)))

    def save_checkpoint(step: int) -> None:
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": ckpt.rng_state(),
            "best_si_sdri": best,
            "history": history,
            "config": to_mapping(config),
        }
        ckpt.save_checkpoint(run_dir, step, lambda d: save_artifact(d, step), state, keep=config.keep_checkpoints)

    progress_bar = None
    if ctx.is_main and progress:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        progress_bar = Progress(
            TextColumn("[bold]train sup"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(), TimeRemainingColumn(),
        )
        progress_bar.start()
        task = progress_bar.add_task("train", total=config.max_steps, completed=start_step, status="")

    model.train()
    step = start_step
    step_start = time.perf_counter()
    try:
        for step, batch in enumerate(loader, start=start_step + 1):
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step * 9_973 + ctx.rank)
            query = queries(batch, generator).to(ctx.device)  # [B, S, D]
            mixture = batch["mixture"].to(ctx.device)  # [B, T]
            sources = batch["sources"].to(ctx.device)  # [B, S, T]
            with torch.no_grad():
                _, mixture_magnitude, _ = model.analyze(mixture)  # |X|~ [B, F, T]
                _, source_magnitudes, _ = model.analyze(sources)  # |S_n|~ [B, S, F, T]
            with torch.autocast(device_type=ctx.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                logits = train_model(mixture, query)  # z_n [B, S, F, T]
            # L = mean W * BCE(sigmoid(z_n), 1[|S_n|~ > 0.5 |X|~])
            loss = weighted_bce_mask_loss(logits, source_magnitudes, mixture_magnitude, config.weighted_loss, config.mask_threshold)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
            optimizer.step()
            scheduler.step()

            record: dict[str, Any] = {}
            if step % config.log_every == 0 or step == config.max_steps:
                elapsed = time.perf_counter() - step_start
                record = {
                    "step": step,
                    "loss": ctx.all_reduce_mean(float(loss.detach())),
                    "grad_norm": float(grad_norm),
                    "lr": scheduler.get_last_lr()[0],
                    "step_time_s": elapsed / config.log_every if step % config.log_every == 0 else elapsed,
                }
                step_start = time.perf_counter()
            if ctx.is_main and (step % config.val_every == 0 or step == config.max_steps) and val_set:
                metrics = validate(model, val_set, queries, ctx.device)
                record = {**record, "step": step, "val_si_sdri": metrics["si_sdri"]}
                if best is None or metrics["si_sdri"] > best:
                    best = metrics["si_sdri"]
                    save_artifact(run_dir, step)
            if ctx.is_main and record:
                history.append(record)
                with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as log:
                    log.write(json.dumps(record) + "\n")
                for key, value in record.items():
                    if key != "step" and value is not None:
                        group = "val" if key.startswith("val_") else "train"
                        writer.add_scalar(f"{group}/{key.removeprefix('val_')}", value, step)
                if progress_bar is not None:
                    shown = f"loss {record['loss']:.4f}" if "loss" in record else ""
                    if best is not None:
                        shown += f"  best val SI-SDRi {best:.2f} dB"
                    progress_bar.update(task, status=shown)
            if ctx.is_main and (step % config.checkpoint_every == 0 or step == config.max_steps):
                save_checkpoint(step)
                if not val_set:
                    save_artifact(run_dir, step)  # no validation: the artifact is the latest model
            if progress_bar is not None:
                progress_bar.update(task, completed=step)
            if on_step_end is not None:
                on_step_end(step)
    finally:
        if progress_bar is not None:
            progress_bar.stop()
        if writer is not None:
            writer.close()
    if ctx.is_main:
        write_json_atomic(run_dir / "history.json", history)
    ctx.barrier()
    ctx.close()
    return TrainResult(model=model, run_dir=run_dir, step=step, best_si_sdri=best, history=history)
