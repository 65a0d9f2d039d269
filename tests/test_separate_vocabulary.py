"""Out-of-vocabulary text queries: one note naming the nearest known classes, and the run goes on
(issue 14, item 5). Real packaged default model and encoder, real example mixture."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import marsctl
from marsctl.cli.main import app
from marsctl.pretrained import EXAMPLES_DIR
from marsctl.separate.queries import OUT_OF_VOCABULARY_COSINE, out_of_vocabulary


@pytest.fixture(scope="module")
def separator():
    return marsctl.Separator.from_pretrained("default", device="cpu")


def test_default_model_records_its_classes(separator):
    assert len(separator.known_labels) == 58 and {"violin", "dog barking", "rain"} <= set(separator.known_labels)


def test_far_queries_are_flagged_with_their_nearest_classes(separator):
    notes = separator.out_of_vocabulary(["violin", "typewriter", "guitar", "typewriter", "rain", "baby crying"])
    assert [note.query for note in notes] == ["typewriter", "baby crying"]  # each once; known names and close variants pass
    nearest = notes[0].nearest
    assert len(nearest) == 3 and all(label in separator.known_labels for label, _ in nearest)
    assert all(cos < OUT_OF_VOCABULARY_COSINE for _, cos in nearest)
    assert [cos for _, cos in nearest] == sorted((cos for _, cos in nearest), reverse=True)
    assert "typewriter" in notes[0].message() and nearest[0][0] in notes[0].message()


def test_no_recorded_classes_means_no_note(separator):
    assert out_of_vocabulary(separator.encoder, [], ["dog barking"]) == []


def test_cli_prints_one_line_and_still_separates(tmp_path):
    example = EXAMPLES_DIR / json.loads((EXAMPLES_DIR / "examples.json").read_text())[0]["file"]
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["separate", str(example), "-q", "typewriter", "-q", "violin", "-o", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if "far from every class" in line]
    assert len(notes) == 1 and "'typewriter'" in notes[0] and "nearest:" in notes[0]
    assert len(list(out.rglob("*.wav"))) == 1  # the composed query was separated anyway

    result = CliRunner().invoke(app, ["separate", str(example), "-q", "violin", "-o", str(tmp_path / "out2"), "--device", "cpu"])
    assert result.exit_code == 0 and "far from every class" not in result.output


def test_text_vectors_do_not_depend_on_the_batch_and_survive_releasing_the_text_model():
    from marsctl.errors import MarsctlError
    from marsctl.separate import Query

    fresh = marsctl.Separator.from_pretrained("default", device="cpu")
    alone = fresh.encoder.embed_text(["violin"])[0]
    other = marsctl.Separator.from_pretrained("default", device="cpu")
    in_batch = other.encoder.embed_text(["a much longer query about a dog barking", "violin"])[1]
    assert torch.equal(alone, in_batch)  # each text embedded on its own: no padding effects

    query = Query(texts=("violin",), negative=("drums",))
    before = fresh.embed(query)
    fresh.prepare([query], release_text_model=True)
    assert fresh.encoder.text_trunk.model is None
    assert torch.equal(fresh.embed(query), before)  # cached texts still embed, identically
    with pytest.raises(MarsctlError, match="text model was released.*'cello'"):
        fresh.embed(Query(texts=("cello",)))
