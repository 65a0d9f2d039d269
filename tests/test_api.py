"""The public Python API: ``marsctl.Separator`` on the packaged default model and a packaged example,
``marsctl.score``, and a light ``import marsctl``."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

import marsctl
from hub_server import fake_hub, hf_env  # noqa: F401  (fixtures)
from marsctl.audio import load_audio
from marsctl.errors import MarsctlError
from marsctl.pretrained import DEFAULT_SEPARATOR_DIR, EXAMPLE_REFERENCES_DIR, EXAMPLES_DIR

#: the shipped default beats this mean SI-SDRi on its example mixtures (as tests/test_separate.py)
DEFAULT_MODEL_MIN_SI_SDRI = 2.0


@pytest.fixture(scope="module")
def separator():
    return marsctl.Separator.from_pretrained("default", device="cpu")


@pytest.fixture(scope="module")
def example():
    entry = json.loads((EXAMPLES_DIR / "examples.json").read_text())[0]
    return EXAMPLES_DIR / entry["file"], entry["labels"]


def test_import_is_light_and_names_are_lazy():
    code = "import sys, marsctl; print('torch' in sys.modules); marsctl.Separator; print('torch' in sys.modules)"
    lines = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert lines == ["False", "True"]
    assert "Separator" in dir(marsctl) and "score" in dir(marsctl)
    with pytest.raises(AttributeError):
        marsctl.not_a_name  # noqa: B018


def test_separate_a_packaged_example_and_score_it(separator, example):
    path, labels = example
    assert separator.directory.resolve() == DEFAULT_SEPARATOR_DIR.resolve() and separator.sample_rate == 16_000
    estimates = torch.stack([separator.separate(path, query=label) for label in labels])
    references = [EXAMPLE_REFERENCES_DIR / path.stem / f"{label.replace(' ', '-')}.flac" for label in labels]
    assert estimates.shape == (len(labels), len(load_audio(path, 16_000)))
    scores = marsctl.score(estimates, references, mixture=EXAMPLE_REFERENCES_DIR / path.stem / "mixture.flac", sample_rate=16_000)
    assert scores["si_sdri"].mean().item() > DEFAULT_MODEL_MIN_SI_SDRI, scores["si_sdri"]


def test_tensor_input_at_another_rate_comes_back_at_the_model_rate(separator, example):
    path, labels = example
    wave16 = torch.from_numpy(load_audio(path, 16_000))
    from_file = separator.separate(path, query=labels[1])
    # the same mixture as a stereo tensor: channels are averaged, the result equals the file's
    stereo = torch.stack([wave16, wave16])
    torch.testing.assert_close(separator.separate(stereo, sample_rate=16_000, query=labels[1]), from_file)
    wave44 = torch.from_numpy(load_audio(path, 44_100))
    at44 = separator.separate(wave44.numpy(), sample_rate=44_100, query=labels[1])
    assert at44.shape == (int(np.ceil(len(wave44) * 16_000 / 44_100)),) and at44.dtype == torch.float32
    with pytest.raises(MarsctlError, match="sample_rate"):
        separator.separate(wave16, query="violin")


def test_audio_query_and_negative(separator, example, tmp_path):
    path, labels = example
    clip = tmp_path / "example.wav"
    sf.write(clip, sf.read(EXAMPLE_REFERENCES_DIR / path.stem / f"{labels[1].replace(' ', '-')}.flac")[0], sf.info(str(path)).samplerate)
    by_audio = separator.separate(path, query_audio=clip)
    with_negative = separator.separate(path, query=labels[1], negative=labels[0])
    plain = separator.separate(path, query=labels[1])
    assert by_audio.shape == plain.shape == with_negative.shape
    assert not torch.equal(with_negative, plain) and not torch.equal(by_audio, plain)
    with pytest.raises(MarsctlError, match="no such image"):
        separator.separate(path, query_image=tmp_path / "missing.jpg")


def test_from_pretrained_specs(tmp_path):
    with pytest.raises(MarsctlError, match="nope"):
        marsctl.Separator.from_pretrained(str(tmp_path / "nope"), device="cpu")
    with pytest.raises(MarsctlError, match="unknown device"):
        marsctl.Separator.from_pretrained("default", device="tpu")
    # a run folder is accepted as a path, and as a Hub id once it is in the local Hub cache (offline)
    run = marsctl.Separator.from_pretrained(DEFAULT_SEPARATOR_DIR, device="cpu", decode="mean")
    assert run.options.decode == "mean"


def test_from_pretrained_a_hub_id(fake_hub, hf_env, tmp_path, example):
    """org/name@rev through marsctl.hub's resolver (a loopback stand-in for the Hub)."""
    import shutil

    from marsctl.hub import push_artifact

    shutil.copytree(DEFAULT_SEPARATOR_DIR, tmp_path / "sep")
    pushed = push_artifact(tmp_path / "sep", "org/tiny-sep")
    from_hub = marsctl.Separator.from_pretrained(f"org/tiny-sep@{pushed.commit}", device="cpu")
    assert from_hub.directory != DEFAULT_SEPARATOR_DIR
    path, labels = example
    local = marsctl.Separator.from_pretrained(tmp_path / "sep", device="cpu")
    torch.testing.assert_close(from_hub.separate(path, query=labels[0]), local.separate(path, query=labels[0]))
    with pytest.raises(MarsctlError, match="no-such-model"):
        marsctl.Separator.from_pretrained("org/no-such-model@main", device="cpu")
