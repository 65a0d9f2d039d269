"""Smoke tests of the benchmark helpers (bench/sfx_prepare.py, bench/speed.py); the benchmarks
themselves are not run here."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from marsctl.audio import load_audio, save_audio
from marsctl.errors import MarsctlError

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


sfx = _load("sfx_prepare")
speed = _load("speed")
SR = sfx.SAMPLE_RATE


def tone(seconds: float, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_long_recordings_are_cut_into_windows_and_short_takes_into_sequences():
    settings = sfx.ClipSettings(clip_seconds=2.0, max_windows_per_recording=2, max_sequences_per_group=3)
    long = tone(5.3)
    clips = sfx.make_clips([long], settings, np.random.default_rng(0))
    assert len(clips) == 2  # 5.3 s -> two whole 2 s windows (capped at 2)
    np.testing.assert_array_equal(clips[1], long[2 * SR : 4 * SR])

    takes = [tone(0.3, 300), tone(0.2, 600)]
    clips = sfx.make_clips(takes, settings, np.random.default_rng(0))
    assert len(clips) == 2 and all(len(c) == 2 * SR for c in clips)
    for clip in clips:  # a sequence holds both takes and silent gaps between them
        assert np.abs(clip).max() > 0.25
        assert (np.abs(clip) < 1e-9).mean() > 0.2
    again = sfx.make_clips(takes, settings, np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(clips, again))  # seeded
    other = sfx.make_clips(takes, settings, np.random.default_rng(1))
    assert not all(np.array_equal(a, b) for a, b in zip(clips, other))


def _fake_package(root: Path, files: dict[str, np.ndarray]) -> Path:
    for rel, wave in files.items():
        save_audio(root / rel, wave, SR)
    return root


def test_rules_match_label_and_split_and_drop_duplicate_files(tmp_path):
    pkg = _fake_package(tmp_path / "pkg", {
        "snd/dog_bark1.wav": tone(0.5, 200), "snd/dog_bark2.wav": tone(0.5, 210),
        "snd/dog_whine1.wav": tone(0.5, 900), "copy/dog_bark1.wav": tone(0.5, 200), "snd/cat1.wav": tone(0.5, 500),
    })
    rules = (
        sfx.Rule("p", r"(snd|copy)/dog_bark\d\.wav", "dog", "p:bark", "train"),
        sfx.Rule("p", r"snd/dog_whine\d\.wav", "dog", "p:whine", "test"),
    )
    takes = sfx.match_rules({"p": pkg}, rules)
    assert [t.path for t in takes[rules[0]]] == ["copy/dog_bark1.wav", "snd/dog_bark2.wav"]  # snd/dog_bark1 = copy: dropped
    assert [t.path for t in takes[rules[1]]] == ["snd/dog_whine1.wav"]

    leaking = (rules[0], sfx.Rule("p", r"copy/dog_bark1\.wav", "dog", "p:copy", "test"))
    with pytest.raises(MarsctlError, match="two rules"):
        sfx.match_rules({"p": pkg}, leaking)
    same_content_other_split = (
        sfx.Rule("p", r"snd/dog_bark\d\.wav", "dog", "p:bark", "train"),
        sfx.Rule("p", r"copy/dog_bark\d\.wav", "dog", "p:copy", "test"),
    )
    with pytest.raises(MarsctlError, match="same content"):
        sfx.match_rules({"p": pkg}, same_content_other_split)
    with pytest.raises(MarsctlError, match="no file matches"):
        sfx.match_rules({"p": pkg}, rules + (sfx.Rule("p", r"snd/cow\d\.wav", "cow", "p:cow", "train"),))


def test_shipped_rules_keep_every_group_in_one_split_and_cover_train_and_test():
    groups: dict[str, set[str]] = {}
    for rule in sfx.RULES:
        groups.setdefault(rule.group, set()).add(rule.split)
        assert rule.package in sfx.PACKAGES and rule.split in ("train", "val", "test")
    assert all(len(splits) == 1 for splits in groups.values())
    for label in sfx.LABELS:
        splits = {r.split for r in sfx.RULES if r.label == label}
        assert {"train", "test"} <= splits, label


def test_prepare_lays_out_the_folder_tree_with_provenance(tmp_path, monkeypatch):
    roots = {"p": _fake_package(tmp_path / "pkg", {"a/bird1.wav": tone(0.4, 2000), "a/bird2.wav": tone(0.4, 2500), "a/rain.wav": tone(7.0, 100)})}
    # the unpacked package stands in for apt-get download + dpkg-deb -x (no network in tests)
    monkeypatch.setattr(sfx, "fetch_packages", lambda cache, debs, packages: {"p": {"deb": "p_1_all.deb", "version": "1", "sha256": "x", "root": roots["p"]}})
    rules = (
        sfx.Rule("p", r"a/bird\d\.wav", "bird", "p:bird", "train"),
        sfx.Rule("p", r"a/rain\.wav", "rain", "p:rain", "test"),
    )
    record = sfx.prepare(tmp_path / "out", tmp_path / "cache", settings=sfx.ClipSettings(clip_seconds=3.0), progress=False, rules=rules)
    audio = tmp_path / "out" / "audio"
    rain = sorted((audio / "rain" / "test").glob("*.flac"))
    birds = sorted((audio / "bird" / "train").glob("*.flac"))
    assert len(rain) == 2 and len(birds) == 2  # 7 s -> two 3 s windows; two bird sequences
    assert len(load_audio(rain[0])) == 3 * SR
    saved = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert saved["clips"] == record["clips"]
    assert {c["group"] for c in saved["clips"] if c["label"] == "bird"} == {"p:bird"}
    assert saved["groups"]["p:rain"]["takes"] == ["p:a/rain.wav"]


def test_speed_test_signal_is_deterministic_and_not_silent():
    a, b = speed.test_signal(2.0), speed.test_signal(2.0)
    assert a.dtype == np.float32 and len(a) == 2 * 16_000
    np.testing.assert_array_equal(a, b)
    assert 0.05 < np.sqrt(np.mean(a.astype(np.float64) ** 2)) < 0.5


@pytest.mark.skipif(__import__("shutil").which("dpkg-deb") is None, reason="needs dpkg-deb (Debian/Ubuntu)")
def test_fetch_packages_unpacks_a_local_deb_once(tmp_path):
    import subprocess

    tree = tmp_path / "build"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        "Package: fake-sfx\nVersion: 1.2-3\nArchitecture: all\nMaintainer: t <t@example.org>\nDescription: test\n", encoding="utf-8")
    save_audio(tree / "usr/share/games/fake/boom.wav", tone(0.5), SR)
    debs = tmp_path / "debs"
    debs.mkdir()
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(tree), str(debs / "fake-sfx_1.2-3_all.deb")], check=True, capture_output=True)
    info = sfx.fetch_packages(tmp_path / "cache", debs, ("fake-sfx",))["fake-sfx"]
    assert info["version"] == "1.2-3" and len(info["sha256"]) == 64
    assert (info["root"] / "usr/share/games/fake/boom.wav").is_file()
    marker = info["root"] / ".complete"
    stamp = marker.stat().st_mtime_ns
    assert sfx.fetch_packages(tmp_path / "cache", debs, ("fake-sfx",))["fake-sfx"]["root"] == info["root"]
    assert marker.stat().st_mtime_ns == stamp  # not unpacked again


def test_quality_report_gaps_and_oracle_shares_come_from_the_rows():
    quality = _load("quality")
    si_sdri = {"mixture": 0.0, "oracle-irm": 10.0, "supervised": 4.0, "rl": 5.5, "rl best-of-N": 6.0}
    rows = []
    for system, value in si_sdri.items():
        for n, label in enumerate(["fire", "rain", "fire", "rain"]):
            rows.append({"system": system, "query_modality": "-" if system in ("mixture", "oracle-irm") else "text",
                         "mixture_id": f"m{n // 2}", "source": n % 2, "label": label,
                         "sdr": value, "sir": value + 1, "sar": None if system == "mixture" else 20.0,
                         "si_sdr": value, "si_sdri": value + (0.5 if label == "fire" else -0.5),
                         "stft_distance": 0.1, "clap_score": 10.0})
    text, summary = quality.report("toy", rows, {"describe": "toy rows"})
    targets = summary["targets"]
    assert targets["rl_minus_sup_si_sdri_db"] == pytest.approx(1.5)
    assert targets["best_of_n_minus_sup_si_sdri_db"] == pytest.approx(2.0)
    assert targets["sup_share_of_oracle"] == pytest.approx(0.4)
    assert targets["rl_share_of_oracle"] == pytest.approx(0.55)
    assert [e["system"] for e in summary["overall"]] == list(quality.SYSTEMS)
    fire_rl = next(e for e in summary["per_class"] if e["label"] == "fire" and e["system"] == "rl")
    assert fire_rl["si_sdri_mean"] == pytest.approx(6.0) and fire_rl["n"] == 2
    assert "+1.50 dB" in text and "### toy" in text
