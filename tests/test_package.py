"""Packaging the default: the shipped encoder must keep the separator's text space; the shipped
examples are what examples.json says."""

from __future__ import annotations

import json

import pytest
import torch

from marsctl.errors import MarsctlError
from marsctl.models.encoders.builtin import BuiltinEncoder, BuiltinEncoderConfig
from marsctl.pretrained import EXAMPLE_REFERENCES_DIR, EXAMPLES_DIR
from marsctl.pretrained.package import check_same_text_space


def test_an_encoder_with_another_text_space_is_refused():
    trained_with = BuiltinEncoder(BuiltinEncoderConfig())
    realigned_audio = BuiltinEncoder(BuiltinEncoderConfig(init_seed=3))  # other audio tower, same text head (identity)
    check_same_text_space(trained_with, realigned_audio, ["dog barking", "violin"], "aligned")
    with torch.no_grad():
        realigned_audio.text_head.weight.add_(0.01 * torch.randn_like(realigned_audio.text_head.weight))  # a trained text projection
    with pytest.raises(MarsctlError, match=r"aligned: its text embeddings differ .*freeze_text"):
        check_same_text_space(trained_with, realigned_audio, ["dog barking", "violin"], "aligned")


def test_shipped_examples_cover_each_pair_kind_with_their_references():
    examples = json.loads((EXAMPLES_DIR / "examples.json").read_text())
    assert {e["pair_kind"] for e in examples} == {"everyday", "instruments", "everyday+instruments"}
    queries = (EXAMPLES_DIR / "queries.csv").read_text().splitlines()[1:]
    for example in examples:
        name = example["file"].removesuffix(".flac")
        assert (EXAMPLES_DIR / example["file"]).is_file() and (EXAMPLE_REFERENCES_DIR / name / "mixture.flac").is_file()
        assert len(list((EXAMPLE_REFERENCES_DIR / name).glob("*.flac"))) == len(example["labels"]) + 1
        assert all(f"{example['file']},{label}" in queries for label in example["labels"])
        assert "chosen_by" in example


@pytest.fixture(scope="module")
def tone_runs(tmp_path_factory):
    """A trained tiny separator and an untrained one of the same architecture (built-in encoder, so that
    the packager loads both the way it loads real runs)."""
    from marsctl.train.supervised import train_supervised
    from test_separator_fixtures import make_tone_dataset
    from test_train_sup_worker import small_config

    root = tmp_path_factory.mktemp("ratchet")
    data = make_tone_dataset(root / "data", mixtures_per_split=6)
    common = dict(encoder="builtin", query_modalities=("text",))
    trained = small_config(str(data), max_steps=60, val_every=60, checkpoint_every=60, **common)
    train_supervised(trained, root / "trained", device="cpu", progress=False)
    untrained = small_config(str(data), max_steps=1, val_every=1, checkpoint_every=1, warmup_steps=0, learning_rate=1e-12, **common)
    train_supervised(untrained, root / "untrained", device="cpu", progress=False)
    return data, root / "trained", root / "untrained"


def test_the_ratchet_refuses_a_model_worse_on_validation_and_takes_a_better_one(tone_runs, tmp_path):
    from marsctl.pretrained.package import package

    data, trained, untrained = tone_runs
    target = tmp_path / "default"
    package(trained, data, target=target, force=True, examples=False)  # the "shipped" model: the trained one
    shipped = {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()}
    with pytest.raises(MarsctlError, match=r"untrained: not packaged, no validated gain .* val split, 12 sources: .*paired -"):
        package(untrained, data, target=target, examples=False)
    assert {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()} == shipped  # nothing touched

    worse_first = tmp_path / "worse-first"
    package(untrained, data, target=worse_first, force=True, examples=False)
    result = package(trained, data, target=worse_first, examples=False)
    assert result["ratchet"].startswith("val split, 12 sources") and "paired +" in result["ratchet"]
    evaluation = json.loads((worse_first / "evaluation.json").read_text())
    assert evaluation["ratchet"]["accepted"] and evaluation["ratchet"]["gain_db"] > 1.0
    assert (worse_first / "model.safetensors").read_bytes() == (trained / "model.safetensors").read_bytes()
