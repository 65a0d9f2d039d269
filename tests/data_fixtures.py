"""Test helpers for the data tests: tiny recipes and clip folders the tests make themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

SR = 16000


def tiny_soundfont_recipe(**overrides) -> dict:
    """Three instruments, a handful of 2 s clips: renders in about a second."""
    recipe = {
        "name": "sf-tiny",
        "labels": ["flute", "tuba", "violin"],
        "soundfont": {
            "programs": {"flute": 73, "tuba": 58, "violin": 40},
            "ranges": {"flute": [60, 96], "tuba": [28, 58], "violin": [55, 100]},
            "melody_works": ["essenFolksong/altdeu10"],
            "melodies_per_split": {"train": 4, "val": 2, "test": 2},
            "clips_per_class": {"train": 3, "val": 1, "test": 2},
            "clip_duration_s": 2.0,
        },
        "filter": {"min_duration_s": 1.0, "silence_threshold_db": -60.0, "max_silence_ratio": 0.6},
        "mix": {"mixtures_per_split": {"val": 2, "test": 3}},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    return recipe


def write_tone(path: Path, freq: float, seconds: float = 3.0, amplitude: float = 0.3, sr: int = SR) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    wave = (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), wave, sr)
    return wave
