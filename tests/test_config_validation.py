"""The one config-validation helper (marsctl.config.setting / validate_fields)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import pytest

from marsctl.align.config import AudioTextStageConfig
from marsctl.config import SignalConfig, ValidatedConfig, from_mapping, setting
from marsctl.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class _Example(ValidatedConfig):
    steps: int = setting(10, ge=1)
    eps: float = setting(0.2, gt=0, lt=1)
    mode: str = setting("a", choices=("a", "b"))
    cap: Optional[float] = setting(None, gt=0)


def test_valid_values_pass_and_none_is_accepted_for_optional_fields():
    assert _Example(steps=1, eps=0.5, mode="b", cap=None).steps == 1
    assert _Example(cap=3.0).cap == 3.0


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"steps": 0}, "steps must be >= 1, got 0"),
        ({"eps": 1.0}, "eps must be > 0 and < 1, got 1.0"),
        ({"eps": 0.0}, "eps must be > 0 and < 1, got 0.0"),
        ({"mode": "c"}, "mode must be one of a, b, got 'c'"),
        ({"cap": -1.0}, "cap must be > 0, got -1.0"),
    ],
)
def test_each_rule_gives_one_line_naming_field_rule_and_value(changes, message):
    with pytest.raises(ConfigError) as info:
        _Example(**changes)
    assert str(info.value) == message


def test_stage_configs_use_it_through_recipes():
    with pytest.raises(ConfigError, match="batch_size must be >= 2, got 1"):
        from_mapping(AudioTextStageConfig, {"batch_size": 1})
    with pytest.raises(ConfigError, match="replay_fraction must be >= 0 and < 1, got 1.0"):
        from_mapping(AudioTextStageConfig, {"replay_fraction": 1.0})
    with pytest.raises(ConfigError, match="sample_rate must be > 0"):
        SignalConfig(sample_rate=0)
    with pytest.raises(ConfigError, match="hop_length must be in 1..n_fft"):
        SignalConfig(hop_length=4096)


def test_a_redeclared_default_keeps_the_base_rule():
    from marsctl.models.separator import SeparatorConfig
    from marsctl.rl.config import RLConfig

    with pytest.raises(ConfigError, match="val_every must be >= 1, got 0"):  # RLConfig redeclares val_every's default
        RLConfig(val_every=0)
    with pytest.raises(ConfigError, match="estimator must be one of score_function, pathwise"):
        RLConfig(estimator="reinforce")
    with pytest.raises(ConfigError, match="kappa must be > 0"):
        SeparatorConfig(kappa=0.0)
