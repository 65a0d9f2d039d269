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
