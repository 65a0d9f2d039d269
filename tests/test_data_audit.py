"""``marsctl data audit`` on a dataset built from a tiny ``.deb`` (real reference recordings + planted faults)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from marsctl.audio import load_audio
from marsctl.cli.main import app
from marsctl.data.audit import LABELS_FILE, SUMMARY_FILE, SUMMARY_MD, AuditConfig, audit_dataset
from marsctl.data.build import build
from marsctl.data.fetch import FetchOptions
from marsctl.data.recipe import recipe_from_mapping
from marsctl.pretrained import EXAMPLE_REFERENCES_DIR
from test_data_debian import SR, make_deb, tone

needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb (Debian/Ubuntu)")
REFERENCES = EXAMPLE_REFERENCES_DIR


def _noise(seconds: float, seed: int, amplitude: float = 0.2) -> np.ndarray:
    return (amplitude * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32)


def _reference(name: str) -> np.ndarray:
    found = sorted(REFERENCES.glob(f"*/{name}.flac"))
    return load_audio(found[0], SR)


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    if shutil.which("dpkg-deb") is None:
        pytest.skip("needs dpkg-deb (Debian/Ubuntu)")
    tmp = tmp_path_factory.mktemp("audit")
    guitar, violin, cello = _reference("acoustic-guitar"), _reference("violin"), _reference("cello")
    files = {
        "guitar.wav": guitar, "violin.wav": violin, "cello.wav": cello,
        "crowd.wav": _reference("crowd-cheering"),
        "cello_quieter.wav": 0.8 * cello,                      # planted: the test cello again, in val
        "violin_head.wav": violin[: 2 * SR].copy(),             # planted: the train violin's first window, in test
        "wrong.wav": _reference("jet-plane-flying"),            # planted: a jet plane labelled violin
        "quiet.wav": _noise(2.0, 9, amplitude=3e-4),            # planted: near-silence
        "beep.wav": tone(2.0, 1000, 0.3),                       # planted: a pure tone
    }
    files |= {f"rain{i}.wav": _noise(2.0, i) for i in range(3)}
    files |= {f"hum{i}.wav": tone(2.0, 100 + 10 * i, 0.3) + tone(2.0, 200 + 20 * i, 0.1) for i in range(3)}
    files["hum_noise.wav"] = _noise(2.0, 7)                    # planted: noise labelled hum
    make_deb(tmp, "fake-refs", "1.0-1", files)
    rules = [
        ("guitar.wav", "acoustic guitar", "train"), ("violin.wav", "violin", "train"), ("cello.wav", "cello", "test"),
        ("crowd.wav", "crowd cheering", "train"), ("cello_quieter.wav", "cello", "val"), ("violin_head.wav", "violin", "test"),
        ("wrong.wav", "violin", "val"), ("quiet.wav", "rain", "val"), ("beep.wav", "hum", "val"),
        ("rain0.wav", "rain", "train"), ("rain1.wav", "rain", "train"), ("rain2.wav", "rain", "test"),
        ("hum0.wav", "hum", "train"), ("hum1.wav", "hum", "train"), ("hum2.wav", "hum", "test"), ("hum_noise.wav", "hum", "test"),
    ]
    recipe = recipe_from_mapping({
        "name": "audit-tiny",
        "labels": sorted({label for _, label, _ in rules}),
        "debian": {"prefixes": {"fake-refs": "usr/share/games/fake-refs/"}, "debs": str(tmp / "debs"), "cache_dir": str(tmp / "cache"),
                   "download": False, "clip_seconds": 2.0, "max_windows_per_recording": 2,
                   "rules": [{"package": "fake-refs", "glob": f, "label": label, "group": f"g-{f[:-4]}", "split": split}
                             for f, label, split in rules]},
        "filter": {"min_duration_s": 1.0, "silence_threshold_db": -90.0, "max_silence_ratio": 1.0, "min_loudness_lufs": -100.0},
        "mix": {"mixtures_per_split": {"val": 0, "test": 0}},
    })
    out = tmp / "data"
    summary = build(recipe, out, FetchOptions(progress=False))
    assert summary.n_failed == 0
    audit = audit_dataset(out, AuditConfig(encoder="default", knn_k=3), progress=False)
    records = {}
    for line in (out / LABELS_FILE).read_text().splitlines():
        record = json.loads(line)
        records.setdefault(record["group"], []).append(record)
    return out, audit, records


def test_a_duplicate_across_splits_is_found_exact_and_near(audited):
    out, audit, records = audited
    head = records["g-violin_head"][0]
    assert "exact_duplicate_cross_split" in head["flags"]
    assert any(clip.startswith("g-violin__") for clip in head["exact_duplicates"])
    assert any(d["cross_split"] and set(d["splits"]) == {"train", "test"} for d in audit.exact_duplicates)
    quieter = records["g-cello_quieter"]
    assert all("near_duplicate_cross_split" in r["flags"] for r in quieter)  # a gain change is no disguise
    assert all(r["nearest_other_group"]["clip_id"].startswith("g-cello__") for r in quieter)
    pairs = [d for d in audit.near_duplicates if d["cross_split"]]
    assert any({d["a"].split("__")[0], d["b"].split("__")[0]} == {"g-cello", "g-cello_quieter"} for d in pairs)
    assert not any("duplicate" in f for r in records["g-guitar"] + records["g-crowd"] for f in r["flags"])
    # different recordings of the same kind of noise share log-mel statistics, not frames: no duplicate
    assert all(r["nearest_other_group"]["cosine"] > 0.9 for r in records["g-rain2"])
    assert not any("duplicate" in f for r in records["g-rain2"] + records["g-hum_noise"] for f in r["flags"])


def test_a_mislabelled_clip_is_flagged_by_the_encoder_and_by_its_neighbours(audited):
    _, audit, records = audited
    wrong = records["g-wrong"]
    assert all("encoder_disagrees" in r["flags"] and r["encoder"]["own_rank"] > 1 for r in wrong)
    for group in ("g-guitar", "g-violin", "g-crowd"):  # the correctly labelled recordings agree with the encoder
        assert all(r["encoder"]["own_rank"] == 1 and "encoder_disagrees" not in r["flags"] for r in records[group]), group
    noise_as_hum = records["g-hum_noise"]
    assert all("knn_disagrees" in r["flags"] and r["knn"]["majority"] == "rain" for r in noise_as_hum)
    assert not any("knn_disagrees" in r["flags"] for g in ("g-hum0", "g-hum1", "g-rain0", "g-rain1") for r in records[g])
    assert audit.classes["violin"]["encoder_top1"] < 1.0 and audit.encoder == "default"


def test_spectral_checks_flag_silence_and_tones_only(audited):
    out, audit, records = audited
    assert all("near_silence" in r["flags"] for r in records["g-quiet"])
    assert all("narrowband" in r["flags"] for r in records["g-beep"])
    assert all("low_bandwidth" in r["flags"] for r in records["g-hum0"])  # 100-200 Hz: all power below 1 kHz
    for group in ("g-guitar", "g-crowd", "g-rain0"):
        assert not {"near_silence", "narrowband", "dc_offset", "clipping"} & {f for r in records[group] for f in r["flags"]}, group
    card = json.loads((out / SUMMARY_FILE).read_text())
    assert card["flags"]["near_silence"] == len(records["g-quiet"]) and card["config"]["knn_k"] == 3
    assert "| flag | clips |" in (out / SUMMARY_MD).read_text()


@needs_dpkg
def test_audit_command_prints_one_line_summary_and_refuses_a_folder_without_manifest(audited, tmp_path):
    out, _, _ = audited
    runner = CliRunner()
    done = runner.invoke(app, ["data", "audit", str(out), "--encoder", "none", "--quiet"])
    assert done.exit_code == 0, done.output
    assert "flagged" in done.output and "near_silence" in done.output
    assert "encoder" not in json.loads((out / SUMMARY_FILE).read_text()) or json.loads((out / SUMMARY_FILE).read_text())["encoder"] is None
    missing = runner.invoke(app, ["data", "audit", str(tmp_path)])
    assert missing.exit_code == 2 and "no such manifest" in missing.output
