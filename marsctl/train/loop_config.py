"""Settings shared by the supervised and the RL trainer (one base class, checked once).

:class:`~marsctl.train.supervised.SupervisedConfig` and :class:`~marsctl.rl.trainer.RLConfig`
derive from :class:`TrainingLoopConfig`; each redeclares only the defaults that differ
between the stages (batch size, budget, learning rate, validation cadence) and adds its own
fields. Recipes fill them by name (:func:`marsctl.config.load_recipe`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from marsctl.errors import ConfigError
from marsctl.models.query import MODALITIES
from marsctl.train.schedule import warmup_cosine


@dataclasses.dataclass(frozen=True)
class TrainingLoopConfig:
    """The data, optimizer, schedule, validation, checkpoint and launch settings of a training loop."""

    #: dataset directory (output of ``marsctl data build``)
    data: str = ""
    num_sources: int = 2
    #: mixtures per step and process
    batch_size: int = 8
    max_steps: int = 20_000
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 500
    #: cosine decay from the peak LR down to this fraction of it at max_steps
    final_lr_fraction: float = 0.1
    grad_clip_norm: float = 1.0
    #: query modalities used in training (text, audio, image); several are fused
    query_modalities: tuple[str, ...] = ("text",)
    #: Query-Mixup: random fusion weights per example (else equal weights)
    query_mixup: bool = True
    val_every: int = 500
    val_mixtures: int = 64
    val_split: str = "val"
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    seed: int = 0
    num_workers: int = 2
    #: bf16 autocast for the separator on CUDA (ignored on CPU)
    bf16: bool = True

    #: integer settings that must be at least 1 (subclasses extend the tuple)
    _positive = ("batch_size", "max_steps", "val_every", "checkpoint_every", "log_every", "num_sources")

    def __post_init__(self) -> None:
        object.__setattr__(self, "query_modalities", tuple(self.query_modalities))
        bad = set(self.query_modalities) - set(MODALITIES)
        if bad or not self.query_modalities:
            raise ConfigError(f"query_modalities must be a non-empty subset of {MODALITIES}, got {list(self.query_modalities)}")
        for name in self._positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.learning_rate <= 0:
            raise ConfigError("warmup_steps must be >= 0 and learning_rate > 0")

    def lr_lambda(self) -> Callable[[int], float]:
        """LR multiplier for ``LambdaLR``: linear warmup to 1, then cosine decay to ``final_lr_fraction``."""
        return warmup_cosine(self.warmup_steps, self.max_steps, self.final_lr_fraction)
