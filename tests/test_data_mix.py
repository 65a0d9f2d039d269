"""Fixed seeded mixtures on disk (OmniSep /2 and SNR modes) and dynamic training mixtures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_fixtures import SR, write_tone
from marsctl.audio import load_audio
from marsctl.config import SignalConfig
from marsctl.data import load_mixtures
from marsctl.data.manifest import write_clips
from marsctl.data.mixing import DynamicMixDataset, collate_mixtures, make_mixtures
from marsctl.data.recipe import recipe_from_mapping

LABELS = {"bass": 110.0, "mid": 440.0, "treble": 1760.0}


@pytest.fixture()
def dataset(tmp_path):
    rows = []
    for label, freq in LABELS.items():
        for k, split in enumerate(["train", "train", "test", "test"]):
            clip_id = f"{label}-{k}"
            rel = f"clips/{label}/{clip_id}.flac"
            seconds = 5.0 if k % 2 else 3.0  # shorter and longer than the 65535-sample window
            write_tone(tmp_path / rel, freq * (1 + 0.01 * k), seconds, amplitude=0.2 + 0.1 * k)
            frames = [f"frames/{label}/{clip_id}/000.jpg"] if k == 0 else []
            rows.append({
                "clip_id": clip_id, "label": label, "split": split, "audio_path": rel, "frame_paths": frames,
                "duration_s": seconds, "sample_rate": SR, "source": "tone", "keep": True, "drop_reason": "",
                "silence_ratio": 0.0, "clip_ratio": 0.0, "loudness_lufs": -20.0, "rms_db": -20.0, "peak_db": -10.0,
                "semantic_margin": None,
            })
    rows.append(dict(rows[0], clip_id="dropped", keep=False, drop_reason="silent:1.0>0.5"))
    write_clips(tmp_path, rows)
    return tmp_path


def recipe(**mix):
    return recipe_from_mapping({"name": "t", "folder": {}, "mix": {"mixtures_per_split": {"test": 6}, "seed": 7, **mix}})


def test_fixed_mixtures_are_sums_of_half_gain_windows_and_reproducible(dataset):
    rows = make_mixtures(recipe(), dataset, progress=False)
    T = SignalConfig().segment_samples
    assert len(rows) == 6 and [r["mixture_id"] for r in rows] == [f"test-{i:05d}" for i in range(6)]
    for row in rows:
        assert len(set(row["source_labels"])) == 2 and row["snr_db"] is None and row["gains"] == [0.5, 0.5]
        assert "dropped" not in row["source_clip_ids"]
        mixture = load_audio(dataset / row["mixture_path"], None)
        sources = [load_audio(dataset / p, None) for p in row["source_paths"]]
        assert len(mixture) == T
        np.testing.assert_allclose(mixture, sources[0] + sources[1], atol=1e-6)
        for clip_id, label, source, offset in zip(row["source_clip_ids"], row["source_labels"], sources, row["source_offsets"]):
            clip = load_audio(dataset / f"clips/{label}/{clip_id}.flac", None)
            window = np.pad(clip[offset : offset + T], (0, max(0, offset + T - len(clip))))
            np.testing.assert_allclose(source, 0.5 * window, atol=1e-6)
    manifest = load_mixtures(dataset)
    assert manifest["mixture_id"] == [r["mixture_id"] for r in rows]
    first = (dataset / "manifests/mixtures.parquet").read_bytes()
    # a mixture half-written by a killed run (its mixture.wav missing) is redone, identically
    victim = dataset / rows[2]["mixture_path"]
    before = load_audio(victim, None)
    victim.unlink()
    make_mixtures(recipe(), dataset, progress=False)
    np.testing.assert_array_equal(load_audio(victim, None), before)
    assert (dataset / "manifests/mixtures.parquet").read_bytes() == first
    # another seed, other mixtures: the files on disk follow the new manifest, none stale
    other = make_mixtures(recipe(seed=8), dataset, progress=False)
    assert [r["source_clip_ids"] for r in other] != [r["source_clip_ids"] for r in rows]
    for row in other:
        folder = dataset / row["mixture_path"].rsplit("/", 1)[0]
        assert sorted(p.name for p in folder.glob("*.wav")) == sorted(["mixture.wav"] + [p.rsplit("/", 1)[1] for p in row["source_paths"]])
        sources = [load_audio(dataset / p, None) for p in row["source_paths"]]
        np.testing.assert_allclose(load_audio(dataset / row["mixture_path"], None), sources[0] + sources[1], atol=1e-6)
    # fewer mixtures: the folders of the dropped ones go too
    make_mixtures(recipe(seed=8, mixtures_per_split={"test": 2}), dataset, progress=False)
    assert sorted(p.name for p in (dataset / "mixtures/test").iterdir()) == ["test-00000", "test-00001"]


def test_snr_mode_sets_the_energy_ratio(dataset):
    rows = make_mixtures(recipe(mode="snr", snr_db_range=[-6.0, 6.0]), dataset, progress=False)
    snrs = []
    for row in rows:
        s0, s1 = (load_audio(dataset / p, None) for p in row["source_paths"])
        measured = 10 * np.log10(np.sum(s0.astype(np.float64) ** 2) / np.sum(s1.astype(np.float64) ** 2))
        assert measured == pytest.approx(row["snr_db"], abs=0.01)
        snrs.append(row["snr_db"])
    assert all(-6 <= s <= 6 for s in snrs) and len(set(snrs)) == len(snrs)


def test_dynamic_mix_dataset_items(dataset):
    signal = SignalConfig()
    ds = DynamicMixDataset(dataset, "train", signal, num_sources=2, seed=3)
    assert len(ds) == 6 and sorted(ds.labels) == sorted(LABELS)
    item = ds[0]
    assert item["mixture"].shape == (signal.segment_samples,) and item["sources"].shape == (2, signal.segment_samples)
    assert item["mixture"].dtype == torch.float32
    torch.testing.assert_close(item["mixture"], item["sources"].sum(0))
    assert len(set(item["labels"])) == 2 and all(c.split("-")[0] == l for c, l in zip(item["clip_ids"], item["labels"]))
    for paths in item["frame_paths"]:
        assert all(p.startswith(str(dataset.resolve())) for p in paths)
    torch.testing.assert_close(ds[1]["mixture"], ds[1]["mixture"])  # same index, same mixture
    draws = {tuple(ds[i]["clip_ids"]) for i in range(6)}
    ds.set_epoch(1)
    assert {tuple(ds[i]["clip_ids"]) for i in range(6)} != draws or not torch.equal(ds[0]["mixture"], item["mixture"])
    batch = collate_mixtures([ds[0], ds[1]])
    assert batch["mixture"].shape == (2, signal.segment_samples) and len(batch["labels"]) == 2
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_mixtures)
    assert next(iter(loader))["sources"].shape == (3, 2, signal.segment_samples)
    with pytest.raises(Exception, match="at least 4"):
        DynamicMixDataset(dataset, "train", signal, num_sources=4)


def test_mixtures_of_a_dataset_without_families_and_an_older_manifest(dataset):
    import pyarrow.parquet as pq

    from marsctl.data import load_clips

    rows = make_mixtures(recipe(), dataset, progress=False)
    assert all(r["pair_type"] == "" and r["source_families"] == ["", ""] for r in rows)
    # pairing asked for, one family only: every mixture is "within"; the labels change, not the clips' files
    paired = make_mixtures(recipe(pairing={"within": 0.5, "across": 0.5}), dataset, progress=False)
    assert {r["pair_type"] for r in paired} == {"within"}
    # a manifest written before the group/soundfont/family columns existed reads them as ""
    path = dataset / "manifests/clips.parquet"
    table = pq.read_table(path)
    pq.write_table(table.drop_columns(["group", "soundfont", "family"]), path)
    old = load_clips(dataset)
    assert set(old["family"]) == {""} and set(old["group"]) == {""} and len(old) == table.num_rows
    path = dataset / "manifests/mixtures.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["pair_type", "source_families"]), path)
    assert load_mixtures(dataset)["source_families"] == [["", ""]] * len(paired)
