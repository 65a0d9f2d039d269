"""data build never touches what it did not write, never runs twice into one folder, and never
hangs or crashes on odd files under a folder recipe's root (issue 32, items 2-4)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from data_fixtures import write_tone
from marsctl.cli.data import data_app
from marsctl.data.build import BUILD_LOCK, sweep_temporary_files
from marsctl.hub import input_fingerprint
from marsctl.train.lock import RunLock

REPO = Path(__file__).resolve().parents[1]


def _folder_recipe(tmp_path: Path) -> Path:
    recipe = tmp_path / "folder.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "folder-loss", "labels": ["low", "high"], "folder": {"val_fraction": 0.0, "test_fraction": 0.0},
        "filter": {"min_duration_s": 1.0}, "mix": {"mixtures_per_split": {"train": 1}},
    }))
    return recipe


def _tree(root: Path) -> None:
    write_tone(root / "low" / "a.wav", 220, seconds=1.5)
    write_tone(root / "high" / "b.wav", 1760, seconds=1.5)


def test_sweep_removes_only_this_builds_temporaries_under_its_own_folders(tmp_path):
    out = tmp_path / "out"
    user = [out / "docs" / "deep" / ".draft.tmp.txt", out / "docs" / ".cache.tmp", out / ".notes.tmp",
            out / "docs" / ".x.abcd1234.tmp.txt", out / "clips" / "low" / ".draft.tmp.txt"]
    for path in user:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("mine")
    # what a killed build leaves: atomic_path temporaries in its folders and beside dataset.json
    leftovers = [out / "clips" / "low" / ".a.k2j4_x9q.tmp.flac", out / "manifests" / ".clips.0a1b2c3d.tmp.parquet",
                 out / ".dataset.zz99yy88.tmp.json"]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    assert sweep_temporary_files(out) == len(leftovers)
    assert all(p.read_text() == "mine" for p in user)
    assert not any(p.exists() for p in leftovers)


def test_second_build_into_a_locked_folder_is_refused_in_one_line(tmp_path):
    root, out = tmp_path / "tree", tmp_path / "out"
    _tree(root)
    leftover = out / "clips" / "low" / ".a.k2j4_x9q.tmp.flac"  # a live build's temporary file
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"being written")
    with RunLock(out, BUILD_LOCK, "data build"):  # the first build, alive
        result = CliRunner().invoke(data_app, ["build", str(_folder_recipe(tmp_path)), "--root", str(root), "--out", str(out), "--quiet"])
    assert result.exit_code == 2, result.output
    assert "another data build" in result.output and str(out) in result.output
    assert "Traceback" not in result.output
    assert leftover.read_bytes() == b"being written"  # the live build's file is untouched


def test_folder_build_skips_fifos_and_devices_and_hashes_only_the_files_it_read(tmp_path):
    root, out = tmp_path / "tree", tmp_path / "out"
    _tree(root)
    os.mkfifo(root / "low" / "pipe.wav")  # reading it would block forever
    (root / "low" / "noise").symlink_to("/dev/urandom")  # hashing it would never end
    (root / "high" / "noise.wav").symlink_to("/dev/urandom")
    (root / "high" / "gone.wav").symlink_to(root / "nowhere.wav")  # dangling
    (root / "high" / "loop.wav").symlink_to(root / "high" / "loop.wav")  # a symlink loop
    command = [sys.executable, "-m", "marsctl.data", "build", str(_folder_recipe(tmp_path)), "--root", str(root), "--out", str(out), "--quiet"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 1, done.stdout + done.stderr  # built, with skipped files
    assert "Traceback" not in done.stderr
    log = {Path(e["where"]).name: e for e in map(json.loads, (out / "logs/failures.jsonl").read_text().splitlines()) if "where" in e}
    assert log["pipe.wav"]["kind"] == "not_regular_file" and log["noise.wav"]["kind"] == "not_regular_file"
    assert "cannot read" in log["gone.wav"]["reason"] and "cannot read" in log["loop.wav"]["reason"]
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["inputs"]["root"]["fingerprint"].startswith("files:sha256:")
    assert json.loads((out / "dataset.json").read_text())["status"] == "complete"


def test_audio_reader_refuses_a_fifo_without_blocking(tmp_path):
    from marsctl.audio import load_audio
    from marsctl.errors import AudioError

    os.mkfifo(tmp_path / "pipe.wav")
    with pytest.raises(AudioError, match="not a regular file"):
        load_audio(tmp_path / "pipe.wav")


def test_directory_fingerprint_reads_regular_files_only(tmp_path):
    folder = tmp_path / "artifact"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"abc")
    before = input_fingerprint(folder)
    (folder / "gone.bin").symlink_to(tmp_path / "missing")
    os.mkfifo(folder / "pipe")
    (folder / "zero").symlink_to("/dev/zero")
    after = input_fingerprint(folder)  # neither blocks, nor spins, nor raises
    assert after.startswith("files:sha256:") and after != before
    assert input_fingerprint(folder) == after
