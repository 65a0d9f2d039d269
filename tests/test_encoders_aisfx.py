"""The aiSFX audio trunk: aiSFX's pretrained sound-effects CNN (weights from the ``aisfx`` PyPI package,
installed with --no-deps) inside the built-in encoder.

Checked against aiSFX's own code: its librosa spectrogram and its ``EmbeddingNet`` on the same clip.
The checkpoint is read with ``torch.load(weights_only=True)``; a pickle that asks for anything else is
refused. The trunk is differentiable, level-invariant (peak normalization), batch-independent (its
BatchNorm stays in eval mode), frozen and not saved by default, saved when fine-tuned."""

from __future__ import annotations

import importlib.util
import pickle

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from marsctl.errors import MarsctlError
from marsctl.models.encoders import BuiltinEncoder, BuiltinEncoderConfig, load_encoder, save_encoder
from marsctl.models.encoders.towers import (
    AISFX_SAMPLE_RATE,
    AisfxTrunk,
    AudioCnnConfig,
    installed_aisfx_checkpoint,
    read_aisfx_embedding_weights,
)
from test_encoders_grad import check_default_keeps_no_graph, check_gradient, noise

pytestmark = pytest.mark.skipif(importlib.util.find_spec("aisfx") is None, reason="pip install --no-deps aisfx==0.1.2")
SR = 16_000


@pytest.fixture(scope="module")
def aisfx_encoder() -> BuiltinEncoder:
    return load_encoder("aisfx")


