"""The `union` source kind: built datasets combined into one, with families, balanced sampling and pair types."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from data_fixtures import SR, write_tone
from marsctl.config import SignalConfig
from marsctl.data import load_clips, load_mixtures
from marsctl.data.build import build
from marsctl.data.fetch import FetchOptions
from marsctl.data.manifest import write_clips
from marsctl.data.mixing import DynamicMixDataset, choose_labels, _pool_by_label
from marsctl.data.recipe import load_recipe, recipe_from_mapping
from marsctl.data.union import mixture_pair_kind
from marsctl.errors import ConfigError
from marsctl.recipe_paths import find_recipe

#: two member datasets made by the tests: label -> (tone frequency, clips per split)
INSTRUMENTS = {"flute": 880.0, "tuba": 110.0, "violin": 440.0}
EVERYDAY = {"rain": 2500.0, "dog barking": 600.0, "engine": 70.0, "bell": 1500.0}
SPLITS = ["train"] * 4 + ["val", "test", "test"]
LENIENT = {"min_duration_s": 0.5, "max_silence_ratio": 1.0, "min_loudness_lufs": -90.0}


def make_member(root: Path, labels: dict[str, float], extra_train: dict[str, int] | None = None) -> Path:
    """A built-looking dataset: tone clips and clips.parquet (one dropped clip per label)."""
    rows = []
    for label, freq in labels.items():
        splits = SPLITS + ["train"] * (extra_train or {}).get(label, 0)
        for k, split in enumerate(splits + ["train"]):
            clip_id = f"{label.replace(' ', '_')}-{k:02d}"
            rel = f"clips/{label}/{clip_id}.flac"
            write_tone(root / rel, freq * (1 + 0.01 * k), 1.5, amplitude=0.2)
            keep = k < len(splits)
            rows.append({
                "clip_id": clip_id, "label": label, "split": split, "audio_path": rel, "frame_paths": [],
                "duration_s": 1.5, "sample_rate": SR, "source": f"tone {freq}", "keep": keep,
                "drop_reason": "" if keep else "silent:1.0>0.5", "silence_ratio": 0.0, "clip_ratio": 0.0,
                "loudness_lufs": -20.0, "rms_db": -17.0, "peak_db": -14.0, "semantic_margin": None,
                "group": f"take{k // 2}", "soundfont": "fontA" if label == "tuba" else "", "family": "",
            })
    write_clips(root, rows)
    return root


def union_recipe(members: list[dict], pairing=None, **mix) -> dict:
    return {
        "name": "u-tiny",
        "union": {"datasets": members},
        "filter": LENIENT,
        "mix": {"mixtures_per_split": {"val": 4, "test": 60}, "pairing": pairing if pairing is not None else {"within": 0.5, "across": 0.5}, **mix},
    }


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    root = tmp_path_factory.mktemp("members")
    return make_member(root / "inst", INSTRUMENTS, extra_train={"flute": 8}), make_member(root / "sfx", EVERYDAY)


@pytest.fixture(scope="module")
def union_dir(members, tmp_path_factory):
    inst, sfx = members
    out = tmp_path_factory.mktemp("union") / "u"
    recipe = recipe_from_mapping(union_recipe([{"path": str(inst), "family": "instruments"}, {"path": str(sfx), "family": "everyday"}]))
    summary = build(recipe, out, FetchOptions(progress=False))
    assert summary.n_failed == 0
    return out


def test_union_keeps_labels_splits_groups_and_names_each_family(members, union_dir):
    inst, sfx = members
    clips = load_clips(union_dir)
    assert all(clips["keep"])
    member_rows = {("instruments", r["clip_id"]): r for r in load_clips(inst, kept_only=True)}
    member_rows.update({("everyday", r["clip_id"]): r for r in load_clips(sfx, kept_only=True)})
    assert len(clips) == len(member_rows)  # every kept clip, no dropped one
    for row in clips:
        family, original = row["clip_id"].split("-", 1)
        member = member_rows[(row["family"], original)]
        assert family == row["family"]
        assert (row["label"], row["split"]) == (member["label"], member["split"])
        assert row["group"] == f"{family}:{member['group']}" and row["soundfont"] == member["soundfont"]
        # the clip file is the member's file, linked, inside the union
        member_dir = inst if family == "instruments" else sfx
        assert os.path.samefile(union_dir / row["audio_path"], member_dir / member["audio_path"])
        assert not (union_dir / row["audio_path"]).is_symlink() and row["audio_path"].startswith("clips/")
    assert set(clips["label"]) == set(INSTRUMENTS) | set(EVERYDAY)
    assert {f: {l for l, g in zip(clips["label"], clips["family"]) if g == f} for f in ("instruments", "everyday")} == {
        "instruments": set(INSTRUMENTS), "everyday": set(EVERYDAY)}


def test_fixed_mixtures_pair_within_and_across_families_and_record_it(union_dir):
    clips = {r["clip_id"]: r for r in load_clips(union_dir)}
    rows = list(load_mixtures(union_dir, split="test"))
    kinds = Counter(mixture_pair_kind(r) for r in rows)
    assert set(kinds) == {"instruments", "everyday", "everyday+instruments"}
    assert 15 <= kinds["everyday+instruments"] <= 45  # across: half of 60
    for row in rows:
        families = [clips[c]["family"] for c in row["source_clip_ids"]]
        assert row["source_families"] == families and len(set(row["source_labels"])) == 2
        assert row["pair_type"] == ("within" if len(set(families)) == 1 else "across")
        assert all(clips[c]["split"] == "test" for c in row["source_clip_ids"])
    # the same recipe again gives the same mixtures (seeded)
    assert list(load_mixtures(union_dir, split="test")) == rows
    # reports break scores down by these: every source of every test mixture, with its pair kind and family
    from marsctl.data.union import source_groups

    groups = source_groups(union_dir, "test")
    assert len(groups) == 2 * len(rows)
    for row in rows:
        for label, clip_id in zip(row["source_labels"], row["source_clip_ids"]):
            group = groups[(row["mixture_id"], label)]
            assert group["pair_kind"] == mixture_pair_kind(row) and group["family"] == clips[clip_id]["family"]
            assert group["soundfont"] == (clips[clip_id]["soundfont"] or "")


def test_training_mixtures_follow_the_pairing_and_balance_classes(union_dir):
    ds = DynamicMixDataset(union_dir, "train", SignalConfig(), num_sources=2, seed=5, length=400)
    assert ds.mix.pairing == {"within": 0.5, "across": 0.5}  # from the dataset card
    labels, kinds = Counter(), Counter()
    for i in range(len(ds)):
        item = ds[i]
        labels.update(item["labels"])
        kinds["across" if len(set(item["families"])) == 2 else item["families"][0]] += 1
    # within: a family uniformly (25 % each), across: 50 %
    assert 160 <= kinds["across"] <= 240 and 70 <= kinds["instruments"] <= 130 and 70 <= kinds["everyday"] <= 130
    # inside a family every class equally often, whatever its clip count (flute has 3x the clips)
    expected = {**{l: 400 * (0.25 * 2 / 3 + 0.5 / 3) for l in INSTRUMENTS}, **{l: 400 * (0.25 * 2 / 4 + 0.5 / 4) for l in EVERYDAY}}
    for label, count in labels.items():
        assert abs(count - expected[label]) < 0.3 * expected[label], (label, count, expected[label])
    # pairing off: labels uniformly over all seven classes
    flat = DynamicMixDataset(union_dir, "train", SignalConfig(), seed=5, length=400, pairing={})
    assert not flat.mix.pairing


def test_balance_by_class_or_by_clip(members):
    inst, _ = members
    pool = _pool_by_label(load_clips(inst, kept_only=True, split="train"))
    assert {label: len(refs) for label, refs in pool.items()} == {"flute": 12, "tuba": 4, "violin": 4}
    rng = np.random.default_rng(0)
    by_class = Counter(label for _ in range(3000) for label in choose_labels(rng, pool, 1, balance="class")[0])
    by_clip = Counter(label for _ in range(3000) for label in choose_labels(rng, pool, 1, balance="clip")[0])
    assert all(abs(by_class[l] - 1000) < 120 for l in INSTRUMENTS)
    assert abs(by_clip["flute"] - 3000 * 12 / 20) < 150 and abs(by_clip["tuba"] - 3000 * 4 / 20) < 120
    ds = DynamicMixDataset(inst, "train", SignalConfig(), seed=1, length=60, balance="clip")
    assert ds.balance == "clip" and len({tuple(ds[i]["labels"]) for i in range(20)}) > 1
    with pytest.raises(Exception, match="balance"):
        DynamicMixDataset(inst, "train", SignalConfig(), balance="label")


def test_pairing_that_the_pool_cannot_make_is_one_clear_error(members):
    inst, _ = members
    pool = _pool_by_label(load_clips(inst, kept_only=True, split="train"))
    rng = np.random.default_rng(0)
    # one family: every mixture is "within"
    assert {choose_labels(rng, pool, 2, {"within": 0.5, "across": 0.5})[2] for _ in range(20)} == {"within"}
    with pytest.raises(Exception, match=r"mix.pairing.*across"):
        choose_labels(rng, pool, 2, {"across": 1.0})
    with pytest.raises(ConfigError, match="pairing"):
        recipe_from_mapping(union_recipe([{"path": str(inst)}], pairing={"inside": 1.0}))


def test_relative_members_missing_members_and_rebuilds(members, tmp_path):
    inst, sfx = members
    # paths relative to the recipe file; a member that is not built is a one-line skip
    (tmp_path / "recipes").mkdir()
    link = tmp_path / "inst"
    link.symlink_to(inst, target_is_directory=True)
    spec = tmp_path / "recipes" / "u.yaml"
    spec.write_text(yaml.safe_dump(union_recipe([{"path": "../inst"}, {"path": "../nowhere", "family": "gone"}], pairing={},
                                                mixtures_per_split={"test": 3})))
    recipe = load_recipe(spec)
    assert recipe.source.datasets[0] == {"path": str(tmp_path / "inst"), "family": "inst"}
    summary = build(recipe, tmp_path / "out", FetchOptions(progress=False))
    assert summary.skipped["missing_dataset"] == 1 and summary.kept == len(load_clips(inst, kept_only=True))
    failures = (tmp_path / "out" / "logs" / "failures.jsonl").read_text().splitlines()
    assert len(failures) == 1 and "nowhere" in failures[0] and "marsctl data build" in failures[0]
    assert set(load_clips(tmp_path / "out")["family"]) == {"inst"}
    card = yaml.safe_load((tmp_path / "out" / "dataset.json").read_text())
    assert card["source"] == "union" and card["config"]["union"]["datasets"][0]["path"] == str(tmp_path / "inst")
    # a rebuild reuses the linked member; labels restrict what enters
    from marsctl.data.fetch import fetch

    again = fetch(recipe, tmp_path / "out", FetchOptions(progress=False))
    assert again.units_run == 0 and again.units_reused == 1
    only = recipe.replace(labels=["tuba"])
    got = fetch(only, tmp_path / "only", FetchOptions(progress=False))
    assert {r.label for r in got.ok} == {"tuba"} and {s.kind for s in got.skipped} >= {"unknown_label"}
    with pytest.raises(ConfigError, match="used twice"):
        recipe_from_mapping(union_recipe([{"path": str(inst), "family": "x"}, {"path": str(sfx), "family": "x"}]))


def test_shipped_union_recipe_names_two_families_and_no_reserved_data():
    recipe = load_recipe("union")
    assert recipe.source_kind == "union" and recipe.mix.pairing == {"within": 0.5, "across": 0.5}
    families = [m.family for m in recipe.source.members()]
    assert families == ["instruments", "everyday"]
    text = find_recipe("data", "union").read_text()
    body = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    assert not any(r in body for r in ("timgm6mb", "freepats", "csound", "gcompris", "0ad"))


def test_union_of_a_really_built_member_reuses_its_filter_scores(tmp_path):
    tree = tmp_path / "tree"
    for label, freq in {"low": 150.0, "high": 3000.0}.items():
        for split in ("train", "test"):
            for k in range(2):
                write_tone(tree / label / split / f"{label}{k}.wav", freq * (1 + 0.05 * k), 1.5, amplitude=0.1 + 0.1 * k)
    member = recipe_from_mapping({"name": "tones", "folder": {"root": str(tree), "extract_frames": False},
                                  "filter": LENIENT, "mix": {"mixtures_per_split": {"test": 2}}})
    build(member, tmp_path / "tones", FetchOptions(progress=False))
    # mark one cached score: the union shows it only if it reused the cache instead of scoring again
    marked = tmp_path / "tones" / "state" / "scores" / "low__train__low0.json"
    cache = json.loads(marked.read_text())
    cache["scores"]["loudness_lufs"] = -33.25
    marked.write_text(json.dumps(cache))
    union = recipe_from_mapping(union_recipe([{"path": str(tmp_path / "tones")}], pairing={}, mixtures_per_split={"test": 2}))
    build(union, tmp_path / "u", FetchOptions(progress=False))
    member_rows = {r["clip_id"]: r for r in load_clips(tmp_path / "tones")}
    union_rows = list(load_clips(tmp_path / "u"))
    assert len(union_rows) == len(member_rows) == 8
    for row in union_rows:
        original = member_rows[row["clip_id"].split("-", 1)[1]]
        assert row["family"] == "tones" and row["rms_db"] == original["rms_db"]
        own = (tmp_path / "u" / "state" / "scores" / f"{row['clip_id']}.json").read_text()
        assert own == (tmp_path / "tones" / "state" / "scores" / f"{original['clip_id']}.json").read_text()
    assert [r["loudness_lufs"] for r in union_rows if r["clip_id"] == "tones-low__train__low0"] == [-33.25]


def test_root_option_replaces_a_recipe_files_root(members, tmp_path):
    """--root (FetchOptions.root) replaces the recipe file's `root:`, and the members are looked up under it
    (they were resolved against the file's root when the recipe was read, so --root was ignored)."""
    inst, sfx = members
    assert inst.parent == sfx.parent
    recipe_file = tmp_path / "u.yaml"
    mapping = union_recipe([{"path": inst.name, "family": "instruments"}, {"path": sfx.name, "family": "everyday"}])
    mapping["union"]["root"] = str(tmp_path / "nowhere")
    recipe_file.write_text(yaml.safe_dump(mapping))
    recipe = load_recipe(recipe_file)
    summary = build(recipe, tmp_path / "out", FetchOptions(progress=False, root=str(inst.parent)))
    assert summary.n_failed == 0
    card = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert [m["path"] for m in card["config"]["union"]["datasets"]] == [str(inst.resolve()), str(sfx.resolve())]
    assert len(load_clips(tmp_path / "out")) == len(load_clips(inst, kept_only=True)) + len(load_clips(sfx, kept_only=True))
