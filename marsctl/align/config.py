"""Typed configuration of ``marsctl align``: one frozen dataclass per stage, one for the run.

Recipes under ``recipes/align/`` are YAML with exactly these keys (unknown keys are errors).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from marsctl.config import ValidatedConfig, from_mapping, read_yaml_file, setting
from marsctl.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class StageCommon(ValidatedConfig):
    """Settings every stage has."""

    #: optimizer steps of this stage
    steps: int = setting(2000, ge=1)
    batch_size: int = setting(64, ge=2)
    learning_rate: float = setting(1e-3, gt=0, le=1)
    weight_decay: float = setting(1e-4, ge=0)
    #: training crop length; clips shorter than this are used whole (repeat-padded)
    crop_seconds: float = setting(4.0, gt=0)
    #: share of steps that replay an earlier selected stage's objective on its own data
    replay_fraction: float = setting(0.2, ge=0, lt=1)
    #: chance that a batch slot is filled with a clip of an acoustically close class
    hard_negative_share: float = setting(0.5, ge=0, le=1)
    #: weight of the anchor-fusion (z*) loss: target vs mixture vs other clips
    anchor_weight: float = setting(0.5, ge=0)
    #: validate (and keep the best checkpoint) every this many steps
    eval_every: int = setting(200, ge=1)
    #: write the resumable training state every this many steps
    checkpoint_every: int = setting(100, ge=1)
    grad_clip_norm: float = setting(1.0, gt=0)


@dataclasses.dataclass(frozen=True)
class AudioTextStageConfig(StageCommon):
    """Stage 1: audio <-> text, symmetric InfoNCE."""

    #: the texts an audio clip is contrasted with: 'batch' (CLIP: the classes present in the batch) or
    #: 'all' (every training class's text, so the audio->text direction is a softmax over the whole
    #: vocabulary, what zero-shot classification and a text-query reward compare against)
    text_negatives: str = setting("batch", choices=("batch", "all"))
    #: share of training crops to which a crop of another class is added, quieter by a level drawn from
    #: [interference_min_db, interference_max_db] (the label stays the target's): the encoder learns to
    #: name a source that still carries some of the other one, as separated estimates do
    interference_share: float = setting(0.0, ge=0, le=1)
    interference_min_db: float = -20.0
    interference_max_db: float = -6.0
    #: weight of the reward-ascent ranking term (marsctl.align.ascent): partial separations of the
    #: batch's targets, one step up the encoder's own reward from each, the target and the mixture are
    #: ranked by SI-SDR, and the text and anchor rewards must order them the same way, so that climbing
    #: the reward (pathwise RL) raises SI-SDR. 0 = off (the paper's stage 1); checkpoints of a stage
    #: with it on are also selected on the held-out ascent (selection_score)
    ascent_ranking_weight: float = setting(0.0, ge=0)
    #: weight of the reward-gradient agreement term (marsctl.align.ascent.ascent_agreement_loss):
    #: 1 - cos(dr/dM, dSI-SDR/dM) on partial separations of the batch's targets, for the text and
    #: anchor rewards (double backward: about twice the cost of a stage-1 step). 0 = off
    ascent_agreement_weight: float = setting(0.0, ge=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.interference_min_db > self.interference_max_db:
            raise ConfigError(f"stage1.interference_min_db ({self.interference_min_db}) is above interference_max_db ({self.interference_max_db})")


@dataclasses.dataclass(frozen=True)
class AudioAudioStageConfig(StageCommon):
    """Stage 2: audio <-> audio of the same class (another clip): InfoNCE + triplet + consistency."""

    triplet_weight: float = setting(0.5, ge=0)
    triplet_margin: float = setting(0.2, ge=0)
    consistency_weight: float = setting(0.5, ge=0)
    #: augmentation of the consistency view: random gain range (dB) and noise level (dB below the signal)
    augment_gain_db: float = setting(6.0, ge=0)
    augment_snr_db: float = 20.0


@dataclasses.dataclass(frozen=True)
class AudioImageStageConfig(StageCommon):
    """Stage 3: audio <-> image (a video frame of the clip): InfoNCE + triplet."""

    triplet_weight: float = setting(0.5, ge=0)
    triplet_margin: float = setting(0.2, ge=0)


@dataclasses.dataclass(frozen=True)
class AlignEvalConfig(ValidatedConfig):
    """Held-out evaluation after every stage (and for checkpoint selection)."""

    #: split used to pick each stage's best checkpoint
    select_split: str = "val"
    #: split the reported numbers come from (falls back to select_split when empty)
    report_split: str = "test"
    #: at most this many seconds of each held-out clip are embedded (from its start)
    max_seconds: float = setting(10.0, gt=0)
    #: at most this many held-out clips per split (seeded choice; 0 = all)
    max_clips: int = setting(2000, ge=0)
    batch_size: int = setting(32, ge=1)
    #: a separator ('default', a run directory or a Hub id) that separates the held-out mixtures once;
    #: its estimates are classified zero-shot after every stage (zero_shot_estimate_acc). Empty = none
    separator: str = ""


@dataclasses.dataclass(frozen=True)
class AlignConfig(ValidatedConfig):
    """A whole ``marsctl align`` run."""

    #: starting encoder: a saved directory, 'builtin', 'aisfx', 'default', 'laion-clap:NAME' or 'laion-clap:PATH'
    encoder: str = "builtin"
    #: which stages, in order (a subset of 1, 2, 3)
    stages: tuple[int, ...] = (1, 2, 3)
    #: image trunk of a built-in starting encoder ('builtin', 'laion-clap:...'): empty = the small CNN,
    #: else a CLIP-family vision model (local directory or Hub id, e.g. openai/clip-vit-base-patch32), frozen
    image_model: str = ""
    seed: int = 0
    #: rank of the anchor fusion (low-rank bilinear pooling)
    anchor_rank: int = setting(64, ge=1, le=4096)
    #: classes counted as acoustically close to each class (hard negatives)
    hard_negative_neighbors: int = setting(3, ge=0)
    #: held-out clips kept decoded in memory; training clips are read per step with this many cached
    audio_cache_clips: int = setting(4096, ge=0)
    #: keep the text projection as it is: audio (and image) are aligned into the text space that a
    #: separator trained with the starting encoder already takes its queries from, so that separator
    #: keeps its text queries and gains audio queries (and the reward speaks the same space)
    freeze_text: bool = False
    stage1: AudioTextStageConfig = AudioTextStageConfig()
    stage2: AudioAudioStageConfig = AudioAudioStageConfig()
    stage3: AudioImageStageConfig = AudioImageStageConfig()
    eval: AlignEvalConfig = AlignEvalConfig()

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "stages", tuple(int(s) for s in self.stages))
        if not self.stages or any(s not in (1, 2, 3) for s in self.stages) or len(set(self.stages)) != len(self.stages):
            raise ConfigError(f"stages must be distinct values among 1, 2, 3; got {list(self.stages)}")
        if list(self.stages) != sorted(self.stages):
            raise ConfigError(f"stages run in order 1 -> 2 -> 3; got {list(self.stages)}")

    def stage_config(self, stage: int) -> StageCommon:
        return {1: self.stage1, 2: self.stage2, 3: self.stage3}[stage]


def parse_stages(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError as exc:
        raise ConfigError(f"--stages must look like 1,2,3; got {text!r}") from exc


def recipe_path(spec: str | Path) -> Path:
    """A recipe by name (``default`` -> the shipped ``recipes/align/default.yaml``) or by YAML path."""
    from marsctl.recipe_paths import find_recipe

    return find_recipe("align", spec)


def load_align_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> AlignConfig:
    """Read a recipe (name or YAML path; the defaults when None) and apply overrides (a mapping
    value, e.g. ``{"eval": {"separator": "default"}}``, overrides those settings of that section)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = recipe_path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such recipe file")
        data = read_yaml_file(path) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a recipe must be a mapping of settings")
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **{k: v for k, v in value.items() if v is not None}}  # one nested setting
        elif value is not None:
            data[key] = value
    return from_mapping(AlignConfig, data, str(path) if path else "align config")
