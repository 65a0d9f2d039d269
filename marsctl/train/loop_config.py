"""Settings shared by the supervised and the RL trainer (one base class, checked once).

:class:`~marsctl.train.supervised.SupervisedConfig` and :class:`~marsctl.rl.trainer.RLConfig`
derive from :class:`TrainingLoopConfig`; each redeclares only the defaults that differ
between the stages (batch size, budget, learning rate, validation cadence) and adds its own
fields. Recipes fill them by name (:func:`marsctl.config.load_recipe`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

from marsctl.config import ValidatedConfig, setting
from marsctl.errors import ConfigError
from marsctl.models.query import MODALITIES
from marsctl.train.schedule import warmup_cosine

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class TrainingLoopConfig(ValidatedConfig):
    """The data, optimizer, schedule, validation, checkpoint and launch settings of a training loop."""

    #: dataset directory (output of ``marsctl data build``)
    data: str = ""
    num_sources: int = setting(2, ge=1)
    #: mixtures per step and process
    batch_size: int = setting(8, ge=1)
    max_steps: int = setting(20_000, ge=1)
    learning_rate: float = setting(1e-3, gt=0, le=1)
    weight_decay: float = setting(0.01, ge=0)
    warmup_steps: int = setting(500, ge=0)
    #: cosine decay from the peak LR down to this fraction of it at max_steps
    final_lr_fraction: float = setting(0.1, ge=0, le=1)
    grad_clip_norm: float = setting(1.0, gt=0)
    #: query modalities used in training (text, audio, image); several are fused
    query_modalities: tuple[str, ...] = ("text",)
    #: Query-Mixup: random fusion weights per example (else equal weights)
    query_mixup: bool = True
    val_every: int = setting(500, ge=1)
    val_mixtures: int = setting(64, ge=0)
    val_split: str = "val"
    checkpoint_every: int = setting(500, ge=1)
    #: step-* checkpoints kept (0 = all)
    keep_checkpoints: int = setting(3, ge=0)
    log_every: int = setting(10, ge=1)
    seed: int = 0
    num_workers: int = setting(2, ge=0)
    #: bf16 autocast for the separator on CUDA (ignored on CPU)
    bf16: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "query_modalities", tuple(self.query_modalities))
        bad = set(self.query_modalities) - set(MODALITIES)
        if bad or not self.query_modalities:
            raise ConfigError(f"query_modalities must be a non-empty subset of {MODALITIES}, got {list(self.query_modalities)}")

    def lr_lambda(self) -> Callable[[int], float]:
        """LR multiplier for ``LambdaLR``: linear warmup to 1, then cosine decay to ``final_lr_fraction``."""
        return warmup_cosine(self.warmup_steps, self.max_steps, self.final_lr_fraction)


def resolve_recipe_paths(config: T, recipe: str | Path | None, keys: Sequence[str], overrides: Mapping[str, Any] | None = None) -> T:
    """``config`` with the relative paths that came from ``recipe`` (not from ``overrides``) looked up
    next to the recipe file first: a recipe works from any directory. A path with nothing next to the
    recipe stays relative to the current directory (as before); ``~/x`` is expanded; Hub ids and ``default``
    pass unchanged."""
    changes = {}
    for key in keys:  # ``~/x`` is the home folder's x, wherever it was written (recipe or option)
        value = getattr(config, key)
        if isinstance(value, str) and value.startswith("~"):
            changes[key] = str(Path(value).expanduser())
    if recipe is None:
        return dataclasses.replace(config, **changes) if changes else config
    folder = Path(recipe).resolve().parent
    for key in keys:
        value = getattr(config, key)
        if not value or key in changes or (overrides or {}).get(key) is not None or Path(value).is_absolute():
            continue
        beside = folder / value
        if beside.exists():
            changes[key] = str(beside)
    return dataclasses.replace(config, **changes) if changes else config
