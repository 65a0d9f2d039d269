"""Training never replaces a user's files, deletes only its own checkpoints, and stops at the first
non-finite loss without saving non-finite weights (issue 32, items 1 and 8; issue 31's loss going
non-finite, for train sup and train rl)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from marsctl.cli.main import app
from marsctl.errors import MarsctlError
from marsctl.rl.trainer import train_rl
from marsctl.train.checkpoint import list_checkpoints
from marsctl.train.supervised import train_supervised
from test_rl_worker import make_test_encoders, pretrain, rl_config
from test_separator_fixtures import LabelTestEncoder, make_tone_dataset
from test_train_sup_worker import small_config


@pytest.fixture(scope="module")
def tone_data(tmp_path_factory):
    return make_tone_dataset(tmp_path_factory.mktemp("safety-tones") / "data")


class PoisonedEncoder(LabelTestEncoder):
    """The test encoder, whose audio embeddings turn NaN once ``poisoned`` is set: a fault injected into
    a real run at a chosen step (the loss of the next step is NaN)."""

    poisoned = False

    def embed_audio(self, waveforms, sample_rate, *, differentiable=False):
        out = super().embed_audio(waveforms, sample_rate, differentiable=differentiable)
        return out * float("nan") if self.poisoned else out


def _user_folder(path: Path) -> dict[str, str]:
    files = {"README.md": "# my notes\n", "config.json": '{"mine": true}\n', "metrics.jsonl": "{}\n"}
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return files


def _all_saved_weights_finite(run: Path) -> list[Path]:
    found = sorted(run.rglob("model.safetensors"))
    for path in found:
        for name, tensor in load_file(str(path)).items():
            assert torch.isfinite(tensor).all(), f"{path}: {name} is not finite"
    return found


def test_a_users_folder_is_refused_and_left_as_it_was(tone_data, tmp_path):
    out = tmp_path / "mine"
    files = _user_folder(out)
    with pytest.raises(MarsctlError, match="not a marsctl run"):
        train_supervised(small_config(str(tone_data), max_steps=2), out, encoder=LabelTestEncoder(), device="cpu", progress=False)
    result = CliRunner().invoke(app, ["train", "sup", "--data", str(tone_data), "--out", str(out), "--max-steps", "1"])
    assert result.exit_code == 2, result.output
    assert "not a marsctl run" in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(files)
    assert all((out / name).read_text() == text for name, text in files.items())


def test_no_resume_deletes_only_the_checkpoints_the_run_wrote(tone_data, tmp_path):
    out = tmp_path / "run"
    config = small_config(str(tone_data), max_steps=5, checkpoint_every=5, val_every=5)
    train_supervised(config, out, encoder=LabelTestEncoder(), device="cpu", progress=False)
    assert list_checkpoints(out) == [5]
    notes = out / "checkpoints" / "notes.txt"
    notes.write_text("mine")
    own_folder = out / "checkpoints" / "step-mine"
    own_folder.mkdir()
    (own_folder / "keep.txt").write_text("mine")
    train_supervised(small_config(str(tone_data), max_steps=3, checkpoint_every=3, val_every=3), out, encoder=LabelTestEncoder(),
                     device="cpu", progress=False, resume=False)
    assert list_checkpoints(out) == [3]  # the old step 5 is gone: a later resume starts from this run
    assert notes.read_text() == "mine" and (own_folder / "keep.txt").read_text() == "mine"


def test_train_sup_stops_at_the_first_non_finite_loss_and_saves_nothing_non_finite(tone_data, tmp_path):
    out = tmp_path / "run"
    encoder = PoisonedEncoder()
    config = small_config(str(tone_data), max_steps=20, checkpoint_every=5, val_every=5, query_modalities=("audio",))

    def poison(step: int) -> None:
        encoder.poisoned = encoder.poisoned or step == 7

    with pytest.raises(MarsctlError) as caught:
        train_supervised(config, out, encoder=encoder, device="cpu", progress=False, on_step_end=poison)
    message = str(caught.value)
    assert "\n" not in message and "step 8" in message and "not finite" in message
    assert str(out / "checkpoints" / "step-00000005") in message
    assert list_checkpoints(out) == [5]
    assert out / "model.safetensors" in _all_saved_weights_finite(out)


def test_train_rl_stops_at_the_first_non_finite_loss(tone_data, tmp_path):
    start = pretrain(tone_data, tmp_path / "sup", steps=5)
    query_encoder, reward_encoder = make_test_encoders()
    poisoned = PoisonedEncoder()
    poisoned.anchor_fusion = reward_encoder.anchor_fusion
    config = rl_config(tone_data, start, max_steps=10, checkpoint_every=3, val_every=3)

    def poison(step: int) -> None:
        poisoned.poisoned = poisoned.poisoned or step == 4

    with pytest.raises(MarsctlError) as caught:
        train_rl(config, tmp_path / "rl", encoder=query_encoder, reward_encoder=poisoned, device="cpu", progress=False, on_step_end=poison)
    message = str(caught.value)
    assert "step 5" in message and "not finite" in message and "step-00000003" in message
    assert list_checkpoints(tmp_path / "rl") == [3]
    assert _all_saved_weights_finite(tmp_path / "rl")


def test_recorded_files_hold_no_absolute_paths_and_no_cookies_path(tone_data, tmp_path, monkeypatch):
    """Issue 32 item 11: card, config.json, train_config.json and provenance.json name the data relative
    to the run (the absolute path of the data folder appears in none of them); --cookies is redacted."""
    import sys

    from marsctl.hub import run_stage
    from marsctl.recorded_paths import portable_command

    out = tmp_path / "runs" / "sup"
    data = str(Path(tone_data).resolve())
    config = small_config(data, max_steps=2, checkpoint_every=2, val_every=2)
    monkeypatch.setattr(sys, "argv", ["marsctl", "train", "sup", "--data", data, "--out", str(out)])
    run_stage("train.sup", {"max_steps": 2}, {"data": Path(data)}, out,
              lambda: train_supervised(config, out, encoder=LabelTestEncoder(), device="cpu", progress=False) and None, kind="separator")
    for name in ("README.md", "config.json", "train_config.json", "provenance.json"):
        text = (out / name).read_text()
        assert data not in text, f"{name} records {data}"
    assert (out / Path(__import__("json").loads((out / "train_config.json").read_text())["data"])).resolve() == Path(data)
    words = portable_command(["marsctl", "data", "build", "x", "--cookies", "/home/alice/c.txt", "--cookies=/home/alice/d.txt"], tmp_path)
    assert "/home/alice/c.txt" not in words and "--cookies=<redacted>" in words and words[-2] == "<redacted>"
