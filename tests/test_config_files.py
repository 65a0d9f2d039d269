"""Typed configs from YAML-like mappings, and atomic writes."""

from __future__ import annotations

import dataclasses

import pytest

from marsctl.config import SignalConfig, from_mapping, to_mapping
from marsctl.errors import ConfigError
from marsctl.files import atomic_path, write_json_atomic


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str = "x"
    signal: SignalConfig = SignalConfig()
    maybe: SignalConfig | None = None


def test_from_mapping_builds_nested_configs_and_rejects_typos():
    cfg = from_mapping(Outer, {"name": "y", "signal": {"sample_rate": 22050}, "maybe": {"hop_length": 128}})
    assert cfg.signal.sample_rate == 22050 and cfg.signal.n_fft == 1024
    assert cfg.maybe is not None and cfg.maybe.hop_length == 128
    assert to_mapping(cfg)["signal"]["sample_rate"] == 22050
    with pytest.raises(ConfigError, match=r"recipe\.signal: unknown key\(s\) sample_rte"):
        from_mapping(Outer, {"signal": {"sample_rte": 1}}, where="recipe")
    with pytest.raises(ConfigError, match="hop_length"):
        SignalConfig(hop_length=0)


def test_from_mapping_reads_numbers_yaml_leaves_as_text():
    from marsctl.rl.trainer import RLConfig

    # YAML 1.1 reads 5e-4 (no dot) as a string; a recipe with it must still work
    config = from_mapping(RLConfig, {"learning_rate": "5e-4", "max_steps": 10.0, "kappa": 30, "rewards": {"weights": {"si_sdr": 1}}})
    assert (config.learning_rate, config.max_steps, config.kappa, config.rewards.weights["si_sdr"]) == (5e-4, 10, 30.0, 1.0)
    assert isinstance(config.max_steps, int) and isinstance(config.kappa, float)
    with pytest.raises(ConfigError, match=r"r\.yaml: learning_rate must be a number, got 'fast'"):
        from_mapping(RLConfig, {"learning_rate": "fast"}, "r.yaml")
    with pytest.raises(ConfigError, match="max_steps must be a whole number"):
        from_mapping(RLConfig, {"max_steps": 2.5}, "r.yaml")
    with pytest.raises(ConfigError, match="group_size must be a number"):
        from_mapping(RLConfig, {"group_size": True}, "r.yaml")


def test_signal_config_defaults_are_the_design_conventions():
    cfg = SignalConfig()
    assert (cfg.sample_rate, cfg.segment_samples, cfg.n_fft, cfg.hop_length, cfg.n_log_bins) == (16000, 65535, 1024, 256, 256)
    assert cfg.n_linear_bins == 513 and cfg.mix_source_gain == 0.5


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "a" / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert not target.exists() and list((tmp_path / "a").iterdir()) == []
    write_json_atomic(target, {"k": 1})
    assert target.read_text().strip().startswith("{") and len(list(target.parent.iterdir())) == 1
    with pytest.raises(ValueError):
        write_json_atomic(target, {"bad": float("nan")})
    assert '"k": 1' in target.read_text()  # the old file is untouched


@pytest.fixture
def umask():
    """Set the process umask for one test, then put the old one back."""
    import os

    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750), (0o002, 0o664, 0o775)])
def test_written_files_follow_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    """Before: every atomic write was 0600 (mkstemp's mode), whatever the umask."""
    import os
    import stat

    import numpy as np

    from marsctl.audio import save_audio
    from marsctl.files import current_umask, make_temp_dir, write_text_atomic

    umask(mask)
    assert current_umask() == mask
    write_json_atomic(tmp_path / "card.json", {"k": 1})
    write_text_atomic(tmp_path / "notes.md", "hello")
    save_audio(tmp_path / "clip.flac", np.zeros(1600, dtype=np.float32), 16000)
    for name in ("card.json", "notes.md", "clip.flac"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == file_mode, name
    folder = make_temp_dir(tmp_path, ".frames.")
    assert stat.S_IMODE(os.stat(folder).st_mode) == dir_mode
