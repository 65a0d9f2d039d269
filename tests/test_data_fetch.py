"""fetch from online videos: real yt-dlp and ffmpeg against videos served from 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_http import serve_folder
from marsctl.audio import load_audio
from marsctl.data import load_clips
from marsctl.data.build import build
from marsctl.data.fetch import FetchOptions, fetch
from marsctl.data.recipe import recipe_from_mapping


def make_video(path: Path, freq: float, seconds: float, audio: bool = True) -> None:
    args = ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc=size=320x240:rate=10:d={seconds}"]
    if audio:
        args += ["-f", "lavfi", "-i", f"sine=f={freq}:d={seconds}:sample_rate=44100", "-shortest", "-c:a", "aac"]
    args += ["-c:v", "libx264", "-g", "10", "-pix_fmt", "yuv420p", str(path)]
    subprocess.run(args, check=True)


@pytest.fixture(scope="module")
def video_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    make_video(folder / "vidLow.mp4", 300.0, 12)
    make_video(folder / "vidHigh.mp4", 2500.0, 12)
    make_video(folder / "vidMute.mp4", 0.0, 6, audio=False)
    with serve_folder(folder) as base:
        yield base


def youtube_recipe(base: str, **youtube) -> dict:
    return {
        "name": "vgg-test",
        "labels": ["low tone", "high tone"],
        "youtube": {
            "source_list_format": "vggsound_csv",
            "url_template": base + "/{youtube_id}.mp4",
            "clip_duration_s": 4.0,
            "val_fraction": 0.0,
            "workers": 2,
            "attempts": 2,
            "backoff_s": 0.05,
            "socket_timeout_s": 10,
            **youtube,
        },
        "filter": {"min_duration_s": 1.0},
        "mix": {"mixtures_per_split": {"train": 2}},
    }


SOURCE_LIST = """\
vidLow,3,low tone,train
vidHigh,5,high tone,train
vidHigh,0,high tone,test
vidDead,0,low tone,train
vidMute,0,low tone,train
../../etc/passwd,0,low tone,train
vidLow,abc,low tone,train
vidLow,1
vidLow,7,barking dog,train
vidLow,3,low tone,train
vidLow,2,low tone,holdout
"""


def test_fetch_cuts_segments_logs_failures_and_skips_bad_rows(video_server, tmp_path):
    source_list = tmp_path / "list.csv"
    source_list.write_text(SOURCE_LIST)
    out = tmp_path / "ds"
    recipe = recipe_from_mapping(youtube_recipe(video_server))
    result = fetch(recipe, out, FetchOptions(source_list=str(source_list), progress=False))

    ok = {r.clip_id: r for r in result.ok}
    assert sorted(ok) == ["vidHigh_000000", "vidHigh_000005", "vidLow_000003"]
    # the audio is exactly the requested 4 s segment, 16 kHz mono, of the right video
    wave = load_audio(out / ok["vidLow_000003"].audio_path, None)
    assert len(wave) == 4 * 16000
    spectrum = np.abs(np.fft.rfft(wave))
    assert abs(np.argmax(spectrum) * 16000 / len(wave) - 300.0) < 5
    spectrum = np.abs(np.fft.rfft(load_audio(out / ok["vidHigh_000005"].audio_path, None)))
    assert abs(np.argmax(spectrum) * 16000 / (4 * 16000) - 2500.0) < 5
    # frames: 1 fps over 4 s, 224x224
    frames = ok["vidLow_000003"].frame_paths
    assert len(frames) == 4 and frames[0].endswith("000.jpg")
    assert Image.open(out / frames[0]).size == (224, 224)

    failed = {r.clip_id: r.reason for r in result.failed}
    assert "404" in failed["vidDead_000000"]
    assert "no audio stream" in failed["vidMute_000000"]
    reasons = " | ".join(s.reason for s in result.skipped)
    assert "invalid video id '../../etc/passwd'" in reasons
    assert "not a non-negative number" in reasons
    assert "got 2 field(s)" in reasons
    assert "unknown label 'barking dog'" in reasons
    assert "duplicate row for vidLow_000003" in reasons
    assert "unknown split 'holdout'" in reasons
    # nothing written outside the dataset directory, nothing for the traversal row
    assert not (tmp_path / "etc").exists() and not list(out.rglob("*passwd*"))
    log = [json.loads(line) for line in (out / "logs/failures.jsonl").read_text().splitlines()]
    assert len(log) == 8 and {e["status"] for e in log} == {"failed", "skipped"}
    # temporary downloads are cleaned up
    assert not any((out / "state" / "tmp").iterdir())


def test_dead_video_is_not_retried_but_network_errors_are(video_server, tmp_path):
    source_list = tmp_path / "list.csv"
    source_list.write_text("vidDead,0,low tone,train\n")
    recipe = recipe_from_mapping(youtube_recipe(video_server, attempts=3))
    result = fetch(recipe, tmp_path / "a", FetchOptions(source_list=str(source_list), progress=False))
    assert result.failed[0].attempts == 1  # 404: permanent
    # a port nobody listens on: connection refused is retried, with backoff, then given up
    recipe = recipe_from_mapping(youtube_recipe("http://127.0.0.1:9", attempts=3))
    source_list.write_text("vidLow,0,low tone,train\n")
    result = fetch(recipe, tmp_path / "b", FetchOptions(source_list=str(source_list), progress=False))
    assert result.failed[0].attempts == 3


def test_build_from_videos_and_rerun_reuses_everything(video_server, tmp_path):
    source_list = tmp_path / "list.csv"
    source_list.write_text(SOURCE_LIST)
    out = tmp_path / "ds"
    recipe = recipe_from_mapping(youtube_recipe(video_server))
    options = FetchOptions(source_list=str(source_list), progress=False)
    summary = build(recipe, out, options)
    assert summary.kept == 3 and sum(summary.failed.values()) == 2 and sum(summary.skipped.values()) == 6
    clips = load_clips(out)
    assert sorted(clips["clip_id"]) == ["vidHigh_000000", "vidHigh_000005", "vidLow_000003"]
    first = (out / "manifests/clips.parquet").read_bytes()
    again = fetch(recipe, out, options)
    assert again.units_run == 0 and again.units_reused == 5
    build(recipe, out, options)
    assert (out / "manifests/clips.parquet").read_bytes() == first


from hub_server import fake_hub, hf_env  # noqa: E402,F401  (fixtures: a loopback Hugging Face Hub)


def test_mirror_dataset_repo_supplies_videos_gone_from_youtube(video_server, fake_hub, tmp_path):
    from huggingface_hub import HfApi

    videos = tmp_path / "videos"
    videos.mkdir()
    make_video(videos / "whole.mp4", 700.0, 10)
    make_video(videos / "segment.mp4", 1500.0, 4)
    api = HfApi(endpoint=fake_hub.endpoint, token="hf_test")
    api.create_repo("org/vgg-mirror", repo_type="dataset")
    # one dead video has its clip in the mirror, another its whole video (cut at the start second)
    api.upload_file(path_or_fileobj=str(videos / "segment.mp4"), path_in_repo="goneA_000000.mp4",
                    repo_id="org/vgg-mirror", repo_type="dataset")
    api.upload_file(path_or_fileobj=str(videos / "whole.mp4"), path_in_repo="goneB.mp4",
                    repo_id="org/vgg-mirror", repo_type="dataset")
    source_list = tmp_path / "list.csv"
    source_list.write_text("goneA,0,low tone,train\ngoneB,5,high tone,train\ngoneC,0,low tone,train\n")
    recipe = recipe_from_mapping(youtube_recipe(video_server))
    out = tmp_path / "ds"
    result = fetch(recipe, out, FetchOptions(source_list=str(source_list), mirror="org/vgg-mirror", progress=False))
    ok = {r.clip_id: r for r in result.ok}
    assert sorted(ok) == ["goneA_000000", "goneB_000005"]
    assert "mirror org/vgg-mirror" in ok["goneA_000000"].source
    for clip_id, freq in [("goneA_000000", 1500.0), ("goneB_000005", 700.0)]:
        wave = load_audio(out / ok[clip_id].audio_path, None)
        assert len(wave) == 4 * 16000
        assert abs(np.argmax(np.abs(np.fft.rfft(wave))) * 16000 / len(wave) - freq) < 5
    (failed,) = result.failed
    assert "404" in failed.reason and "mirror: none of goneC_000000.mp4" in failed.reason


def test_music_json_source_list_expands_videos_into_clips_with_stable_splits(tmp_path):
    from marsctl.data.fetch import plan

    source_list = tmp_path / "MUSIC_solo_videos.json"
    videos = {"acoustic_guitar": [f"g{i:03d}" for i in range(30)], "cello": [f"c{i:03d}" for i in range(30)],
              "kazoo": ["k000"], "violin": "not-a-list", "tuba": ["../x", 5]}
    source_list.write_text(json.dumps({"videos": videos}))
    recipe = recipe_from_mapping({
        "name": "music-test", "labels": ["acoustic guitar", "cello", "tuba", "violin"],
        "youtube": {"source_list_format": "music_json", "label_map": {"acoustic_guitar": "acoustic guitar"},
                    "clips_per_video": 3, "first_clip_start_s": 10, "clip_stride_s": 20,
                    "val_fraction": 0.2, "test_fraction": 0.2},
    })
    units, skipped = plan(recipe, tmp_path, FetchOptions(source_list=str(source_list)))
    items = [u.items[0] for u in units]
    assert len(items) == 60 * 3
    assert {it[2] for it in items} == {"acoustic guitar", "cello"}
    assert sorted({it[1] for it in items}) == [10.0, 30.0, 50.0]
    splits = {}
    for ytid, _, _, split, _ in items:
        splits.setdefault(ytid, set()).add(split)
    assert all(len(s) == 1 for s in splits.values())  # a video's clips share one split
    counts = {s: sum(1 for v in splits.values() if s in v) for s in ("train", "val", "test")}
    assert counts["train"] > counts["val"] > 0 and counts["test"] > 0
    reasons = " | ".join(s.reason for s in skipped)
    assert "unknown label 'kazoo'" in reasons and "expected a list" in reasons
    assert "invalid video id '../x'" in reasons and "5 is not a string" in reasons
    # the same plan again: same clips, same splits
    again, _ = plan(recipe, tmp_path, FetchOptions(source_list=str(source_list)))
    assert [u.items[0] for u in again] == items


def test_csv_with_garbage_lines_is_parsed_row_by_row(tmp_path):
    from marsctl.data.fetch import plan

    source_list = tmp_path / "vggsound.csv"
    source_list.write_bytes(b'vidA,3,low tone,train\n"unterminated\x00,1,low tone,train\nvidB,4,"high tone",test\n')
    recipe = recipe_from_mapping(youtube_recipe("http://127.0.0.1:9"))
    units, skipped = plan(recipe, tmp_path, FetchOptions(source_list=str(source_list)))
    assert [u.items[0][4] for u in units] == ["vidA_000003", "vidB_000004"]
    assert len(skipped) == 1 and ":2" in skipped[0].where
