"""The offline soundfont recipe: real melodies, real General-MIDI instruments, deterministic renders."""

from __future__ import annotations

import dataclasses
import io
import subprocess
import tarfile
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


# --- several soundfonts, leave-one-soundfont-out -------------------------------------------------

FLUID = "/usr/share/sounds/sf2/FluidR3_GM.sf2"
OPL3 = "/usr/share/sounds/sf2/OPL-3_FM_128M.sf2"
needs_opl3 = pytest.mark.skipif(not Path(OPL3).is_file(), reason="needs opl3-soundfont (apt-get install opl3-soundfont)")
RESERVED = ("timgm6mb", "freepats", "csound-soundfont", "gcompris", "0ad-data")


def two_soundfont_recipe(per_split=None, **soundfont):
    fonts = [{"name": "fluidr3", "path": FLUID, "package": "fluid-soundfont-gm"},
             {"name": "opl3", "path": OPL3, "package": "opl3-soundfont"}]
    return recipe_from_mapping(tiny_soundfont_recipe(
        soundfont={"soundfonts": fonts, "soundfonts_per_split": per_split or {}, **soundfont}))


@needs_opl3
def test_each_clip_draws_its_soundfont_seeded_and_nothing_else_depends_on_it():
    single = recipe_from_mapping(tiny_soundfont_recipe(soundfont={"clips_per_class": {"train": 12, "val": 1, "test": 6}}))
    multi = two_soundfont_recipe(clips_per_class={"train": 12, "val": 1, "test": 6})
    plans = [p for u in soundfont.plan_units(multi)[0] for p in u.items]
    again = [p for u in soundfont.plan_units(multi)[0] for p in u.items]
    assert sorted(plans, key=lambda p: p.clip_id) == sorted(again, key=lambda p: p.clip_id)  # seeded
    by_font = {name: [p for p in plans if p.soundfont == name] for name in ("fluidr3", "opl3")}
    assert all(len(v) > 10 for v in by_font.values()) and len(plans) == 3 * 19
    # the choice is per clip: both soundfonts within one class and split
    assert {p.soundfont for p in plans if p.label == "tuba" and p.split == "train"} == {"fluidr3", "opl3"}
    assert all(f"soundfont={p.soundfont}" in p.source for p in plans)
    # melody, notes, tempo, loudness: the same as with one soundfont
    strip = lambda p: (p.clip_id, p.melody_name, p.transpose, p.velocity, p.tempo_bpm, p.articulation, p.start_note, p.loudness_lufs)
    legacy = [p for u in soundfont.plan_units(single)[0] for p in u.items]
    assert sorted(map(strip, plans)) == sorted(map(strip, legacy))
    assert {p.soundfont for p in legacy} == {"FluidR3_GM"} and not any("soundfont=" in p.source for p in legacy)
    # one unit (one synthesizer) per class and soundfont
    units = soundfont.plan_units(multi)[0]
    assert sorted(u.unit_id for u in units) == sorted(f"soundfont-{c}-{f}" for c in ("flute", "tuba", "violin") for f in ("fluidr3", "opl3"))
    assert all(len({p.soundfont for p in u.items}) == 1 for u in units)


@needs_opl3
def test_leave_one_soundfont_out_splits_render_the_same_test_clips_with_the_held_out_soundfont(tmp_path):
    from marsctl.data import load_clips
    from marsctl.data.build import build
    from marsctl.data.fetch import FetchOptions

    train_side = two_soundfont_recipe({"train": ["fluidr3"], "val": ["fluidr3"], "test": ["fluidr3"]})
    held_out = two_soundfont_recipe({"test": ["opl3"]}, clips_per_class={"train": 0, "val": 0, "test": 2})
    train_plans = [p for u in soundfont.plan_units(train_side)[0] for p in u.items]
    assert {p.soundfont for p in train_plans} == {"fluidr3"}
    options = FetchOptions(progress=False)
    build(train_side, tmp_path / "in", options)
    build(held_out.replace(mix=dataclasses.replace(held_out.mix, mixtures_per_split={"test": 3})), tmp_path / "out", options)
    inside = load_clips(tmp_path / "in", split="test")
    outside = load_clips(tmp_path / "out")
    assert set(outside["split"]) == {"test"} and set(outside["soundfont"]) == {"opl3"}
    assert set(load_clips(tmp_path / "in")["soundfont"]) == {"fluidr3"}
    # the same clips (ids, melodies = groups), other sounds
    assert inside["clip_id"] == outside["clip_id"] and inside["group"] == outside["group"]
    assert all(g.startswith("essenFolksong/") for g in outside["group"])
    for a, b in zip(inside, outside):
        wa, wb = load_audio(tmp_path / "in" / a["audio_path"], None), load_audio(tmp_path / "out" / b["audio_path"], None)
        assert np.sqrt(np.mean(wb**2)) > 0.01 and not np.allclose(wa, wb, atol=1e-3)
    # the fixed test mixtures pair the same clips in both datasets
    from marsctl.data import load_mixtures

    assert load_mixtures(tmp_path / "in", split="test")["source_clip_ids"] == load_mixtures(tmp_path / "out")["source_clip_ids"]