def test_front_end_and_embedding_match_aisfx_own_code(tmp_path):
    pytest.importorskip("librosa")
    from aisfx import inference
    from aisfx.models.cnn2d import EmbeddingNet
    from aisfx.preprocessing import spectrogram_normalize
    from aisfx.spectrogram.spectrogram_librosa import compute_spectrogram

    t = np.arange(3 * AISFX_SAMPLE_RATE) / AISFX_SAMPLE_RATE
    rng = np.random.default_rng(0)
    clip = (0.3 * np.sin(2 * np.pi * 440 * t) * np.exp(-t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    path = tmp_path / "clip.wav"
    sf.write(path, clip, AISFX_SAMPLE_RATE, subtype="FLOAT")
    theirs = spectrogram_normalize(
        compute_spectrogram(
            filename=str(path), sr=inference.SAMPLE_RATE, block_size=inference.SPEC_BLOCK_LENGTH,
            hop_size=inference.SPEC_HOP_LENGTH, n_mels=inference.MEL_BINS, f_min=inference.F_MIN, f_max=inference.F_MAX,
        )
    ).T  # [frames, mels]
    trunk = AisfxTrunk(AudioCnnConfig(kind="aisfx")).eval()
    with torch.no_grad():
        ours = trunk.spectrogram(torch.from_numpy(clip)[None])[0]
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-5)

    # aiSFX's embedding of one 100-frame block (its EMB_BLOCK_LENGTH) is the max-over-time half of ours
    net = EmbeddingNet("max", 3, 1, 64)
    net.load_state_dict(read_aisfx_embedding_weights(installed_aisfx_checkpoint()))
    net.eval()
    block = torch.tensor(theirs[None, : inference.EMB_BLOCK_LENGTH], dtype=torch.float32)
    with torch.no_grad():
        expected = net(block)
        ours_max = trunk.conv_features(block).amax(dim=-1)
    assert float(expected.abs().max()) > 0.1
    torch.testing.assert_close(ours_max, expected, atol=1e-4, rtol=1e-4)


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled",))


def test_checkpoint_is_read_without_unpickling_code(tmp_path, capsys):
    weights = read_aisfx_embedding_weights(installed_aisfx_checkpoint())
    assert set(weights) >= {"conv_block1.conv1.weight", "conv_block4.bn2.running_var"}
    assert sum(v.numel() for k, v in weights.items() if k.endswith("weight") and "conv" in k) > 4_000_000
    evil = tmp_path / "checkpoint.pth"
    evil.write_bytes(pickle.dumps(({"embedding_net.x": _Evil()}, {})))
    with pytest.raises(MarsctlError, match="checkpoint.pth: not a readable aiSFX checkpoint") as info:
        read_aisfx_embedding_weights(evil)
    assert "\n" not in str(info.value) and "unpickled" not in capsys.readouterr().out
    other = tmp_path / "other.pth"
    torch.save(({"conv.weight": torch.zeros(1)}, {}), other)
    with pytest.raises(MarsctlError, match="no embedding_net"):
        read_aisfx_embedding_weights(other)


def test_missing_package_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(MarsctlError, match=r"pip install --no-deps aisfx"):
        installed_aisfx_checkpoint()


def test_gradient_reaches_the_waveform_and_no_graph_unless_asked(aisfx_encoder):
    query = aisfx_encoder.embed_text(["a dog barking"])
    check_gradient(aisfx_encoder, noise(2, SR, seed=0), query)  # through the 16 -> 44.1 kHz resampler
    check_default_keeps_no_graph(aisfx_encoder, noise(2, SR, seed=1))
    assert not any(p.grad is not None for p in aisfx_encoder.parameters())


def test_level_and_batch_do_not_change_a_clip_embedding(aisfx_encoder):
    waves = noise(3, SR, seed=2)
    together = aisfx_encoder.embed_audio(waves, SR)
    alone = aisfx_encoder.embed_audio(waves[1:2], SR)
    quieter = aisfx_encoder.embed_audio(0.1 * waves[1:2], SR)
    torch.testing.assert_close(together[1:2], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(quieter, alone, atol=1e-5, rtol=0)
    aisfx_encoder.train()  # BatchNorm keeps its running statistics in training mode too
    try:
        torch.testing.assert_close(aisfx_encoder.embed_audio(waves, SR)[1:2], alone, atol=1e-5, rtol=0)
    finally:
        aisfx_encoder.eval()


def test_frozen_trunk_is_not_saved_and_reloads_the_same(aisfx_encoder, tmp_path):
    encoder = load_encoder("aisfx").unfreeze_trainable()
    assert not any(p.requires_grad for p in encoder.audio_trunk.parameters())
    assert encoder.audio_head.weight.requires_grad
    with torch.no_grad():
        encoder.audio_head.weight.mul_(-1.0)  # "aligned": differs from a fresh aisfx encoder
    saved = save_encoder(encoder, tmp_path / "enc")
    stored = load_file(str(saved / "model.safetensors"))
    assert "audio_head.weight" in stored and not any(k.startswith("audio_trunk.") for k in stored)  # not the 19 MB trunk
    again = load_encoder(saved)
    waves = noise(2, SR, seed=3)
    torch.testing.assert_close(again.embed_audio(waves, SR), encoder.eval().embed_audio(waves, SR))


def test_finetuned_trunk_trains_and_is_saved(tmp_path):
    encoder = BuiltinEncoder(BuiltinEncoderConfig(audio=AudioCnnConfig(kind="aisfx", finetune=True))).unfreeze_trainable()
    assert all(p.requires_grad for p in encoder.audio_trunk.parameters())
    out = encoder.embed_audio(noise(2, SR, seed=4), SR)
    (grad,) = torch.autograd.grad(out[:, 0].sum(), [encoder.audio_trunk.conv_block1.conv1.weight])
    assert float(grad.abs().max()) > 0
    with torch.no_grad():
        encoder.audio_trunk.conv_block4.conv2.weight.mul_(0.5)
    saved = save_encoder(encoder, tmp_path / "enc")
    assert "audio_trunk.conv_block4.conv2.weight" in load_file(str(saved / "model.safetensors"))
    again = load_encoder(saved)
    torch.testing.assert_close(again.audio_trunk.conv_block4.conv2.weight, encoder.audio_trunk.conv_block4.conv2.weight)


def test_config_rejects_aisfx_settings_on_the_small_cnn():
    from marsctl.errors import ConfigError

    with pytest.raises(ConfigError, match="audio.kind aisfx only"):
        AudioCnnConfig(finetune=True)
    with pytest.raises(ConfigError, match="audio.kind must be one of"):
        AudioCnnConfig(kind="vggish")


def test_align_trains_the_projection_on_the_frozen_pretrained_trunk(tmp_path):
    """`marsctl align` with encoder 'aisfx' (recipe union-aisfx's settings, tiny budget) on the synthetic
    align dataset: retrieval rises far above chance, the pretrained trunk is untouched and not saved."""
    from test_align import LABELS, make_dataset, write_recipe

    from marsctl.align.config import load_align_config
    from marsctl.align.trainer import Reporter, run_alignment

    data = make_dataset(tmp_path / "ds", with_frames=False)
    recipe = write_recipe(tmp_path / "r.yaml", steps=20, freeze_text=True)
    config = load_align_config(recipe, {"encoder": "aisfx", "stages": [1]})
    summary = run_alignment(config, data, tmp_path / "run", reporter=Reporter(log=lambda line: None))
    report = summary["stages"]["1"]["report"]
    assert report["classes"] == len(LABELS)
    assert report["text_to_audio_R@1"] >= report["chance_R@1"] + 0.3
    assert report["audio_to_text_R@1"] > summary["initial"]["audio_to_text_R@1"] + 0.2
    aligned = load_encoder(tmp_path / "run" / "encoder")
    assert aligned.config.audio.kind == "aisfx"
    assert not any(k.startswith("audio_trunk.") for k in load_file(str(tmp_path / "run" / "encoder" / "model.safetensors")))
    pretrained = read_aisfx_embedding_weights(installed_aisfx_checkpoint())
    assert torch.equal(aligned.audio_trunk.conv_block3.conv2.weight, pretrained["conv_block3.conv2.weight"])
