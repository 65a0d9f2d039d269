"""``marsctl separate`` never ships NaN, separates at the model's level, cleans its own stale temporary
files and says what went wrong in one line (issue 32, item 5 and the small items), through the real CLI
and the packaged default model."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

import marsctl
from marsctl.cli.main import app

SR = 16_000
runner = CliRunner()


def _mix(path: Path, seconds: float = 1.0, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * SR)) / SR
    wave = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.3 * np.sin(2 * np.pi * 1320 * t) + 0.02 * rng.standard_normal(len(t))
    wave = (wave / np.abs(wave).max() * scale).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, wave, SR, subtype="FLOAT")
    return wave


def separate(*args):
    return runner.invoke(app, ["separate", *map(str, args)])


def test_an_input_near_the_float32_limit_never_writes_nan(tmp_path):
    mixture = _mix(tmp_path / "loud.wav", scale=3.4e38)  # finite: the largest float32 is 3.4028e38
    assert np.isfinite(mixture).all()
    result = separate(tmp_path / "loud.wav", "-q", "violin", "-o", tmp_path / "out")
    # the estimate itself does not fit in float32 audio: the file is reported failed, nothing is written
    assert result.exit_code == 1, result.output
    assert "not finite" in result.output and "wrote 0 file(s)" in result.output and "Traceback" not in result.output
    assert not any((tmp_path / "out").rglob("*.wav")) and not any((tmp_path / "out").rglob(".*.tmp*"))


def test_the_estimate_does_not_depend_on_the_input_level():
    separator = marsctl.Separator.from_pretrained("default", device="cpu")
    t = torch.arange(2 * SR) / SR
    mixture = 0.2 * torch.sin(2 * torch.pi * 440 * t) + 0.2 * torch.sin(2 * torch.pi * 1320 * t)
    quiet, loud = (separator.separate(mixture * scale, query="violin", sample_rate=SR) for scale in (0.01, 4.0))
    peak = float((loud / 4.0).abs().max())
    assert float((quiet / 0.01 - loud / 4.0).abs().max()) < 1e-3 * peak  # float32 rounding only
    raw = marsctl.Separator.from_pretrained("default", device="cpu", normalize_level=False)
    quiet, loud = (raw.separate(mixture * scale, query="violin", sample_rate=SR) for scale in (0.01, 4.0))
    assert float((quiet / 0.01 - loud / 4.0).abs().max()) > 1e-2 * peak  # the level matters to the model itself


def test_a_killed_runs_temporary_files_are_removed_on_the_next_run(tmp_path):
    _mix(tmp_path / "a.wav")
    out = tmp_path / "out"
    stale = out / "a" / ".violin.k2j4_x9q.tmp.wav"  # what atomic_path left when the run was SIGKILLed
    mine = out / "a" / ".violin.notes.tmp.wav"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a file")
    mine.write_bytes(b"a user's file")
    result = separate(tmp_path / "a.wav", "-q", "violin", "-o", out)
    assert result.exit_code == 0, result.output
    assert not stale.exists() and mine.read_bytes() == b"a user's file"
    assert (out / "a" / "violin.wav").is_file()


def test_an_empty_folder_says_nothing_was_found_and_fails(tmp_path):
    (tmp_path / "empty").mkdir()
    result = separate(tmp_path / "empty", "-q", "violin", "-o", tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert "no audio files found" in result.output and "wrote 0" not in result.output


def test_dangling_symlinks_loops_and_fifos_are_reported_one_line_each(tmp_path):
    folder = tmp_path / "in"
    _mix(folder / "ok.wav")
    (folder / "gone.wav").symlink_to(tmp_path / "missing.wav")
    (folder / "loop.wav").symlink_to(folder / "loop.wav")
    os.mkfifo(folder / "pipe.wav")
    result = separate(folder, "-q", "violin", "-o", tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert "gone.wav: skipped: a dangling symlink" in result.output
    assert "loop.wav: skipped: a symlink loop" in result.output
    assert "pipe.wav: skipped: not a regular file" in result.output
    assert (tmp_path / "out" / "ok" / "violin.wav").is_file()


def test_a_full_disk_names_the_output_and_says_so(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", f"marsctl-{uuid.uuid4().hex[:6]}", str(full)],
                      capture_output=True).returncode != 0:
        pytest.skip("needs a small tmpfs (mount, as root)")
    try:
        _mix(tmp_path / "long.wav", seconds=3.0)  # 192 kB of float WAV: more than the 64 kB disk
        result = separate(tmp_path / "long.wav", "-q", "violin", "-o", full)
        assert result.exit_code == 1, result.output
        assert "the disk is full" in result.output and str(full) in result.output
        assert "System error" not in result.output
        assert not any(full.rglob("*.wav")) and not any(full.rglob(".*.tmp*"))
    finally:
        subprocess.run(["umount", str(full)], check=False)
