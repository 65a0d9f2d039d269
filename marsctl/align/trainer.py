"""``marsctl align``: progressive alignment of the reward encoder (MARS-Sep, Sec. "reward encoder").

One loop per stage; every step draws a batch, computes the stage's objective, and
takes one AdamW step on the trainable parts only (projection heads, the temperature,
trunks trained from scratch, the anchor fusion; pretrained trunks stay frozen):

- stage 1, audio <-> text:  L = InfoNCE_sym(phi_a(x), phi_t(label)) + w_z L_anchor
- stage 2, audio <-> audio: L = InfoNCE_sym(phi_a(x_i), phi_a(x_j)) + w_tr Triplet + w_c (1 - cos(phi_a(x), phi_a(aug x))) + w_z L_anchor
  with x_i, x_j two clips of one class
- stage 3, audio <-> image: L = InfoNCE_sym(phi_a(x), phi_v(frame)) + w_tr Triplet + w_z L_anchor
- L_anchor = -log softmax over {target, mixture, other classes} of s cos(z*, .), where
  z* = AnchorFusion(phi_a(x), phi_t(label)[, phi_v(frame)]) and the mixture is
  0.5 x + 0.5 x' with x' of another class of the batch (often an acoustically close one).

Each stage starts from the previous stage's best checkpoint; a share
``replay_fraction`` of its steps replays an earlier selected stage's objective on that
stage's data (rehearsal). The best checkpoint is chosen on the ``select_split`` by
:func:`selection_score` (R@1 of this and the earlier stages + the anchor's target-vs-mixture
gap); the reported numbers come from ``report_split``.

Output directory::

    OUT/align_config.json        the run's config (a resumed run must match it)
    OUT/stage{N}/state.pt        resumable training state (weights, AdamW, RNG, step); weights_only
    OUT/stage{N}/best/           best encoder of the stage (an encoder directory)
    OUT/stage{N}/log.jsonl       every logged step, one JSON object per line, each loss term on its own
    OUT/stage{N}/metrics.json    the stage's report (written last: its presence means "done")
    OUT/metrics.json             initial + per-stage reports
    OUT/encoder/                 the final aligned encoder (best of the last stage), with its card

Resuming: a finished stage (metrics.json present) is skipped; an unfinished one
continues from state.pt, restoring weights, optimizer and random state, so that the
resumed run draws the same batches as an uninterrupted one would have.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from marsctl.align.config import AlignConfig, AudioAudioStageConfig, AudioImageStageConfig, AudioTextStageConfig, StageCommon
from marsctl.align.ascent import AscentSettings, ascent_agreement_loss, ascent_ranking_loss
from marsctl.align.data import AudioCache, Clip, HeldOut, TrainingPool, acoustic_neighbors, class_profiles, read_clips
from marsctl.align.losses import anchor_loss, consistency_loss, multi_positive_info_nce, symmetric_info_nce, triplet_loss
from marsctl.align.metrics import evaluate_alignment, separate_heldout_mixtures
from marsctl.config import from_mapping, to_mapping
from marsctl.errors import ConfigError, MarsctlError
from marsctl.files import atomic_path, write_json_atomic
from marsctl.models.encoders import AnchorFusion, ProjectedEncoder, load_encoder, save_encoder
from marsctl.progress import StepProgress, stage_progress

STAGE_NAMES = {1: "audio-text", 2: "audio-audio", 3: "audio-image"}
#: held-out retrieval each stage adds to checkpoint selection (see :func:`selection_score`)
STAGE_SELECTION = {
    1: ("audio_to_text_R@1", "text_to_audio_R@1"),
    2: ("audio_to_audio_R@1",),
    3: ("audio_to_image_R@1", "image_to_audio_R@1"),
}
DATA_SAMPLE_RATE = 16_000


def selection_score(stage: int, metrics: dict[str, Any], stages: tuple[int, ...] = (1, 2, 3), ascent: bool = False) -> float:
    """Mean R@1 of this stage's retrieval *and of the earlier selected stages'* (progressive alignment
    must not buy stage 2 with stage 1), plus the anchor's target-vs-mixture gap (what the reward needs).
    ``ascent`` (a stage that trains the reward-ascent ranking): the shares of held-out pairs where one
    step up the text and the anchor reward raised SI-SDR join the mean (shares, like R@1)."""
    keys = [key for s in stages if s <= stage for key in STAGE_SELECTION[s]]
    if ascent:
        keys += ["ascent_positive_text", "ascent_positive_anchor"]
    recalls = [metrics.get(key, 0.0) for key in keys]
    return sum(recalls) / len(recalls) + metrics.get("gap_anchor", 0.0)


def trains_ascent(cfg: StageCommon) -> bool:
    """Whether a stage trains the reward's ascent (and is then also selected on it)."""
    return getattr(cfg, "ascent_ranking_weight", 0.0) > 0 or getattr(cfg, "ascent_agreement_weight", 0.0) > 0


