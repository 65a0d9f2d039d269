"""data build end to end: the CLI, the summary, and a real SIGKILL half-way then a resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from data_fixtures import tiny_soundfont_recipe, write_tone
from marsctl.audio import load_audio
from marsctl.cli.data import data_app
from marsctl.data import load_clips, load_mixtures

HAVE_SF2 = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2").is_file()
REPO = Path(__file__).resolve().parents[1]


def kill_recipe(tmp_path: Path) -> Path:
    data = tiny_soundfont_recipe(
        labels=["flute", "tuba", "violin", "cello", "clarinet", "trumpet"],
        soundfont={
            "programs": {"flute": 73, "tuba": 58, "violin": 40, "cello": 42, "clarinet": 71, "trumpet": 56},
            "ranges": {"flute": [60, 96], "tuba": [28, 58], "violin": [55, 100], "cello": [36, 76],
                       "clarinet": [50, 91], "trumpet": [54, 82]},
            "clips_per_class": {"train": 6, "val": 2, "test": 3},
        },
        mix={"mixtures_per_split": {"val": 10, "test": 30}},
    )
    path = tmp_path / "sf-kill.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_build(recipe: Path, out: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "marsctl.data", "build", str(recipe), "--out", str(out), "--quiet"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


@pytest.mark.skipif(not HAVE_SF2, reason="needs fluid-soundfont-gm")
def test_build_killed_twice_then_resumed_equals_uninterrupted_build(tmp_path):
    recipe = kill_recipe(tmp_path)
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    proc = run_build(recipe, reference)
    assert proc.wait(timeout=300) == 0, proc.stdout.read().decode()

    # kill 1: during fetch, once the first class is rendered
    proc = run_build(recipe, resumed)
    fetched = lambda: len(list((resumed / "state/fetch").glob("*.json"))) >= 1
    assert wait_for(fetched, proc), "the build ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(list((resumed / "state/fetch").glob("*.json"))) < 6
    assert not (resumed / "manifests/clips.parquet").exists()
    # kill 2: during mixing
    proc = run_build(recipe, resumed)
    mixing = lambda: len(list((resumed / "mixtures").glob("*/*/mixture.wav"))) >= 3
    if wait_for(mixing, proc):
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    # resume to the end
    proc = run_build(recipe, resumed)
    assert proc.wait(timeout=300) == 0, proc.stdout.read().decode()

    a, b = load_clips(reference).to_pandas(), load_clips(resumed).to_pandas()
    assert len(a) == 6 * 11
    assert a.equals(b)
    ma, mb = load_mixtures(reference).to_pandas(), load_mixtures(resumed).to_pandas()
    assert len(ma) == 40 and ma.equals(mb)
    for path in ma["mixture_path"].tolist() + [p for ps in ma["source_paths"] for p in ps]:
        np.testing.assert_array_equal(load_audio(reference / path, None), load_audio(resumed / path, None))
    for path in a["audio_path"]:
        np.testing.assert_array_equal(load_audio(reference / path, None), load_audio(resumed / path, None))
    assert not list(resumed.rglob(".*.tmp*")), "temporary files left behind"
    card = json.loads((resumed / "dataset.json").read_text())
    assert card["status"] == "complete" and card["counts"]["clips"] == 66 and card["schema_version"] == 1


def make_tree(root: Path) -> None:
    write_tone(root / "low" / "a.wav", 200)
    write_tone(root / "low" / "test" / "b.wav", 210)
    write_tone(root / "high" / "c.flac", 3000)
    write_tone(root / "high" / "nested" / "d.wav", 3100)
    (root / "high" / "test").mkdir(parents=True)
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=320x180:rate=5:d=3", "-f", "lavfi",
         "-i", "sine=f=800:d=3", "-shortest", "-pix_fmt", "yuv420p", str(root / "high" / "test" / "v.mp4")],
        check=True,
    )
    (root / "low" / "broken.wav").write_bytes(b"RIFF....WAVEjunk")
    (root / "low" / "empty.flac").write_bytes(b"")
    (root / "notes.txt").write_text("not a clip")
    (root / "low" / "cover.png").write_bytes(b"\x89PNG")
    (root / "high" / "escape.wav").symlink_to("/etc/hostname")
    write_tone(root / "unlisted" / "e.wav", 500)


def test_cli_folder_build_logs_bad_files_and_exits_nonzero(tmp_path):
    root = tmp_path / "tree"
    make_tree(root)
    recipe = tmp_path / "folder.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "folder-test", "labels": ["low", "high"], "folder": {"val_fraction": 0.0, "test_fraction": 0.0},
        "filter": {"min_duration_s": 1.0}, "mix": {"mixtures_per_split": {"train": 2, "test": 1}},
    }))
    out = tmp_path / "out"
    result = CliRunner().invoke(data_app, ["build", str(recipe), "--root", str(root), "--out", str(out), "--quiet"])
    assert result.exit_code == 1, result.output
    assert "kept" in result.output and "failed" in result.output and "skipped" in result.output
    clips = load_clips(out).to_pandas().set_index("clip_id")
    assert sorted(clips.index) == ["high__c", "high__nested__d", "high__test__v", "low__a", "low__test__b"]
    assert clips.loc["low__test__b", "split"] == "test" and clips.loc["low__a", "split"] == "train"
    assert clips["keep"].all()
    frames = clips.loc["high__test__v", "frame_paths"]
    assert len(frames) == 3 and (out / frames[0]).is_file()
    log = [json.loads(line) for line in (out / "logs/failures.jsonl").read_text().splitlines()]
    reasons = {Path(e.get("where") or e["source"]).name: e["reason"] for e in log}
    assert "outside" in reasons["escape.wav"]
    assert "unknown label 'unlisted'" in reasons["e.wav"]
    assert "not inside a label folder" in reasons["notes.txt"]
    assert "unsupported file type" in reasons["cover.png"]
    assert "unreadable" in reasons["broken.wav"] and "broken.wav" in reasons["broken.wav"]
    assert "empty" in reasons["empty.flac"]
    assert len(load_mixtures(out, split="train")) == 2 and len(load_mixtures(out, split="test")) == 1
    for kind in ["outside_root", "unknown_label", "no_label_folder", "unsupported_file", "unreadable"]:
        assert kind in result.output
    card = json.loads((out / "dataset.json").read_text())
    assert card["config"]["folder"]["root"] == str(root.resolve())  # the card says where the clips came from
    assert card["counts"]["skipped_by_reason"]["outside_root"] == 1
    # nothing written outside the output directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.yaml", "out", "tree"]

    # a rerun needs no --root (the card has it) and redoes nothing
    result = CliRunner().invoke(data_app, ["build", str(recipe), "--out", str(out), "--quiet"])
    assert result.exit_code == 1 and "kept" in result.output
    assert len(load_clips(out)) == 5

    # filter again with other thresholds (from the card), then mix again: no refetch
    result = CliRunner().invoke(data_app, ["filter", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(data_app, ["mix", str(out), "--quiet"])
    assert result.exit_code == 0, result.output


def test_cli_errors_are_one_clear_line(tmp_path):
    runner = CliRunner()
    result = runner.invoke(data_app, ["build", "no-such-recipe", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "unknown recipe 'no-such-recipe'" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nfolder: {}\nfilter: {max_silence: 3}\n")
    result = runner.invoke(data_app, ["build", str(bad), "--root", str(tmp_path)])
    assert result.exit_code == 2 and "unknown key(s) max_silence" in result.output
    result = runner.invoke(data_app, ["build", "folder", "--out", str(tmp_path / "y")])
    assert result.exit_code == 2 and "--root" in result.output
    result = runner.invoke(data_app, ["filter", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "no dataset card" in result.output
    for command in ["build", "fetch", "filter", "mix", "recipes"]:
        assert runner.invoke(data_app, [command, "--help"]).exit_code == 0
    listing = runner.invoke(data_app, ["recipes"])
    for name in ["soundfont", "folder", "vggsound-clean", "music-clean"]:
        assert name in listing.output


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_SF2, reason="needs fluid-soundfont-gm")
def test_default_soundfont_build_is_complete_and_parallel_build_identical(tmp_path):
    """The shipped soundfont recipe as users run it (about 15-25 s on 2 CPU cores)."""
    from marsctl.data.build import build
    from marsctl.data.fetch import FetchOptions
    from marsctl.data.recipe import load_recipe

    recipe = load_recipe("soundfont")
    summary = build(recipe, tmp_path / "one", FetchOptions(progress=False))
    assert summary.clips_total == 10 * (16 + 4 + 6)
    assert summary.kept >= 0.9 * summary.clips_total
    assert dict(summary.mixtures_per_split) == {"val": 20, "test": 100}
    build(recipe, tmp_path / "two", FetchOptions(progress=False, workers=2))
    assert load_clips(tmp_path / "one").to_pandas().equals(load_clips(tmp_path / "two").to_pandas())
    assert load_mixtures(tmp_path / "one").to_pandas().equals(load_mixtures(tmp_path / "two").to_pandas())


def test_redirected_build_logs_plain_progress_lines_and_files_follow_the_umask(tmp_path):
    """stderr to a file (not a terminal): plain 'stage: k/n (p%)' lines instead of nothing; and the
    dataset's files and folders get the umask's modes (before: every file 0600, frame folders 0700)."""
    import stat

    root = tmp_path / "tree"
    for i in range(12):
        write_tone(root / ("low" if i % 2 else "high") / f"{i}.wav", 200 + 300 * (i % 2) + i)
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=320x180:rate=5:d=3", "-f", "lavfi",
         "-i", "sine=f=800:d=3", "-shortest", "-pix_fmt", "yuv420p", str(root / "high" / "v.mp4")],
        check=True,
    )
    recipe = tmp_path / "tree.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "tree", "folder": {"val_fraction": 0.0, "test_fraction": 0.3},
        "filter": {"min_duration_s": 1.0}, "mix": {"mixtures_per_split": {"test": 2}},
    }))
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    code = "import os, runpy, sys; os.umask(0o022); sys.argv = sys.argv[1:]; runpy.run_module('marsctl.data', run_name='__main__')"
    with open(tmp_path / "build.log", "w") as log:
        done = subprocess.run([sys.executable, "-c", code, "marsctl", "build", str(recipe), "--root", str(root),
                               "--out", str(out)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    assert done.returncode == 0, (tmp_path / "build.log").read_text()
    lines = (tmp_path / "build.log").read_text().splitlines()
    assert any(line.startswith("fetch tree: 13/13 (100%)") for line in lines)
    assert len([line for line in lines if line.startswith("fetch tree:")]) >= 5  # about every 10 %
    assert any(line.startswith("filter: signal checks: 13/13") for line in lines)
    assert not any("\x1b[" in line or "━" in line for line in lines)  # no terminal bar codes in a log
    for path in out.rglob("*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))
