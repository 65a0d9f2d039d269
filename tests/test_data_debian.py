"""The ``debian`` source kind on tiny ``.deb`` files that the tests build with ``dpkg-deb --build``."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from marsctl.audio import load_audio, save_audio
from marsctl.data.build import build
from marsctl.data.debian import DebianSource, Rule, glob_to_regex, make_clips, match_rules
from marsctl.data.debian_packages import PackageInfo, download_command, obtain_package
from marsctl.data.fetch import FetchOptions, fetch
from marsctl.data.manifest import load_clips
from marsctl.data.recipe import load_recipe, recipe_from_mapping
from marsctl.errors import ConfigError
from marsctl.recipe_paths import find_recipe

SR = 16_000
needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb (Debian/Ubuntu)")
RESERVED = ("0ad-data", "0ad-data-common", "freepats", "timgm6mb-soundfont", "csound-soundfont", "gcompris")


def tone(seconds: float, freq: float = 440.0, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def make_deb(folder: Path, package: str, version: str, files: dict[str, np.ndarray], licence: str = "CC0-1.0") -> Path:
    """A real .deb holding audio files under usr/share/games/<package>/ and a copyright file."""
    tree = folder / f"tree-{package}"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        f"Package: {package}\nVersion: {version}\nArchitecture: all\nMaintainer: t <t@example.org>\nDescription: test sounds\n",
        encoding="utf-8")
    for rel, wave in files.items():
        save_audio(tree / "usr/share/games" / package / rel, wave, SR)
    doc = tree / "usr/share/doc" / package
    doc.mkdir(parents=True)
    (doc / "copyright").write_text(f"Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\nLicense: {licence}\n",
                                   encoding="utf-8")
    debs = folder / "debs"
    debs.mkdir(exist_ok=True)
    deb = debs / f"{package}_{version}_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(tree), str(deb)], check=True, capture_output=True)
    shutil.rmtree(tree)
    return deb


def _source(**overrides) -> DebianSource:
    settings = {"rules": [{"package": "p", "glob": "*.wav", "label": "x", "group": "g", "split": "train"}], **overrides}
    return DebianSource(**settings)


# ---------------------------------------------------------------- clips and rules (no package needed)


def test_long_recordings_are_cut_into_windows_and_short_takes_into_sequences():
    source = _source(clip_seconds=2.0, max_windows_per_recording=2, max_sequences_per_group=3)
    long = tone(5.3)
    clips = make_clips([long], source, SR, np.random.default_rng(0))
    assert len(clips) == 2  # 5.3 s -> two whole 2 s windows (capped at 2)
    np.testing.assert_array_equal(clips[1][0], long[2 * SR : 4 * SR])
    assert clips[1][1] == [0]

    takes = [tone(0.3, 300), tone(0.2, 600)]
    clips = make_clips(takes, source, SR, np.random.default_rng(0))
    assert len(clips) == 2 and all(len(c) == 2 * SR for c, _ in clips)
    for clip, used in clips:  # a sequence holds both takes and silent gaps between them
        assert np.abs(clip).max() > 0.25
        assert (np.abs(clip) < 1e-9).mean() > 0.2
        assert used == [0, 1]
    again = make_clips(takes, source, SR, np.random.default_rng(0))
    assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(clips, again))  # seeded
    other = make_clips(takes, source, SR, np.random.default_rng(1))
    assert not all(np.array_equal(a, b) for (a, _), (b, _) in zip(clips, other))


def test_glob_rules_stay_within_a_folder_unless_double_star():
    import re

    assert re.fullmatch(glob_to_regex("snd/dog_*.wav"), "snd/dog_bark1.wav")
    assert not re.fullmatch(glob_to_regex("snd/*.wav"), "snd/sub/dog.wav")
    assert re.fullmatch(glob_to_regex("**/dog?.ogg"), "a/b/dog1.ogg")
    assert re.fullmatch(glob_to_regex("**/dog?.ogg"), "dog2.ogg")
    assert re.fullmatch(glob_to_regex("snd/[!c]at.wav"), "snd/bat.wav")
    assert not re.fullmatch(glob_to_regex("snd/[!c]at.wav"), "snd/cat.wav")


def _unpacked(root: Path, files: dict[str, np.ndarray]) -> dict[str, PackageInfo]:
    for rel, wave in files.items():
        save_audio(root / rel, wave, SR)
    return {"p": PackageInfo("p", "1.0-1", root / "p.deb", "0" * 64, root)}


def test_rules_match_label_and_split_and_drop_duplicate_files(tmp_path):
    packages = _unpacked(tmp_path / "pkg", {
        "snd/dog_bark1.wav": tone(0.5, 200), "snd/dog_bark2.wav": tone(0.5, 210),
        "snd/dog_whine1.wav": tone(0.5, 900), "copy/dog_bark1.wav": tone(0.5, 200), "snd/cat1.wav": tone(0.5, 500),
    })
    rules = (
        Rule("p", r"(snd|copy)/dog_bark\d\.wav", "dog", "p-bark", "train"),
        Rule("p", r"snd/dog_whine\d\.wav", "dog", "p-whine", "test"),
    )
    groups, unmatched = match_rules(packages, rules)
    by_group = {g.group: g for g in groups}
    assert [t.path for t in by_group["p-bark"].takes] == ["copy/dog_bark1.wav", "snd/dog_bark2.wav"]  # snd/dog_bark1 = copy: dropped
    assert [t.path for t in by_group["p-whine"].takes] == ["snd/dog_whine1.wav"]
    assert by_group["p-whine"].split == "test" and by_group["p-bark"].label == "dog" and unmatched == []
    assert by_group["p-bark"].takes[0].sha256 == hashlib.sha256((tmp_path / "pkg/copy/dog_bark1.wav").read_bytes()).hexdigest()

    leaking = (rules[0], Rule("p", r"copy/dog_bark1\.wav", "dog", "p-copy", "test"))
    with pytest.raises(ConfigError, match="two rules"):
        match_rules(packages, leaking)
    same_content_other_split = (
        Rule("p", r"snd/dog_bark\d\.wav", "dog", "p-bark", "train"),
        Rule("p", r"copy/dog_bark\d\.wav", "dog", "p-copy", "test"),
    )
    with pytest.raises(ConfigError, match="same content"):
        match_rules(packages, same_content_other_split)
    _, unmatched = match_rules(packages, rules + (Rule("p", r"snd/cow\d\.wav", "cow", "p-cow", "train"),))
    assert [r.group for r in unmatched] == ["p-cow"]


def _zip_of_waves(path: Path, members: dict[str, np.ndarray], scratch: Path) -> None:
    import zipfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, wave in members.items():
            save_audio(scratch / "member.wav", wave, SR)
            zf.write(scratch / "member.wav", name)


def test_archive_rules_match_zip_members_extracted_once_into_the_cache(tmp_path):
    import zipfile

    packages = _unpacked(tmp_path / "pkg", {"data/snd/loose.wav": tone(0.5, 300)})
    _zip_of_waves(tmp_path / "pkg/data/sfx.pk3", {
        "sound/gun1.wav": tone(0.3, 700), "sound/gun2.wav": tone(0.3, 710), "sound/rain.wav": tone(2.5, 150),
        "../escape.wav": tone(0.3, 900),  # a member that would leave the cache: never extracted
    }, tmp_path)
    source = DebianSource(prefixes={"p": "data/"}, rules=[
        {"package": "p", "archive": "sfx.pk3", "regex": r"sound/gun\d\.wav", "label": "gunshots", "group": "p-guns", "split": "train"},
        {"package": "p", "archive": "sfx.pk3", "glob": "sound/rain.wav", "label": "rain", "group": "p-rain", "split": "test"},
        {"package": "p", "archive": "sfx.pk3", "glob": "*.wav", "label": "x", "group": "p-escape", "split": "val"},
        {"package": "p", "archive": "absent.zip", "glob": "*.wav", "label": "x", "group": "p-absent", "split": "val"},
        {"package": "p", "glob": "snd/loose.wav", "label": "x", "group": "p-loose", "split": "val"},
    ])
    rules = source.parsed_rules()
    assert rules[0].archive == "data/sfx.pk3" and rules[0].pattern == r"(?:sound/gun\d\.wav)"  # the prefix goes with the archive
    groups, unmatched = match_rules(packages, rules)
    by_group = {g.group: g for g in groups}
    assert [t.path for t in by_group["p-guns"].takes] == ["data/sfx.pk3!sound/gun1.wav", "data/sfx.pk3!sound/gun2.wav"]
    assert by_group["p-rain"].split == "test" and by_group["p-loose"].takes[0].path == "data/snd/loose.wav"
    assert {r.group for r in unmatched} == {"p-escape", "p-absent"}
    with zipfile.ZipFile(tmp_path / "pkg/data/sfx.pk3") as zf:
        member = zf.read("sound/gun1.wav")
    take = by_group["p-guns"].takes[0]
    assert take.sha256 == hashlib.sha256(member).hexdigest() and Path(take.file).read_bytes() == member
    assert Path(take.file).is_relative_to(tmp_path / "pkg.members")  # beside the unpacked tree, not in it
    assert not (tmp_path / "escape.wav").exists() and not list(tmp_path.rglob("escape.wav"))
    stamp = Path(take.file).stat().st_mtime_ns
    again, _ = match_rules(packages, rules)
    assert again == groups and Path(take.file).stat().st_mtime_ns == stamp  # extracted once
    with pytest.raises(ConfigError, match="archive must be a relative path"):
        DebianSource(rules=[{"package": "p", "archive": "../x.zip", "glob": "*", "label": "x", "group": "g", "split": "train"}])


def test_per_file_rules_make_every_file_its_own_group_in_the_rule_split(tmp_path):
    packages = _unpacked(tmp_path / "pkg", {
        "voices/a/Hello.wav": tone(0.4, 300), "voices/a/Bye.wav": tone(0.4, 320), "voices/b/Hello.wav": tone(0.4, 340),
    })
    rule = {"package": "p", "regex": r"voices/a/\w+\.wav", "label": "speech", "group": "p-a", "split": "val", "per_file": True}
    groups, _ = match_rules(packages, DebianSource(rules=[rule]).parsed_rules())
    assert [(g.group, g.split, g.label, [t.path for t in g.takes]) for g in groups] == [
        ("p-a.Bye", "val", "speech", ["voices/a/Bye.wav"]), ("p-a.Hello", "val", "speech", ["voices/a/Hello.wav"])]
    clash = {"package": "p", "glob": "voices/b/Hello.wav", "label": "greeting", "group": "p-a.Hello", "split": "val"}
    with pytest.raises(ConfigError, match="group 'p-a.Hello'"):
        match_rules(packages, DebianSource(rules=[rule, clash]).parsed_rules())
    with pytest.raises(ConfigError, match="per_file must be true or false"):
        DebianSource(rules=[{**rule, "per_file": "yes"}])


def test_recipe_section_errors_name_the_rule():
    rule = {"package": "p", "glob": "*.wav", "label": "x", "group": "g", "split": "train"}
    with pytest.raises(ConfigError, match=r"rules\[0\].*exactly one of glob or regex"):
        DebianSource(rules=[{**rule, "regex": ".*"}])
    with pytest.raises(ConfigError, match=r"rules\[1\].*split"):
        DebianSource(rules=[rule, {**rule, "group": "h", "split": "holdout"}])
    with pytest.raises(ConfigError, match="group 'g' has rules with label/split"):
        DebianSource(rules=[rule, {**rule, "glob": "*.ogg", "split": "test"}])
    with pytest.raises(ConfigError, match=r"rules\[0\].*unknown key"):
        DebianSource(rules=[{**rule, "lable": "y"}])
    with pytest.raises(ConfigError, match="no rules"):
        DebianSource()
    for key, value in (("max_windows_per_recording", 0), ("max_sequences_per_group", -1), ("workers", 0), ("seed", -1),
                       ("clip_seconds", 0.0)):
        with pytest.raises(ConfigError, match=rf"^debian\.{key} must be in .*got {value}$"):
            DebianSource(rules=[rule], **{key: value})


def test_download_is_apt_get_download_of_the_package_alone():
    assert download_command("minetest-data") == ["apt-get", "download", "minetest-data"]


# ---------------------------------------------------------------- the source kind end to end


def _tiny_recipe(tmp_path: Path, extra_rules: list[dict] | None = None, **source) -> dict:
    rules = [
        {"package": "fake-farm", "glob": "sounds/dog_bark*.wav", "label": "dog barking", "group": "farm-dog-bark", "split": "train"},
        {"package": "fake-farm", "regex": r"sounds/dog_growl\d\.wav", "label": "dog barking", "group": "farm-dog-growl", "split": "test"},
        {"package": "fake-farm", "glob": "ambience/rain.wav", "label": "rain", "group": "farm-rain", "split": "train"},
        {"package": "fake-farm", "glob": "ambience/rain_copy.wav", "label": "rain", "group": "farm-rain", "split": "train"},
        {"package": "fake-farm", "glob": "ambience/storm.ogg", "label": "rain", "group": "farm-storm", "split": "test"},
    ] + (extra_rules or [])
    return {
        "name": "debian-tiny",
        "labels": ["dog barking", "rain"],
        "debian": {"prefixes": {"fake-farm": "usr/share/games/fake-farm/"}, "rules": rules,
                   "debs": str(tmp_path / "debs"), "cache_dir": str(tmp_path / "cache"), "download": False,
                   "clip_seconds": 2.0, "max_sequences_per_group": 3, **source},
        "filter": {"min_duration_s": 1.0, "silence_threshold_db": -60.0, "max_silence_ratio": 0.8},
        "mix": {"mixtures_per_split": {"val": 0, "test": 2}},
    }


def _farm_deb(tmp_path: Path) -> Path:
    rain = tone(4.5, 150) + tone(4.5, 2900, 0.1)
    return make_deb(tmp_path, "fake-farm", "2.0-1", {
        "sounds/dog_bark1.wav": tone(0.3, 700), "sounds/dog_bark2.wav": tone(0.25, 800),
        "sounds/dog_growl1.wav": tone(0.6, 120), "sounds/dog_growl2.wav": tone(0.5, 140),
        "ambience/rain.wav": rain, "ambience/rain_copy.wav": rain,  # the same content twice: used once
        "ambience/storm.ogg": tone(4.2, 90), "ambience/unlabelled.wav": tone(1.0, 1000),
    }, licence="CC-BY-SA-3.0")


@needs_dpkg
def test_build_labels_splits_by_group_and_records_provenance(tmp_path):
    deb = _farm_deb(tmp_path)
    recipe = recipe_from_mapping(_tiny_recipe(tmp_path))
    out = tmp_path / "data"
    summary = build(recipe, out, FetchOptions(progress=False))
    assert summary.n_failed == 0

    clips = load_clips(out).to_pandas()
    assert set(clips["label"]) == {"dog barking", "rain"}
    groups = clips["source"].str.extract(r"\[group (.+)\]$")[0]
    assert groups.notna().all()
    assert (clips["group"] == groups).all()  # the manifest's group column (union datasets keep it)
    assert clips.groupby(groups)["split"].nunique().max() == 1  # every group in one split
    assert set(clips.loc[groups == "farm-dog-growl", "split"]) == {"test"}
    assert set(clips.loc[groups == "farm-dog-bark", "split"]) == {"train"}
    rain = clips[groups == "farm-rain"]
    assert len(rain) == 2  # 4.5 s -> two 2 s windows, the duplicate file adds nothing
    assert all("ambience/rain.wav" in s and "rain_copy" not in s for s in rain["source"])
    assert all(s.startswith("debian:fake-farm=2.0-1:usr/share/games/fake-farm/") for s in clips["source"])
    for path in clips["audio_path"]:
        assert len(load_audio(out / path)) == 2 * SR

    record = json.loads((out / "provenance/debian.json").read_text())
    package = record["packages"]["fake-farm"]
    assert package["version"] == "2.0-1"
    assert package["sha256"] == hashlib.sha256(deb.read_bytes()).hexdigest()
    assert "CC-BY-SA-3.0" in (out / package["copyright"]).read_text()
    assert [t["source"].rsplit("/", 1)[1] for t in record["groups"]["farm-dog-growl"]["takes"]] == ["dog_growl1.wav", "dog_growl2.wav"]
    assert record["groups"]["farm-storm"]["split"] == "test"
    card = json.loads((out / "dataset.json").read_text())
    assert card["source"] == "debian" and card["config"]["debian"]["rules"][0]["group"] == "farm-dog-bark"
    assert card["counts"]["mixtures_per_split"] == {"test": 2}

    again = fetch(recipe, out, FetchOptions(progress=False))  # resumable: every group is reused
    assert again.units_run == 0 and again.units_reused == 4
    assert (tmp_path / "cache/unpacked").is_dir() and not (tmp_path / "debs/unpacked").exists()


@needs_dpkg
def test_a_corrupt_and_a_missing_package_are_one_logged_skip_each(tmp_path, caplog):
    _farm_deb(tmp_path)
    (tmp_path / "debs" / "fake-broken_1.0_all.deb").write_bytes(b"!<arch>\nthis is not a debian package\n")
    extra = [
        {"package": "fake-broken", "glob": "**/*.wav", "label": "rain", "group": "broken-rain", "split": "val"},
        {"package": "fake-absent", "glob": "**/*.wav", "label": "rain", "group": "absent-rain", "split": "val"},
        {"package": "fake-farm", "glob": "sounds/cat*.wav", "label": "rain", "group": "farm-no-cat", "split": "val"},
    ]
    recipe = recipe_from_mapping(_tiny_recipe(tmp_path, extra))
    out = tmp_path / "data"
    with caplog.at_level("WARNING", logger="marsctl.data.debian"):
        summary = build(recipe, out, FetchOptions(progress=False))
    assert summary.skipped == {"package_unavailable": 2, "rule_matches_nothing": 1}
    assert summary.n_failed == 3 and summary.kept > 0  # the build went on with fake-farm
    lines = [json.loads(line) for line in (out / "logs/failures.jsonl").read_text().splitlines()]
    reasons = {line["where"]: line["reason"] for line in lines}
    assert "dpkg-deb" in reasons["debian package fake-broken"] and "\n" not in reasons["debian package fake-broken"]
    assert "no fake-absent_*.deb" in reasons["debian package fake-absent"]
    warnings = [r.getMessage() for r in caplog.records]
    assert sum("fake-broken" in w for w in warnings) == 1 and sum("fake-absent" in w for w in warnings) == 1
    assert all("\n" not in w for w in warnings)
    assert "fake-broken" not in json.loads((out / "provenance/debian.json").read_text())["packages"]


@needs_dpkg
def test_a_package_is_unpacked_once_into_the_cache(tmp_path):
    deb = make_deb(tmp_path, "fake-sfx", "1.2-3", {"boom.wav": tone(0.5)})
    info = obtain_package("fake-sfx", tmp_path / "cache", deb.parent, download=False)
    assert info.version == "1.2-3" and info.sha256 == hashlib.sha256(deb.read_bytes()).hexdigest()
    assert (info.root / "usr/share/games/fake-sfx/boom.wav").is_file()
    assert info.root.parent == tmp_path / "cache" / "unpacked"
    marker = info.root / ".complete"
    stamp = marker.stat().st_mtime_ns
    again = obtain_package("fake-sfx", tmp_path / "cache", deb.parent, download=False)
    assert again.root == info.root and again.sha256 == info.sha256
    assert marker.stat().st_mtime_ns == stamp  # not unpacked (nor hashed) again


@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt-get (Debian/Ubuntu)")
def test_apt_get_download_of_an_unknown_package_is_a_one_line_reason(tmp_path):
    from marsctl.data.debian_packages import PackageUnavailable

    with pytest.raises(PackageUnavailable) as caught:
        obtain_package("marsctl-test-no-such-package", tmp_path / "cache")
    assert "apt-get download failed" in str(caught.value) and "\n" not in str(caught.value)
    assert not list((tmp_path / "cache").glob("*.deb"))


# ---------------------------------------------------------------- the shipped recipes


@pytest.mark.parametrize("name", ["everyday", "debian-sfx"])
def test_shipped_debian_recipes_split_every_group_once_and_leave_reserved_packages_out(name):
    path = find_recipe("data", name)
    recipe = load_recipe(path)
    source = recipe.source
    rules = source.parsed_rules()
    assert {r.label for r in rules} == set(recipe.labels)
    text = path.read_text()
    assert not any(reserved in text for reserved in RESERVED)
    assert not any(p.startswith(RESERVED) for p in source.packages())
    splits: dict[str, set[str]] = {}
    for rule in rules:
        splits.setdefault(rule.group, set()).add(rule.split)
    assert all(len(s) == 1 for s in splits.values())
    for label in recipe.labels:  # every class is trained; tested too whenever it has two recordings
        groups = {r.group: r.split for r in rules if r.label == label}
        assert "train" in groups.values(), label
        if len(groups) > 1 or name == "debian-sfx":
            assert {"train", "test"} <= set(groups.values()), label
    assert yaml.safe_load(text)["debian"]["rules"] == list(source.rules)
