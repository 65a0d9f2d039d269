"""``marsctl separate`` under bad input (issue 16, items 6, 7, 8, 10, 11, 13, 22), through the real CLI
and the packaged default model. Each test failed on the code before the fix (ff85a41)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

from marsctl.cli.main import app

SR = 16_000
runner = CliRunner()


def _mix(path: Path, seconds: float = 0.5, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    wave = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.3 * np.sin(2 * np.pi * 660 * t) + 0.01 * rng.standard_normal(len(t))).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, wave, SR, subtype="FLOAT")
    return wave


def separate(*args: str):
    return runner.invoke(app, ["separate", *map(str, args)])


def wav_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.wav"))


def test_mapping_rows_cannot_write_outside_out(tmp_path):
    """Item 6: a row ../../x.wav fails with one line and writes nothing outside --out."""
    maps = tmp_path / "maps" / "sub"
    _mix(maps / "a.wav")
    _mix(tmp_path / "victim.wav")
    _mix(tmp_path / "elsewhere" / "abs.wav")
    (maps / "map.csv").write_text(f"path,query\na.wav,violin\n../../victim.wav,violin\n{tmp_path / 'elsewhere' / 'abs.wav'},violin\n")
    out = tmp_path / "out"
    result = separate("--queries", maps / "map.csv", "-o", out)
    assert result.exit_code == 1, result.output
    failure_lines = [line for line in result.output.splitlines() if "victim.wav" in line]
    assert len(failure_lines) == 1 and "outside --out" in failure_lines[0]
    assert "1 file(s) failed" in result.output
    assert wav_files(out) == ["a/violin.wav", "abs/violin.wav"]  # an absolute row goes to OUT/<name>/
    outside = [p for p in wav_files(tmp_path) if not p.startswith("out/") and p.endswith("violin.wav")]
    assert outside == []


def test_output_names_keep_unicode_and_never_collide(tmp_path):
    """Item 7: Unicode letters kept; lossy slugs get a hash; collisions in one run are named apart."""
    _mix(tmp_path / "in.wav")
    out = tmp_path / "out"
    for query in ("バイオリン", "チェロ", "dog barking", "Dog-Barking!"):
        result = separate(tmp_path / "in.wav", "-q", query, "-o", out)
        assert result.exit_code == 0 and "kept" not in result.output, (query, result.output)
    names = sorted(p.name for p in (out / "in").iterdir())
    assert "バイオリン.wav" in names and "チェロ.wav" in names and "dog-barking.wav" in names
    hashed = [n for n in names if n.startswith("dog-barking-")]
    assert len(hashed) == 1 and len(hashed[0]) == len("dog-barking-12345678.wav")
    # two audio queries with the same file name in one run: both get the hash of their exact query
    _mix(tmp_path / "a" / "bark.wav", seed=1)
    _mix(tmp_path / "b" / "bark.wav", seed=2)
    (tmp_path / "map.csv").write_text("path,query_audio\nin.wav,a/bark.wav\nin.wav,b/bark.wav\n")
    result = separate("--queries", tmp_path / "map.csv", "-o", tmp_path / "out2")
    assert result.exit_code == 0, result.output
    stems = sorted(p.name for p in (tmp_path / "out2" / "in").iterdir())
    assert len(stems) == 2 and all(s.startswith("audio-bark-") for s in stems)
    a, b = (sf.read(tmp_path / "out2" / "in" / s)[0] for s in stems)
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("query", ["", " ", "!!!"])
def test_empty_queries_are_rejected_with_one_line(tmp_path, query):
    _mix(tmp_path / "in.wav")
    result = separate(tmp_path / "in.wav", "-q", query, "-o", tmp_path / "out")
    assert result.exit_code == 2 and "no letter or digit" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_output_folder_is_left_out_of_the_input_search(tmp_path, monkeypatch):
    """Item 8: `marsctl separate . -q violin` twice does not separate its own outputs."""
    _mix(tmp_path / "song.wav")
    monkeypatch.chdir(tmp_path)
    first = separate(".", "-q", "violin")
    assert first.exit_code == 0 and "wrote 1 file(s)" in first.output, first.output
    second = separate(".", "-q", "violin")
    assert second.exit_code == 0 and "wrote 0 file(s)" in second.output and "kept 1 existing" in second.output
    assert wav_files(tmp_path) == ["separated/song/violin.wav", "song.wav"]


def test_unusable_out_and_devices_are_one_line(tmp_path):
    """Item 10: --out that cannot be a folder, unknown or absent devices."""
    _mix(tmp_path / "in.wav")
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        result = separate(tmp_path / "in.wav", "-q", "violin", "-o", out)
        assert result.exit_code == 2 and f"--out {out}" in result.output, result.output
        assert result.output.strip().splitlines() == [f"error: --out {out}: " + result.output.split(f"--out {out}: ")[1].strip()]
    tpu = separate(tmp_path / "in.wav", "-q", "violin", "--device", "tpu", "-o", tmp_path / "o")
    assert tpu.exit_code == 2 and "--device tpu: unknown device" in tpu.output
    if not torch.cuda.is_available():
        cuda = separate(tmp_path / "in.wav", "-q", "violin", "--device", "cuda", "-o", tmp_path / "o")
        assert cuda.exit_code == 2 and "no CUDA GPU" in cuda.output and "Traceback" not in cuda.output


def test_a_missing_query_image_is_reported_once(tmp_path):
    for name in ("a", "b", "c"):
        _mix(tmp_path / "in" / f"{name}.wav")
    result = separate(tmp_path / "in", "--query-image", tmp_path / "nope.jpg", "-o", tmp_path / "out")
    assert result.exit_code == 1
    assert result.output.count("nope.jpg") == 1 and "no such image file" in result.output


def _run_unprivileged(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run the CLI as a user that chmod 000 really stops (root is not stopped by it)."""
    command = [sys.executable, "-m", "marsctl", *args]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root and setpriv is missing: chmod 000 does not stop root")
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    env = {**os.environ, "HOME": str(cwd), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_unreadable_files_and_folders_are_reported():
    """Item 10: a chmod-000 file says 'permission denied'; an unreadable folder is reported."""
    root = Path(tempfile.mkdtemp(prefix="marsctl-perm-"))
    try:
        root.chmod(0o777)
        for name in ("ok.wav", "locked.wav", "hidden_dir/inner.wav"):
            _mix(root / "in" / name)
        for path in (root / "in", root / "in" / "ok.wav", root / "in" / "locked.wav", root / "in" / "hidden_dir" / "inner.wav"):
            path.chmod(0o777 if path.is_dir() else 0o644)
        (root / "in" / "locked.wav").chmod(0)
        (root / "in" / "hidden_dir").chmod(0)
        result = _run_unprivileged(["separate", "in", "-q", "violin", "-o", "out"], root)
        output = result.stdout + result.stderr
        assert result.returncode == 1, output
        assert "locked.wav: permission denied" in output
        assert "hidden_dir: cannot list this folder (permission denied)" in output
        assert (root / "out" / "ok" / "violin.wav").is_file() and "Traceback" not in output
    finally:
        for path in (root / "in" / "hidden_dir", root / "in" / "locked.wav"):
            path.chmod(0o755)
        shutil.rmtree(root)


def test_query_mapping_files(tmp_path):
    """Item 11: BOM accepted; a missing column names the columns found; empty and non-string mappings fail."""
    _mix(tmp_path / "a.wav")
    (tmp_path / "bom.csv").write_bytes("path,query\na.wav,violin\n".encode("utf-8-sig"))
    ok = separate("--queries", tmp_path / "bom.csv", "-o", tmp_path / "out")
    assert ok.exit_code == 0 and (tmp_path / "out" / "a" / "violin.wav").is_file(), ok.output
    (tmp_path / "file.csv").write_text("file,query\na.wav,violin\n")
    wrong = separate("--queries", tmp_path / "file.csv", "-o", tmp_path / "out")
    assert wrong.exit_code == 2 and "no 'path' column" in wrong.output and "'file', 'query'" in wrong.output
    (tmp_path / "noquery.csv").write_text("path,label\na.wav,violin\n")
    noquery = separate("--queries", tmp_path / "noquery.csv", "-o", tmp_path / "out")
    assert noquery.exit_code == 2 and "no query column" in noquery.output and "'path', 'label'" in noquery.output
    (tmp_path / "empty.csv").write_text("path,query\n")
    (tmp_path / "empty.json").write_text("{}")
    for empty in ("empty.csv", "empty.json"):
        result = separate("--queries", tmp_path / empty, "-o", tmp_path / "out")
        assert result.exit_code != 0 and "no entries" in result.output, result.output
    (tmp_path / "five.json").write_text(json.dumps({"a.wav": 5}))
    five = separate("--queries", tmp_path / "five.json", "-o", tmp_path / "out5")
    assert five.exit_code == 2 and "must be a string" in five.output and not (tmp_path / "out5" / "a" / "5.wav").exists()


def test_adding_a_residual_rewrites_the_estimate_beside_it(tmp_path):
    """Item 22 / issue 32 item 10: a re-run with --residual writes the residual with its estimate (an
    estimate from another seed or model would not sum with it to the mixture); --overwrite replaces both."""
    mixture = _mix(tmp_path / "a.wav")
    out = tmp_path / "out"
    assert separate(tmp_path / "a.wav", "-q", "violin", "-o", out, "--decode", "sample", "--seed", "1").exit_code == 0
    estimate = out / "a" / "violin.wav"
    again = separate(tmp_path / "a.wav", "-q", "violin", "-o", out, "--residual", "--decode", "sample", "--seed", "2")
    assert again.exit_code == 0 and "wrote 2 file(s)" in again.output, again.output
    np.testing.assert_allclose(sf.read(estimate)[0] + sf.read(out / "a" / "violin.residual.wav")[0], mixture, atol=1e-6)
    stamp = estimate.stat().st_mtime_ns
    forced = separate(tmp_path / "a.wav", "-q", "violin", "-o", out, "--residual", "--overwrite")
    assert forced.exit_code == 0 and "wrote 2 file(s)" in forced.output and estimate.stat().st_mtime_ns != stamp


def test_help_is_readable_at_80_columns():
    """Item 13 (separate only): no cut text, no <list[Path]> types."""
    result = subprocess.run([sys.executable, "-m", "marsctl", "separate", "--help"], capture_output=True, text=True,
                            env={**os.environ, "COLUMNS": "80", "TERM": "dumb"}, check=True)
    assert "…" not in result.stdout and "<list" not in result.stdout and "<bool>" not in result.stdout.split("--help")[0]
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    for option in ("--query", "--queries", "--out", "--model", "--decode", "--residual", "--overwrite", "--device"):
        assert option in result.stdout
