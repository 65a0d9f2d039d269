"""The QueryEncoder contract on the built-in offline encoder, the anchor fusion, the CLIP image
branch (a tiny randomly initialized CLIPVisionModel saved locally), and encoder directories."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from marsctl.errors import MarsctlError
from marsctl.models.encoders import (
    AnchorFusion,
    AudioCnnConfig,
    BuiltinEncoder,
    BuiltinEncoderConfig,
    ImageTowerConfig,
    QueryEncoder,
    load_encoder,
    save_encoder,
)

SR = 16_000


def tone(freq: float, seconds: float = 1.0, sr: int = SR) -> torch.Tensor:
    t = torch.arange(int(seconds * sr)) / sr
    return 0.3 * torch.sin(2 * torch.pi * freq * t)


@pytest.fixture(scope="module")
def builtin() -> BuiltinEncoder:
    return load_encoder("builtin")


def assert_unit_rows(x: torch.Tensor, n: int, d: int) -> None:
    assert x.shape == (n, d) and x.dtype == torch.float32
    assert torch.allclose(x.norm(dim=-1), torch.ones(n), atol=1e-5)


def test_builtin_follows_the_interface(builtin):
    assert isinstance(builtin, QueryEncoder)
    d = builtin.embedding_dim
    assert_unit_rows(builtin.embed_text(["a dog barking", "a violin"]), 2, d)
    assert_unit_rows(builtin.embed_audio(torch.stack([tone(440), tone(880)]), SR), 2, d)
    assert_unit_rows(builtin.embed_audio(np.stack([tone(440).numpy()]), SR), 1, d)
    assert_unit_rows(builtin.embed_image(torch.rand(3, 3, 48, 64)), 3, d)
    assert builtin.device == torch.device("cpu")
    with pytest.raises(TypeError):
        builtin.embed_text("one string")
    with pytest.raises(ValueError):
        builtin.embed_image(torch.rand(2, 1, 32, 32))


def test_builtin_text_tower_is_the_pretrained_sentence_encoder(builtin):
    """The packaged all-MiniLM-L6-v2 is real: related captions are closer than unrelated ones."""
    dog, puppy, piano = builtin.embed_text(["a dog barking", "a puppy yapping", "someone playing the piano"]).detach()
    assert float(dog @ puppy) > float(dog @ piano) + 0.2
    # loaded for inference: frozen; for training, everything but the pretrained trunk unfreezes
    assert not any(p.requires_grad for p in builtin.parameters())
    trainable = load_encoder("builtin").unfreeze_trainable()
    assert not any(p.requires_grad for p in trainable.text_trunk.parameters())
    assert trainable.audio_head.weight.requires_grad and trainable.logit_scale.requires_grad
    assert trainable.audio_trunk.blocks[0][0].weight.requires_grad


def test_builtin_is_deterministic_across_batch_sizes(builtin):
    waves = [tone(220, 1.0), tone(330, 0.5), tone(440, 1.0), tone(550, 1.5), tone(660, 0.5)]
    together = builtin.embed_audio(waves, SR)
    alone = torch.cat([builtin.embed_audio([w], SR) for w in waves])
    assert torch.allclose(together, alone, atol=1e-5)
    texts = ["violin", "a dog barking loudly in the yard", "rain"]
    assert torch.allclose(builtin.embed_text(texts), torch.cat([builtin.embed_text([t]) for t in texts]), atol=1e-5)
    images = torch.rand(4, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(builtin.embed_image(images), torch.cat([builtin.embed_image(i[None]) for i in images]), atol=1e-5)
    # same input, same vector; different input, different vector
    assert torch.equal(builtin.embed_audio([waves[0]], SR), builtin.embed_audio([waves[0]], SR))
    assert float(together[0] @ together[3]) < 0.9999


def test_builtin_resamples_and_takes_variable_lengths(builtin):
    at_16k = builtin.embed_audio([tone(440, 1.0)], SR)
    at_8k = builtin.embed_audio([tone(440, 1.0, sr=8000)], 8000)
    assert float(at_16k[0] @ at_8k[0]) > 0.99  # the same tone, whatever the input rate
    short = builtin.embed_audio([torch.zeros(100) + 0.1], SR)  # shorter than the CNN's receptive field
    assert torch.isfinite(short).all()
    with pytest.raises(ValueError):
        builtin.embed_audio([torch.zeros(0)], SR)


def test_builtin_initialization_is_seeded():
    small = BuiltinEncoderConfig(audio=AudioCnnConfig(channels=(8, 16)), image=ImageTowerConfig(channels=(8, 16)))
    a, b = BuiltinEncoder(small), BuiltinEncoder(small)
    assert torch.equal(a.audio_head.weight, b.audio_head.weight)
    c = BuiltinEncoder(BuiltinEncoderConfig(audio=small.audio, image=small.image, init_seed=1))
    assert not torch.equal(a.audio_head.weight, c.audio_head.weight)


def test_save_and_load_directory_roundtrip(builtin, tmp_path):
    builtin.anchor_fusion = AnchorFusion(builtin.embedding_dim, rank=8)
    with torch.no_grad():
        builtin.anchor_fusion.output.weight.normal_()  # a "trained" anchor must survive the roundtrip
        builtin.audio_head.bias.add_(0.1)
    try:
        out = save_encoder(builtin, tmp_path / "enc")
        files = sorted(p.name for p in out.iterdir())
        assert files == ["README.md", "config.json", "model.safetensors"]
        meta = json.loads((out / "config.json").read_text())
        assert meta["encoder_type"] == "builtin" and meta["anchor_fusion"]["rank"] == 8
        # the embedded default stays small: the frozen MiniLM is referenced, not copied
        assert (out / "model.safetensors").stat().st_size < 8_000_000
        assert "marsctl" in (out / "README.md").read_text()
        loaded = load_encoder(out)
        wave = [tone(300), tone(500, 0.7)]
        assert torch.allclose(loaded.embed_audio(wave, SR), builtin.embed_audio(wave, SR), atol=1e-6)
        e = builtin.embed_text(["x", "y"])
        assert torch.allclose(loaded.anchor_fusion(text=e, audio=e.flip(0)), builtin.anchor_fusion(text=e, audio=e.flip(0)), atol=1e-6)
        # saving again over the directory replaces it whole
        save_encoder(loaded, out)
        assert sorted(p.name for p in out.iterdir()) == files
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    finally:
        builtin.anchor_fusion = None
        with torch.no_grad():
            builtin.audio_head.bias.sub_(0.1)


def test_load_encoder_errors_name_the_problem(tmp_path):
    with pytest.raises(MarsctlError, match="not an encoder directory"):
        load_encoder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MarsctlError, match="no config.json"):
        load_encoder(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"encoder_type": "builtin", "config": {"embedding_dim": 384}}))
    (bad / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(MarsctlError, match="model.safetensors"):
        load_encoder(bad)
    (bad / "config.json").write_text(json.dumps({"encoder_type": "builtin", "config": {"embedding_dimension": 3}}))
    with pytest.raises(MarsctlError, match="unknown key"):
        load_encoder(bad)


def test_anchor_fusion_starts_as_the_mean_and_learns():
    torch.manual_seed(0)
    fusion = AnchorFusion(16, rank=4, modalities=("audio", "text", "image"))
    a, t, i = (torch.nn.functional.normalize(torch.randn(5, 16), dim=-1) for _ in range(3))
    expected = torch.nn.functional.normalize(a + t + i, dim=-1)
    assert torch.allclose(fusion(audio=a, text=t, image=i), expected, atol=1e-6)
    assert torch.allclose(fusion(audio=a), a, atol=1e-6)  # a missing modality drops out
    # gradients reach the bilinear factors through the zero-initialized output
    target = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    opt = torch.optim.Adam(fusion.parameters(), lr=0.05)
    before = float((fusion(audio=a, text=t, image=i) * target).sum(-1).mean())
    for _ in range(50):
        loss = -(fusion(audio=a, text=t, image=i) * target).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert -float(loss) > before + 0.2
    # an image embedding is ignored by an anchor never trained with images
    audio_text = AnchorFusion(16, rank=4)
    assert torch.allclose(audio_text(audio=a, text=t, image=i), audio_text(audio=a, text=t))
    with pytest.raises(ValueError):
        audio_text(image=i)


@pytest.fixture(scope="module")
def tiny_clip_vision(tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=24)
    path = tmp_path_factory.mktemp("tiny-clip-vision")
    CLIPVisionModelWithProjection(config).save_pretrained(str(path))
    return path


def test_clip_vision_image_branch(tiny_clip_vision, tmp_path, monkeypatch):
    from transformers import CLIPVisionModelWithProjection

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = BuiltinEncoderConfig(audio=AudioCnnConfig(channels=(8, 16)),
                                  image=ImageTowerConfig(kind="clip-vision", model=str(tiny_clip_vision)))
    encoder = BuiltinEncoder(config).eval()
    images = torch.rand(3, 3, 50, 40, generator=torch.Generator().manual_seed(1))
    emb = encoder.embed_image(images)
    assert_unit_rows(emb, 3, encoder.embedding_dim)
    assert torch.allclose(emb, torch.cat([encoder.embed_image(x[None]) for x in images]), atol=1e-5)
    # the trunk is the saved CLIP model (frozen); only the projection head trains
    reference = CLIPVisionModelWithProjection.from_pretrained(str(tiny_clip_vision))
    for name, value in reference.state_dict().items():
        assert torch.equal(encoder.image_trunk_pretrained.model.state_dict()[name], value)
    assert not any(p.requires_grad for p in encoder.image_trunk_pretrained.parameters())
    assert encoder.image_head.weight.requires_grad and encoder.image_head.weight.shape == (encoder.embedding_dim, 24)
    # saved directory references the CLIP weights instead of copying them
    out = save_encoder(encoder, tmp_path / "enc")
    from safetensors.torch import load_file

    assert not [k for k in load_file(str(out / "model.safetensors")) if k.startswith("image_trunk_pretrained.")]
    assert torch.allclose(load_encoder(out).embed_image(images), emb, atol=1e-6)
    with pytest.raises(MarsctlError, match="no such file"):
        BuiltinEncoder(BuiltinEncoderConfig(image=ImageTowerConfig(kind="clip-vision", model=str(tmp_path / "missing"))))
    # by name, as `marsctl align --encoder builtin --image-model DIR` does
    named = load_encoder("builtin", image_model=str(tiny_clip_vision))
    assert named.config.image.kind == "clip-vision" and named.embed_image(images).shape == (3, named.embedding_dim)
    with pytest.raises(MarsctlError, match="already has its image trunk"):
        load_encoder(out, image_model=str(tiny_clip_vision))