def test_soundfont_settings_errors_are_one_line_and_name_the_package(tmp_path):
    from marsctl.errors import ConfigError

    fonts = [{"name": "fluidr3", "path": FLUID, "package": "fluid-soundfont-gm"},
             {"name": "gone", "path": str(tmp_path / "missing.sf2"), "package": "some-soundfont-package"}]
    missing = recipe_from_mapping(tiny_soundfont_recipe(soundfont={"soundfonts": fonts}))
    with pytest.raises(ConfigError, match=r"missing\.sf2.*apt-get install some-soundfont-package") as err:
        soundfont.plan_units(missing)
    assert "\n" not in str(err.value)
    # a split that does not use the missing soundfont does not need it
    only_fluid = recipe_from_mapping(tiny_soundfont_recipe(soundfont={"soundfonts": fonts, "soundfonts_per_split": {
        "train": ["fluidr3"], "val": ["fluidr3"], "test": ["fluidr3"]}}))
    assert soundfont.plan_units(only_fluid)[0]
    bad = [
        ({"soundfonts": [{"name": "a", "path": FLUID}]}, "package"),
        ({"soundfonts": fonts, "soundfonts_per_split": {"test": ["nope"]}}, "unknown soundfont"),
        ({"soundfonts": fonts, "soundfonts_per_split": {"tset": ["fluidr3"]}}, "unknown split"),
        ({"soundfonts": [fonts[0], fonts[0]]}, "used twice"),
    ]
    for settings, message in bad:
        with pytest.raises(ConfigError, match=message):
            soundfont.plan_units(recipe_from_mapping(tiny_soundfont_recipe(soundfont=settings)))


def test_shipped_soundfont_recipes_never_use_reserved_soundfonts_and_hold_one_out():
    for name in ("soundfont-multi", "soundfont-loso-opl3", "soundfont-loso-opl3-heldout"):
        recipe = load_recipe(name)
        for font in soundfont.soundfont_files(recipe.source):
            assert not any(r in (font.path + font.package).lower() for r in RESERVED), font
            assert font.package  # the recipe says which package installs each file
        assert recipe.labels == load_recipe("soundfont").labels
    train_side = soundfont.soundfonts_by_split(load_recipe("soundfont-loso-opl3").source)
    held = soundfont.soundfonts_by_split(load_recipe("soundfont-loso-opl3-heldout").source)
    seen = {f.name for split in ("train", "val") for f in train_side[split]}
    assert [f.name for f in held["test"]] == ["opl3"] and "opl3" not in seen
    assert {f.name for f in train_side["test"]} == seen


OLD_COMMIT = "ff85a41"  # the code before several soundfonts


def old_code_checkout(root: Path) -> Path | None:
    """The package as it was at OLD_COMMIT, unpacked under ``root`` from this clone's history with ``git archive``
    (None where git or the commit is missing, e.g. a shallow clone)."""
    repo = Path(__file__).resolve().parents[1]
    out = root / "old-code"
    out.mkdir()
    try:
        archive = subprocess.run(["git", "-C", str(repo), "archive", OLD_COMMIT, "marsctl"], capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if archive.returncode != 0:
        return None
    tarfile.open(fileobj=io.BytesIO(archive.stdout)).extractall(out, filter="data")
    return out


def test_single_soundfont_recipe_builds_the_same_dataset_as_the_old_code(tmp_path):
    import sys

    import pyarrow.parquet as pq
    import yaml

    from marsctl.data.build import build
    from marsctl.data.fetch import FetchOptions

    base = old_code_checkout(tmp_path)
    if base is None:
        pytest.skip(f"needs commit {OLD_COMMIT} in this clone's history (git archive)")
    imported = subprocess.run([sys.executable, "-c", "import marsctl; print(marsctl.__file__)"], cwd=base, capture_output=True,
                              text=True, timeout=60)
    assert imported.stdout.strip().startswith(str(base)), imported.stdout + imported.stderr  # the old code runs, not this one
    spec = tmp_path / "sf-tiny.yaml"
    spec.write_text(yaml.safe_dump(tiny_soundfont_recipe()))
    subprocess.run([sys.executable, "-m", "marsctl", "data", "build", str(spec), "--out", str(tmp_path / "old"), "--quiet"],
                   cwd=base, check=False, capture_output=True, timeout=300)
    assert (tmp_path / "old" / "manifests" / "mixtures.parquet").is_file()
    build(load_recipe(spec), tmp_path / "new", FetchOptions(progress=False))
    for manifest in ("clips", "mixtures"):
        old = pq.read_table(tmp_path / "old" / "manifests" / f"{manifest}.parquet").to_pylist()
        new = pq.read_table(tmp_path / "new" / "manifests" / f"{manifest}.parquet").to_pylist()
        assert [{k: r[k] for k in old[0]} for r in new] == old
    for row in pq.read_table(tmp_path / "old" / "manifests" / "clips.parquet").to_pylist():
        assert np.array_equal(load_audio(tmp_path / "old" / row["audio_path"], None), load_audio(tmp_path / "new" / row["audio_path"], None))
