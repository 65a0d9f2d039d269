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


# --- bad recipe values (issue 31): one line naming the recipe, the key and the allowed range ---------

from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
#: nine nested aliases ("billion laughs"): 9**9 items once expanded, a few hundred characters of YAML
_BOMB = "[&a [" + ", ".join(["lol"] * 9) + "], " + ", ".join(
    f"&{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)
) + "]"


def _copy_recipe(tmp_path: Path, kind: str, name: str, edit) -> Path:
    """A shipped recipe with ``edit(text) -> text`` applied, written next to the test."""
    text = (REPO / "recipes" / kind / f"{name}.yaml").read_text(encoding="utf-8")
    path = tmp_path / f"{name}.yaml"
    path.write_text(edit(text), encoding="utf-8")
    return path


def _set(key: str, value: str):
    """Replace the first ``key: ...`` line's value (indentation kept)."""
    import re

    def edit(text: str) -> str:
        new, count = re.subn(rf"(?m)^(\s*{re.escape(key)}:)[^\n]*$", lambda m: f"{m.group(1)} {value}", text, count=1)
        assert count == 1, key
        return new

    return edit


def _refused(load, path: Path, *needles: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    for needle in needles:
        assert needle in message, message
    return message


def _load_data(path):
    from marsctl.data.recipe import load_recipe

    return load_recipe(path)


def _load_sup(path):
    from marsctl.train.supervised import load_supervised_config

    return load_supervised_config(path)


def _load_rl(path):
    from marsctl.rl.config import load_rl_config

    return load_rl_config(path)


def _load_align(path):
    from marsctl.align.config import load_align_config

    return load_align_config(path)


@pytest.mark.parametrize("kind, name, key, load", [("data", "soundfont", "labels", _load_data),
                                                   ("train", "soundfont-small", "query_modalities", _load_sup),
                                                   ("train", "rl", "init_model", _load_rl), ("align", "quick", "stages", _load_align)])
def test_a_yaml_alias_bomb_is_refused_in_one_line(tmp_path, kind, name, key, load):
    # the old loader built the (shared) structure; printing or copying it (the dataset card) then took gigabytes
    text = (REPO / "recipes" / kind / f"{name}.yaml").read_text(encoding="utf-8")
    path = _copy_recipe(tmp_path, kind, name, _set(key, _BOMB) if f"\n{key}:" in text else (lambda t: t + f"\n{key}: {_BOMB}\n"))
    _refused(load, path, "aliases expand it beyond 1000000 nodes")


def test_the_loader_bounds_alias_expansion_and_reads_what_pyyaml_writes():
    import yaml

    from marsctl.config import load_yaml

    shared = [1, 2]
    written = yaml.safe_dump({"a": shared, "b": shared})  # PyYAML writes &id001 / *id001 for shared objects
    assert "*id001" in written and load_yaml(written, "x.yaml") == {"a": [1, 2], "b": [1, 2]}
    assert load_yaml("base: &b {k: 1}\nother:\n  <<: *b\n", "x.yaml")["other"] == {"k": 1}
    with pytest.raises(ConfigError, match=r"^x\.yaml: not valid YAML \(aliases expand it beyond 1000000 nodes, line 1;"):
        load_yaml(f"labels: {_BOMB}\n", "x.yaml")
    with pytest.raises(ConfigError, match=r"^x\.yaml: not valid YAML \("):  # deep nesting: one line, no RecursionError
        load_yaml("[" * 100_000 + "]" * 100_000, "x.yaml")


@pytest.mark.parametrize("key, value, needle", [
    ("clip_duration_s", ".inf", "clip_duration_s must be a finite number, got inf"),
    ("gain", ".nan", "gain must be a finite number, got nan"),
    ("seed", ".inf", "seed must be a finite number, got inf"),  # an int field: the old coercion raised OverflowError
    ("tempo_bpm_range", "[70.0, .nan]", "tempo_bpm_range[1] must be a finite number, got nan"),
])
def test_non_finite_numbers_in_a_data_recipe_are_refused_at_load(tmp_path, key, value, needle):
    _refused(_load_data, _copy_recipe(tmp_path, "data", "soundfont", _set(key, value)), needle)


@pytest.mark.parametrize("key, value, needle", [
    ("learning_rate", ".inf", "learning_rate must be a finite number, got inf"),
    ("learning_rate", "1e999", "learning_rate must be a finite number, got inf"),  # YAML 1.1 text -> float inf
    ("max_steps", ".inf", "max_steps must be a finite number, got inf"),
])
def test_non_finite_numbers_in_a_training_recipe_are_refused_at_load(tmp_path, key, value, needle):
    _refused(_load_sup, _copy_recipe(tmp_path, "train", "soundfont-small", _set(key, value)), needle)


def test_non_finite_numbers_are_refused_in_rl_align_and_reward_settings(tmp_path):
    _refused(_load_rl, _copy_recipe(tmp_path, "train", "rl", _set("kl_coef", ".nan")), "kl_coef must be a finite number")
    _refused(_load_rl, _copy_recipe(tmp_path, "train", "rl", _set("si_sdr", ".inf")), "si_sdr must be a finite number, got inf")
    _refused(_load_align, _copy_recipe(tmp_path, "align", "quick", _set("stage1", "{learning_rate: .nan}")),
             "learning_rate must be a finite number, got nan")
    with pytest.raises(ConfigError, match="must be a finite number"):  # Python construction is checked the same way
        SignalConfig(mix_source_gain=float("nan"))


@pytest.mark.parametrize("key, value, needles", [
    ("clip_duration_s", "0", ("clip_duration_s must be > 0 and <= 600, got 0.0",)),
    ("clip_duration_s", "-2", ("clip_duration_s must be > 0",)),
    ("labels", "5", ("labels must be a list, got 5",)),
    ("labels", "[dog, 5]", ("labels[1] must be text, got 5",)),
    ("melody_works", "[../../../../etc/passwd]", ("melody_works", "'../../../../etc/passwd'", "plain music21 corpus name")),
    ("melody_works", "[/etc/passwd]", ("melody_works", "plain music21 corpus name")),
    ("velocity_range", "[120, 60]", ("velocity_range must be [low, high] with 1 <= low <= high <= 127, got [120, 60]",)),
    ("max_silence_ratio", "1.5", ("max_silence_ratio must be >= 0 and <= 1, got 1.5",)),
    ("exclude_labels", "['(']", ("exclude_labels", "not a regular expression")),
])
def test_values_that_crashed_deep_inside_a_data_build_are_refused_at_load(tmp_path, key, value, needles):
    _refused(_load_data, _copy_recipe(tmp_path, "data", "soundfont", _set(key, value)), *needles)


def test_a_corpus_name_that_music21_does_not_know_is_one_line_at_build(tmp_path):
    from marsctl.data.recipe import SoundfontSource
    from marsctl.data.soundfont import melody_pool

    with pytest.raises(ConfigError, match=r"melody_works: 'noSuchCollection/nothing' is not a work of music21's corpus"):
        melody_pool(SoundfontSource(melody_works=["noSuchCollection/nothing"]))


@pytest.mark.parametrize("edit, needles", [
    (lambda t: t.replace("num_levels: 7", "num_levels: 40"), ("num_levels must be in 1..8 for n_log_bins 256", "got 40")),
    (lambda t: t.replace("segment_samples: 32767", "segment_samples: 512"), ("segment_samples", "must be >= n_fft (1024), got 512")),
    (lambda t: t + "\nsignal: {n_log_bins: 600}\n" if "signal:" not in t else t.replace("signal:", "signal:\n  n_log_bins: 600", 1),
     ("n_log_bins must be in 2..513", "got 600")),
    (lambda t: t.replace("base_channels: 16", "base_channels: 0"), ("base_channels must be >= 1", "got 0")),
])
def test_window_fft_and_unet_depth_relations_are_checked_at_load(tmp_path, edit, needles):
    _refused(_load_sup, _copy_recipe(tmp_path, "train", "soundfont-small", edit), *needles)


def test_a_saved_separator_config_with_too_many_levels_is_refused():
    from marsctl.models.separator import SeparatorConfig

    from marsctl.models.separator import max_num_levels

    assert max_num_levels(SignalConfig()) == 8 and max_num_levels(SignalConfig(n_log_bins=100)) == 6
    with pytest.raises(ConfigError, match=r"num_levels must be in 1\.\.6 for n_log_bins 100"):
        from_mapping(SeparatorConfig, {"num_levels": 7, "signal": {"n_log_bins": 100}})


@pytest.mark.parametrize("key, value, needle", [
    ("kl_coef", "-1", "kl_coef must be >= 0, got -1.0"),
    ("entropy_coef", "-0.1", "entropy_coef must be >= 0, got -0.1"),
])
def test_negative_coefficients_whose_sign_matters_are_refused(tmp_path, key, value, needle):
    edit = _set(key, value) if key in (REPO / "recipes/train/rl.yaml").read_text() else (lambda t: t + f"\n{key}: {value}\n")
    _refused(_load_rl, _copy_recipe(tmp_path, "train", "rl", edit), needle)


def test_negative_loss_weights_are_refused_in_align_and_training():
    from marsctl.align.config import AlignConfig

    with pytest.raises(ConfigError, match="stage2: triplet_weight must be >= 0, got -1.0"):
        from_mapping(AlignConfig, {"stage2": {"triplet_weight": -1}}, "align")
    with pytest.raises(ConfigError, match="weight_decay must be >= 0, got -0.01"):
        from_mapping(AlignConfig, {"stage1": {"weight_decay": -0.01}}, "align")
