"""Manifest schema, atomic Parquet writing and loading; safe names and paths."""

from __future__ import annotations

import datasets
import pytest

from marsctl.data import load_clips, load_mixtures
from marsctl.data.manifest import CLIP_FEATURES, ManifestError, write_clips, write_mixtures
from marsctl.data.paths import UnsafePathError, inside, label_dirname, safe_id


def clip_row(clip_id: str, split: str = "train", label: str = "dog", keep: bool = True, **extra) -> dict:
    row = {
        "clip_id": clip_id, "label": label, "split": split, "audio_path": f"clips/{label}/{clip_id}.flac",
        "frame_paths": [f"frames/{label}/{clip_id}/000.jpg"], "duration_s": 4.5, "sample_rate": 16000,
        "source": "file:x.wav", "keep": keep, "drop_reason": "" if keep else "silent:0.9>0.5",
        "silence_ratio": 0.1, "clip_ratio": 0.0, "loudness_lufs": -23.0, "rms_db": -20.0, "peak_db": -3.0,
        "semantic_margin": None,
    }
    row.update(extra)
    return row


def test_clips_roundtrip_keeps_types_order_and_filters(tmp_path):
    rows = [clip_row("b", "test"), clip_row("a", "train", keep=False), clip_row("c", "val", label="cat", semantic_margin=0.25)]
    write_clips(tmp_path, rows)
    ds = load_clips(tmp_path)
    assert isinstance(ds, datasets.Dataset)
    assert ds.features == CLIP_FEATURES
    assert ds["clip_id"] == ["a", "c", "b"]  # train, val, test
    assert ds[1]["semantic_margin"] == 0.25 and ds[0]["semantic_margin"] is None
    assert ds[0]["frame_paths"] == ["frames/dog/a/000.jpg"]
    assert load_clips(tmp_path, kept_only=True)["clip_id"] == ["c", "b"]
    assert load_clips(tmp_path, split="test")["clip_id"] == ["b"]
    # a plain datasets reader sees the same table
    assert datasets.Dataset.from_parquet(str(tmp_path / "manifests/clips.parquet")).features == CLIP_FEATURES
    # no temporary files left beside the manifest
    assert [p.name for p in (tmp_path / "manifests").iterdir()] == ["clips.parquet"]


def test_row_not_matching_schema_is_refused_and_old_manifest_survives(tmp_path):
    write_clips(tmp_path, [clip_row("a")])
    bad = clip_row("b")
    del bad["keep"]
    with pytest.raises(ManifestError, match="missing"):
        write_clips(tmp_path, [bad])
    assert load_clips(tmp_path)["clip_id"] == ["a"]
    assert [p.name for p in (tmp_path / "manifests").iterdir()] == ["clips.parquet"]


def test_mixtures_roundtrip_and_missing_manifest_errors(tmp_path):
    with pytest.raises(ManifestError, match="no such manifest"):
        load_mixtures(tmp_path)
    row = {
        "mixture_id": "test-00000", "split": "test", "mixture_path": "mixtures/test/test-00000/mixture.wav",
        "source_clip_ids": ["a", "b"], "source_labels": ["dog", "cat"],
        "source_paths": ["mixtures/test/test-00000/dog.wav", "mixtures/test/test-00000/cat.wav"],
        "source_frame_paths": [["frames/dog/a/000.jpg"], []], "source_offsets": [0, 160],
        "gains": [0.5, 0.5], "snr_db": None, "seed": 1,
    }
    write_mixtures(tmp_path, [row])
    got = load_mixtures(tmp_path, split="test")
    assert got[0]["source_frame_paths"] == [["frames/dog/a/000.jpg"], []]
    assert got[0]["snr_db"] is None and len(load_mixtures(tmp_path, split="val")) == 0
    (tmp_path / "manifests/mixtures.parquet").write_bytes(b"not parquet")
    with pytest.raises(ManifestError, match="not a readable Parquet"):
        load_mixtures(tmp_path)


def test_safe_names_and_paths(tmp_path):
    assert safe_id("dQw4w9WgXcQ_000030") == "dQw4w9WgXcQ_000030"
    unsafe = safe_id("../../etc/passwd")
    assert "/" not in unsafe and not unsafe.startswith(".")
    assert safe_id("a/b") != safe_id("a_b")  # distinct inputs stay distinct
    assert label_dirname("dog barking") == "dog barking"
    assert "/" not in label_dirname("a/../b")
    with pytest.raises(UnsafePathError):
        label_dirname("..")
    assert inside(tmp_path, "clips/x.flac") == (tmp_path / "clips/x.flac").resolve()
    for bad in ["../x", "/etc/passwd", "clips/../../x"]:
        with pytest.raises(UnsafePathError):
            inside(tmp_path, bad)
    (tmp_path / "link").symlink_to("/etc")
    with pytest.raises(UnsafePathError):
        inside(tmp_path, "link/passwd")


def _mixture_row(mixture_path: str, source_paths: list[str]) -> dict:
    return {
        "mixture_id": "test-00000", "split": "test", "mixture_path": mixture_path,
        "source_clip_ids": ["a", "b"], "source_labels": ["dog", "cat"], "source_paths": source_paths,
        "source_frame_paths": [[], []], "source_offsets": [0, 0], "gains": [0.5, 0.5], "snr_db": None, "seed": 1,
    }


@pytest.mark.parametrize("mixture_path, sources", [
    ("/etc/hostname", ["mixtures/test/test-00000/dog.wav", "mixtures/test/test-00000/cat.wav"]),
    ("mixtures/test/test-00000/mixture.wav", ["../../victim/dog.wav", "mixtures/test/test-00000/cat.wav"]),
    ("mixtures/../../victim.wav", ["a.wav", "b.wav"]),
])
def test_a_manifest_cannot_point_outside_its_dataset(tmp_path, mixture_path, sources):
    """Before: load_mixtures returned these paths and eval --model --data read the files they named."""
    from marsctl.data.manifest import dataset_file

    write_mixtures(tmp_path, [_mixture_row(mixture_path, sources)])
    with pytest.raises(ManifestError) as err:
        load_mixtures(tmp_path)
    message = str(err.value)
    assert "\n" not in message and "mixtures.parquet" in message and "test-00000" in message
    assert "not a path inside the dataset" in message
    rows = [clip_row("a", audio_path="/etc/passwd")]
    write_clips(tmp_path, rows)
    with pytest.raises(ManifestError, match=r"row 0 \(a\): audio_path '/etc/passwd'"):
        load_clips(tmp_path)
    assert dataset_file(tmp_path, "clips/dog/a.flac") == tmp_path / "clips/dog/a.flac"
    with pytest.raises(ManifestError):
        dataset_file(tmp_path, "../x.flac")


def test_eval_on_a_dataset_whose_manifest_leaves_it_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from marsctl.cli.main import app

    victim = tmp_path / "victim"
    victim.mkdir()
    dataset = tmp_path / "ds"
    write_mixtures(dataset, [_mixture_row(str(victim / "mix.wav"), [str(victim / "a.wav"), "b.wav"])])
    result = CliRunner().invoke(app, ["eval", "--model", "default", "--data", str(dataset), "--out", str(tmp_path / "rep")])
    assert result.exit_code == 2, result.output
    assert "not a path inside the dataset" in result.output