class Reporter:
    """Where the trainer says things: a line logger, and a progress display per stage when
    ``progress`` is true (:class:`marsctl.progress.StepProgress`)."""

    def __init__(self, log: Callable[[str], None] = print, progress: bool = False,
                 on_stage_end: Callable[[int, dict[str, Any]], None] | None = None,
                 on_step: Callable[[int, int, dict[str, Any]], None] | None = None):
        self.log, self.progress, self.on_stage_end, self.on_step = log, progress, on_stage_end, on_step


# --------------------------------------------------------------------------- objectives
def _label_tensor(labels: list[str], device: torch.device) -> tuple[torch.Tensor, list[str]]:
    classes = sorted(set(labels))
    return torch.tensor([classes.index(label) for label in labels], device=device), classes


def _mixture_partners(label_ids: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per batch item, another item of a different class (itself if the batch has one class)."""
    partners = []
    labels = label_ids.cpu()
    for i, label in enumerate(labels.tolist()):
        others = (labels != label).nonzero().flatten()
        partners.append(int(others[torch.randint(len(others), (1,), generator=gen)]) if len(others) else i)
    return torch.tensor(partners)


def _with_interference(crops: torch.Tensor, label_ids: torch.Tensor, cfg: "AudioTextStageConfig", gen: torch.Generator) -> torch.Tensor:
    """A share of the crops with another class's crop added, at a level (relative to the crop's RMS)
    drawn from [interference_min_db, interference_max_db]: what a separated estimate sounds like."""
    partners = _mixture_partners(label_ids, gen)
    chosen = (torch.rand(len(crops), 1, generator=gen) < cfg.interference_share).to(crops.dtype)
    level_db = cfg.interference_min_db + torch.rand(len(crops), 1, generator=gen) * (cfg.interference_max_db - cfg.interference_min_db)
    rms = crops.pow(2).mean(-1, keepdim=True).sqrt()
    gain = chosen * rms / (rms[partners] + 1e-8) * 10 ** (level_db / 20)
    return crops + gain * crops[partners]


def _anchor_term(encoder: ProjectedEncoder, crops: torch.Tensor, audio: torch.Tensor, anchor: torch.Tensor,
                 label_ids: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """L_anchor for the fused anchors z* ``anchor`` of the crops (embedded as ``audio``)."""
    partners = _mixture_partners(label_ids, gen)
    mixtures = 0.5 * crops + 0.5 * crops[partners]  # the target as it sits in a two-source mixture
    mixture_emb = encoder.embed_audio(mixtures, DATA_SAMPLE_RATE)
    return anchor_loss(anchor, audio, mixture_emb, audio, label_ids, encoder.temperature_scale())


class Objectives:
    """The three stage objectives; each returns named loss terms with "total" the one minimized."""

    def __init__(self, encoder: ProjectedEncoder, pool: TrainingPool, image_pool: TrainingPool | None, config: AlignConfig):
        self.encoder, self.pool, self.image_pool, self.config = encoder, pool, image_pool, config

    def __call__(self, stage: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        return {1: self.audio_text, 2: self.audio_audio, 3: self.audio_image}[stage](gen)

    def _samples(self, cfg: StageCommon) -> int:
        return int(round(cfg.crop_seconds * DATA_SAMPLE_RATE))

    def audio_text(self, gen: torch.Generator) -> dict[str, torch.Tensor]:
        cfg: AudioTextStageConfig = self.config.stage1
        enc, pool = self.encoder, self.pool
        indices = pool.sample_clips(cfg.batch_size, cfg.hard_negative_share, gen)
        crops = pool.crops(indices, self._samples(cfg), gen)
        label_ids, classes = _label_tensor([pool.clips[i].label for i in indices], enc.device)
        clean = crops
        if cfg.interference_share > 0:
            crops = _with_interference(crops, label_ids, cfg, gen)
        audio = enc.embed_audio(crops, DATA_SAMPLE_RATE)
        text_ids = torch.arange(len(classes), device=enc.device)
        scale = enc.temperature_scale()
        if cfg.text_negatives == "all":
            # L = 1/2 [CE(s a T_all^T) + CE(s t a^T)]: each clip against every training class's text
            all_text = enc.embed_text(pool.labels)  # one text pass: the batch's classes are rows of it
            in_vocabulary = torch.tensor([pool.labels.index(c) for c in classes], device=enc.device)
            text = all_text[in_vocabulary]
            audio_to_text = F.cross_entropy(scale * audio @ all_text.T, in_vocabulary[label_ids])
            text_to_audio = multi_positive_info_nce(scale * text @ audio.T, text_ids[:, None] == label_ids[None, :])
            info_nce = 0.5 * (audio_to_text + text_to_audio)
        else:
            # Eq. stage 1: L = 1/2 [CE(s a t^T) + CE(s t a^T)]
            text = enc.embed_text(classes)
            info_nce = symmetric_info_nce(audio, text, label_ids, text_ids, scale)
        label_text = text[label_ids]
        z_star = enc.anchor_fusion(audio=audio, text=label_text, image=None)
        anchor = _anchor_term(enc, crops, audio, z_star, label_ids, gen)
        total = info_nce + cfg.anchor_weight * anchor
        terms = {"info_nce_audio_text": info_nce, "anchor": anchor}
        if cfg.ascent_ranking_weight > 0 or cfg.ascent_agreement_weight > 0:
            # each clean crop is a target, another class's crop the interference; the same z* as L_anchor's
            partners = _mixture_partners(label_ids, gen)
            targets, interference = 0.5 * clean, 0.5 * clean[partners]
            if cfg.ascent_ranking_weight > 0:
                terms["ascent_ranking"] = ascent_ranking_loss(enc, targets, interference, label_text, z_star, scale,
                                                              DATA_SAMPLE_RATE, AscentSettings(), gen)
                total = total + cfg.ascent_ranking_weight * terms["ascent_ranking"]
            if cfg.ascent_agreement_weight > 0:
                terms["ascent_agreement"] = ascent_agreement_loss(enc, targets, interference, label_text, z_star,
                                                                  DATA_SAMPLE_RATE, AscentSettings(), gen)
                total = total + cfg.ascent_agreement_weight * terms["ascent_agreement"]
        return {"total": total, **terms}

    def audio_audio(self, gen: torch.Generator) -> dict[str, torch.Tensor]:
        cfg: AudioAudioStageConfig = self.config.stage2
        enc, pool = self.encoder, self.pool
        pairs = pool.sample_pairs(max(2, cfg.batch_size // 2), cfg.hard_negative_share, gen)
        samples = self._samples(cfg)
        first = pool.crops([i for i, _ in pairs], samples, gen)
        second = pool.crops([j for _, j in pairs], samples, gen)
        label_ids, classes = _label_tensor([pool.clips[i].label for i, _ in pairs], enc.device)
        gain = 10 ** ((torch.rand(len(pairs), 1, generator=gen) * 2 - 1) * cfg.augment_gain_db / 20)
        noise = torch.randn(first.shape, generator=gen) * first.pow(2).mean(-1, keepdim=True).sqrt() * 10 ** (-cfg.augment_snr_db / 20)
        augmented = first * gain + noise
        emb = enc.embed_audio(torch.cat([first, second, augmented]), DATA_SAMPLE_RATE)
        e1, e2, e_aug = emb.split(len(pairs))
        info_nce = symmetric_info_nce(e1, e2, label_ids, label_ids, enc.temperature_scale())
        triplet = triplet_loss(e1, e2, e2, label_ids, label_ids, cfg.triplet_margin)
        consistency = consistency_loss(e1, e_aug)
        text = enc.embed_text(classes)[label_ids]
        # the anchor is built from *another* clip of the class: z* must generalize across clips
        anchor = _anchor_term(enc, first, e1, enc.anchor_fusion(audio=e2, text=text, image=None), label_ids, gen)
        total = info_nce + cfg.triplet_weight * triplet + cfg.consistency_weight * consistency + cfg.anchor_weight * anchor
        return {"total": total, "info_nce_audio_audio": info_nce, "triplet": triplet,
                "consistency": consistency, "anchor": anchor}

    def audio_image(self, gen: torch.Generator) -> dict[str, torch.Tensor]:
        cfg: AudioImageStageConfig = self.config.stage3
        enc, pool = self.encoder, self.image_pool
        assert pool is not None
        indices, frames = pool.frames(pool.sample_clips(cfg.batch_size, cfg.hard_negative_share, gen), gen)
        crops = pool.crops(indices, self._samples(cfg), gen)
        label_ids, classes = _label_tensor([pool.clips[i].label for i in indices], enc.device)
        audio = enc.embed_audio(crops, DATA_SAMPLE_RATE)
        image = enc.embed_image(frames)
        info_nce = symmetric_info_nce(audio, image, label_ids, label_ids, enc.temperature_scale())
        triplet = triplet_loss(audio, image, image, label_ids, label_ids, cfg.triplet_margin)
        text = enc.embed_text(classes)[label_ids]
        anchor = _anchor_term(enc, crops, audio, enc.anchor_fusion(audio=audio, text=text, image=image), label_ids, gen)
        total = info_nce + cfg.triplet_weight * triplet + cfg.anchor_weight * anchor
        return {"total": total, "info_nce_audio_image": info_nce, "triplet": triplet, "anchor": anchor}


# --------------------------------------------------------------------------- the run
def _check_run_config(out_dir: Path, config: AlignConfig, dataset_dir: Path) -> None:
    def comparable(align: dict[str, Any]) -> dict[str, Any]:
        # settings added since a run was started read as their defaults; the separator only adds reports
        mapping = to_mapping(from_mapping(AlignConfig, align, "align_config.json"))
        mapping["eval"].pop("separator")
        return json.loads(json.dumps(mapping))

    record = {"align": to_mapping(config), "data": str(dataset_dir.resolve())}
    path = out_dir / "align_config.json"
    if path.is_file():
        previous = json.loads(path.read_text(encoding="utf-8"))
        if comparable(record["align"]) != comparable(previous.get("align", {})) or record["data"] != previous.get("data"):
            raise ConfigError(
                f"{out_dir}: holds an alignment run with another config or dataset; use a new --out or the same settings to resume"
            )
    else:
        write_json_atomic(path, record)


def _held_out(clips: list[Clip], config: AlignConfig, reporter: Reporter, device: str | torch.device) -> tuple[HeldOut, HeldOut]:
    splits = {c.split for c in clips}
    select_split = config.eval.select_split if config.eval.select_split in splits else config.eval.report_split
    report_split = config.eval.report_split if config.eval.report_split in splits else select_split
    if select_split not in splits:
        raise MarsctlError(
            f"no held-out clips: the dataset has splits {sorted(splits)}, alignment needs "
            f"{config.eval.select_split!r} or {config.eval.report_split!r}"
        )
    if select_split == report_split and config.eval.select_split != config.eval.report_split:
        reporter.log(f"no {config.eval.select_split!r} split: checkpoints are selected on {select_split!r}, "
                     "which is also reported (the numbers are optimistic)")
    ev = config.eval
    select = HeldOut.load(clips, select_split, DATA_SAMPLE_RATE, ev.max_seconds, ev.max_clips, config.seed)
    report = select if report_split == select_split else HeldOut.load(
        clips, report_split, DATA_SAMPLE_RATE, ev.max_seconds, ev.max_clips, config.seed)
    for heldout in {id(select): select, id(report): report}.values():
        for clip_id, problem in heldout.failed.items():
            reporter.log(f"skipping held-out clip {clip_id}: {problem}")
        if ev.separator:  # once: the separator does not change while the encoder is aligned
            with stage_progress(f"separating the {heldout.split} mixtures with {ev.separator}", len(heldout),
                                show=bool(reporter.progress)) as advance:
                heldout.estimates = separate_heldout_mixtures(ev.separator, heldout, DATA_SAMPLE_RATE, config.seed, device, advance)
    return select, report


def run_alignment(
    config: AlignConfig,
    dataset_dir: str | Path,
    out_dir: str | Path,
    device: str | torch.device = "cpu",
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Run (or resume) the selected stages; returns the content of OUT/metrics.json."""
    reporter = reporter or Reporter()
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    clips = read_clips(dataset_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_run_config(out_dir, config, dataset_dir)
    train_clips = [c for c in clips if c.split == "train"]
    if not train_clips:
        raise MarsctlError(f"{dataset_dir}: no kept clips in the train split")
    cache = AudioCache(DATA_SAMPLE_RATE, config.audio_cache_clips)
    neighbors = acoustic_neighbors(class_profiles(train_clips, cache), config.hard_negative_neighbors)
    pool = TrainingPool(train_clips, cache, neighbors, reporter.log)
    framed = [c for c in train_clips if c.frame_paths]
    image_pool = TrainingPool(framed, cache, neighbors, reporter.log) if len({c.label for c in framed}) >= 2 else None
    if 3 in config.stages and image_pool is None:
        raise ConfigError(f"{dataset_dir}: stage 3 (audio-image) needs clips with frames of two or more classes; use --stages 1,2")
    select, report = _held_out(clips, config, reporter, device)
    reporter.log(
        f"{len(train_clips)} training clips, {len(pool.labels)} classes; held-out: {len(select)} ({select.split}) "
        f"and {len(report)} ({report.split}) clips"
    )

    summary_path = out_dir / "metrics.json"
    summary: dict[str, Any] = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary.update({"encoder": config.encoder, "dataset": str(dataset_dir), "stages": {}})
    summary["skipped_heldout_clips"] = {**select.failed, **report.failed}
    previous_best: Path | None = None
    for stage in config.stages:
        stage_dir = out_dir / f"stage{stage}"
        done_path = stage_dir / "metrics.json"
        if done_path.is_file():
            result = json.loads(done_path.read_text(encoding="utf-8"))
            reporter.log(f"stage {stage} ({STAGE_NAMES[stage]}) already finished; skipping")
        else:
            if previous_best is None:
                encoder = load_encoder(config.encoder, device, image_model=config.image_model or None)
            else:
                encoder = load_encoder(previous_best, device)
            if encoder.anchor_fusion is None:
                with torch.random.fork_rng(devices=[]):  # seeded: a rerun is the same run
                    torch.manual_seed(config.seed)
                    encoder.anchor_fusion = AnchorFusion(encoder.embedding_dim, config.anchor_rank).to(device)
            if "initial" not in summary and stage == config.stages[0]:
                summary["initial"] = evaluate_alignment(encoder, report, DATA_SAMPLE_RATE, config.eval.batch_size, config.seed)
                write_json_atomic(summary_path, summary)
            encoder.unfreeze_trainable()
            if config.freeze_text:
                encoder.text_head.requires_grad_(False)  # text embeddings stay the starting encoder's
            if stage == 3 and "image" not in encoder.anchor_fusion.modalities:
                encoder.anchor_fusion.modalities = encoder.anchor_fusion.modalities + ("image",)
            result = _run_stage(stage, encoder, pool, image_pool, select, report, config, stage_dir, reporter)
        summary["stages"][str(stage)] = result
        write_json_atomic(summary_path, summary)
        if reporter.on_stage_end:
            reporter.on_stage_end(stage, result)
        previous_best = stage_dir / "best"

    assert previous_best is not None
    final = load_encoder(previous_best)
    lines = ["## Alignment (marsctl align)", "", f"Dataset: `{dataset_dir}`; stages: {', '.join(map(str, config.stages))}.", ""]
    lines += ["| stage | split | t->a R@1 | a->t R@1 | a->a R@1 | gap (text) | gap (anchor) |", "|---|---|---|---|---|---|---|"]
    for stage, result in summary["stages"].items():
        m = result["report"]
        lines.append(
            f"| {stage} {STAGE_NAMES[int(stage)]} | {m.get('split')} | {m.get('text_to_audio_R@1', float('nan')):.3f} | "
            f"{m.get('audio_to_text_R@1', float('nan')):.3f} | {m.get('audio_to_audio_R@1', float('nan')):.3f} | "
            f"{m.get('gap_text', float('nan')):.4f} | {m.get('gap_anchor', float('nan')):.4f} |"
        )
    save_encoder(final, out_dir / "encoder", card_extra="\n".join(lines))
    summary["final_encoder"] = str(out_dir / "encoder")
    write_json_atomic(summary_path, summary)
    return summary


def _save_state(path: Path, encoder: ProjectedEncoder, optimizer: torch.optim.Optimizer, gen: torch.Generator,
                step: int, best_score: float, best_step: int) -> None:
    state = {
        "model": encoder.persistent_state_dict(),
        "optimizer": optimizer.state_dict(),
        "generator": gen.get_state(),
        "step": step,
        "best_score": best_score,
        "best_step": best_step,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _run_stage(stage: int, encoder: ProjectedEncoder, pool: TrainingPool, image_pool: TrainingPool | None,
               select: HeldOut, report: HeldOut, config: AlignConfig, stage_dir: Path, reporter: Reporter) -> dict[str, Any]:
    cfg = config.stage_config(stage)
    stage_dir.mkdir(parents=True, exist_ok=True)
    encoder.train()
    optimizer = torch.optim.AdamW(encoder.trainable_parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(config.seed * 1000 + stage)
    step, best_score, best_step = 0, -math.inf, 0
    state_path, log_path, best_dir = stage_dir / "state.pt", stage_dir / "log.jsonl", stage_dir / "best"
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        encoder.load_persistent_state_dict(state["model"], str(state_path))
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        step, best_score, best_step = int(state["step"]), float(state["best_score"]), int(state["best_step"])
        reporter.log(f"stage {stage} ({STAGE_NAMES[stage]}): resuming at step {step}/{cfg.steps}")
        if log_path.is_file():  # forget log lines written after the state we resume from
            kept = [line for line in log_path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            with atomic_path(log_path) as tmp:
                tmp.write_text("".join(line + "\n" for line in kept))
    earlier = [s for s in config.stages if s < stage]
    objectives = Objectives(encoder, pool, image_pool, config)
    bar = StepProgress(f"stage {stage} {STAGE_NAMES[stage]}", cfg.steps, step, show=bool(reporter.progress))
    started = time.monotonic()
    with log_path.open("a", encoding="utf-8") as log:
        while step < cfg.steps:
            replay = bool(earlier) and float(torch.rand(1, generator=gen)) < cfg.replay_fraction
            objective = earlier[int(torch.randint(len(earlier), (1,), generator=gen))] if replay else stage
            terms = objectives(objective, gen)
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            torch.nn.utils.clip_grad_norm_(encoder.trainable_parameters(), cfg.grad_clip_norm)
            optimizer.step()
            step += 1
            record = {"step": step, "objective": STAGE_NAMES[objective], "replay": replay,
                      "temperature": encoder.temperature_scale().item()}
            record.update({name: value.item() for name, value in terms.items()})
            if step % cfg.eval_every == 0 or step == cfg.steps:
                metrics = evaluate_alignment(encoder, select, DATA_SAMPLE_RATE, config.eval.batch_size, config.seed)
                score = selection_score(stage, metrics, config.stages, ascent=trains_ascent(cfg))
                record["select_score"] = score
                if score > best_score:
                    best_score, best_step = score, step
                    save_encoder(encoder, best_dir)
            log.write(json.dumps(record) + "\n")
            log.flush()
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                _save_state(state_path, encoder, optimizer, gen, step, best_score, best_step)
            if reporter.on_step is not None:
                reporter.on_step(stage, step, record)
            bar.update(step, f"loss {record['total']:.3f}")
    bar.stop()
    best = load_encoder(best_dir, encoder.device)
    result = {
        "stage": stage,
        "name": STAGE_NAMES[stage],
        "steps": cfg.steps,
        "best_step": best_step,
        "select_score": best_score,
        "select": evaluate_alignment(best, select, DATA_SAMPLE_RATE, config.eval.batch_size, config.seed),
        "report": evaluate_alignment(best, report, DATA_SAMPLE_RATE, config.eval.batch_size, config.seed),
        "skipped_clips": dict(pool.failed, **(image_pool.failed if image_pool else {})),
        "seconds_this_run": round(time.monotonic() - started, 1),
        "config": to_mapping(cfg),
    }
    write_json_atomic(stage_dir / "metrics.json", result)
    reporter.log(format_stage_report(result))
    return result


def format_stage_report(result: dict[str, Any]) -> str:
    m = result["report"]
    parts = [f"stage {result['stage']} ({result['name']}) best step {result['best_step']} on {m.get('split')}:"]
    for key in ("text_to_audio_R@1", "text_to_audio_R@5", "audio_to_text_R@1", "audio_to_text_R@5",
                "audio_to_audio_R@1", "audio_to_image_R@1", "image_to_audio_R@1",
                "gap_text", "gap_audio", "gap_anchor", "chance_R@1",
                "zero_shot_target_acc", "zero_shot_mixture_acc", "zero_shot_estimate_acc", "gap_text_estimate",
                "leakage_concordance_text", "leakage_concordance_anchor", "ascent_si_sdr_text", "ascent_si_sdr_anchor"):
        if key in m:
            parts.append(f"{key}={m[key]:.3f}")
    return " ".join(parts)
