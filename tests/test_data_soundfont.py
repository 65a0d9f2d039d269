"""The offline soundfont recipe: real melodies, real General-MIDI instruments, deterministic renders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_fixtures import tiny_soundfont_recipe
from marsctl.audio import load_audio
from marsctl.data import soundfont
from marsctl.data.recipe import load_recipe, recipe_from_mapping

pytestmark = pytest.mark.skipif(not Path("/usr/share/sounds/sf2/FluidR3_GM.sf2").is_file(), reason="needs fluid-soundfont-gm")


def spectral_centroid(wave: np.ndarray, sr: int = 16000) -> float:
    power = np.abs(np.fft.rfft(wave)) ** 2
    freqs = np.fft.rfftfreq(len(wave), 1 / sr)
    return float((power * freqs).sum() / power.sum())


def test_shipped_recipe_maps_ten_music_classes_to_gm_programs():
    recipe = load_recipe("soundfont")
    assert len(recipe.labels) == 10 and "erhu" not in recipe.labels
    assert set(recipe.soundfont.programs) == set(recipe.labels) == set(recipe.soundfont.ranges)
    assert recipe.soundfont.programs["violin"] == 40 and recipe.soundfont.programs["flute"] == 73


def test_plan_uses_disjoint_melodies_per_split_and_varied_parameters():
    recipe = recipe_from_mapping(tiny_soundfont_recipe())
    units, skipped = soundfont.plan_units(recipe)
    assert not skipped and [u.description for u in units] == ["flute", "tuba", "violin"]
    plans = [p for u in units for p in u.items]
    assert len(plans) == 3 * (3 + 1 + 2)
    by_split = {s: {p.melody_name for p in plans if p.split == s} for s in ("train", "val", "test")}
    assert not by_split["train"] & by_split["test"] and not by_split["train"] & by_split["val"]
    assert not by_split["val"] & by_split["test"]
    pool = soundfont.melody_pool(recipe.soundfont)
    assert [len(pool[s]) for s in ("train", "val", "test")] == [4, 2, 2]
    assert len({p.velocity for p in plans}) > 5 and len({round(p.tempo_bpm) for p in plans}) > 5
    assert len({p.transpose for p in plans}) > 3 and len({p.clip_id for p in plans}) == len(plans)
    # transposition puts each melody into its instrument's range
    for p in plans:
        low, high = recipe.soundfont.ranges[p.label]
        pitches = [n + p.transpose for n, _ in p.notes if n is not None]
        assert low - 12 <= np.median(pitches) <= high + 12


def test_render_is_deterministic_audible_and_instrument_specific(tmp_path):
    recipe = recipe_from_mapping(tiny_soundfont_recipe())
    units, _ = soundfont.plan_units(recipe)
    first = {u.description: soundfont.run_unit(u, recipe, tmp_path / "a") for u in units}
    again = soundfont.run_unit(units[1], recipe, tmp_path / "b")
    for r1, r2 in zip(first["tuba"], again):
        assert np.array_equal(load_audio(tmp_path / "a" / r1.audio_path), load_audio(tmp_path / "b" / r2.audio_path))
    centroids = {}
    for label, records in first.items():
        waves = [load_audio(tmp_path / "a" / r.audio_path, None) for r in records]
        assert all(len(w) == 2 * 16000 for w in waves)
        assert all(np.sqrt(np.mean(w**2)) > 0.01 for w in waves)  # audible
        assert not np.array_equal(waves[0], waves[1])
        centroids[label] = np.median([spectral_centroid(w) for w in waves])
    # the tuba plays low, the flute high
    assert centroids["tuba"] < centroids["violin"] and centroids["tuba"] < centroids["flute"]


def test_label_without_program_is_skipped_not_fatal():
    recipe = recipe_from_mapping(tiny_soundfont_recipe(labels=["flute", "erhu"]))
    units, skipped = soundfont.plan_units(recipe)
    assert [u.description for u in units] == ["flute"]
    assert "erhu" in skipped[0].where and "no General-MIDI program" in skipped[0].reason


def test_rerun_reuses_finished_classes_and_redoes_them_when_the_recipe_changes(tmp_path):
    from marsctl.data.fetch import FetchOptions, fetch

    options = FetchOptions(progress=False)
    recipe = recipe_from_mapping(tiny_soundfont_recipe())
    first = fetch(recipe, tmp_path, options)
    assert first.units_run == 3 and len(first.ok) == 18
    again = fetch(recipe, tmp_path, options)
    assert again.units_run == 0 and again.units_reused == 3
    assert [r.to_dict() for r in again.records] == [r.to_dict() for r in first.records]
    more = recipe_from_mapping(tiny_soundfont_recipe(soundfont={"clips_per_class": {"train": 4, "val": 1, "test": 2}}))
    changed = fetch(more, tmp_path, options)
    assert changed.units_run == 3 and len(changed.ok) == 21
