"""The LAION-CLAP adapter, with the real loading code on a tiny randomly initialized HTSAT/RoBERTa
CLAP saved locally (checkpoint laid out like the released ones, position_ids included) and the
network cut off: loading a local checkpoint + local text model must never reach it."""

from __future__ import annotations

import argparse
import importlib.util
import json

import pytest
import torch

from marsctl.errors import MarsctlError

# not importorskip: `import laion_clap` itself downloads tokenizers (the adapter never imports it)
if importlib.util.find_spec("laion_clap") is None:
    pytest.skip("the laion-clap extra is not installed", allow_module_level=True)

from marsctl.models.encoders import QueryEncoder, load_encoder, save_encoder  # noqa: E402
from marsctl.models.encoders.clap import (  # noqa: E402
    CLAP_SAMPLE_RATE,
    CLAP_WINDOW_SAMPLES,
    ClapEncoder,
    ClapEncoderConfig,
    clap_windows,
)
from clap_fixtures import no_network, tiny_clap, write_roberta_files  # noqa: E402,F401  (fixtures)


@pytest.fixture(scope="module")
def clap_encoder(tiny_clap, no_network) -> ClapEncoder:
    checkpoint, text_dir, _ = tiny_clap
    return ClapEncoder(ClapEncoderConfig(checkpoint=str(checkpoint), text_model=str(text_dir))).eval()


def test_loads_the_checkpoint_offline_with_position_ids(clap_encoder, tiny_clap):
    _, _, state = tiny_clap
    assert isinstance(clap_encoder, QueryEncoder)
    assert clap_encoder.amodel == "HTSAT-tiny"  # detected from the weights
    loaded = clap_encoder.clap.state_dict()
    for key in ("audio_branch.patch_embed.proj.weight", "text_branch.embeddings.word_embeddings.weight",
                "audio_projection.0.weight", "text_projection.2.bias"):
        assert torch.equal(loaded[key], state[f"module.{key}"])
    assert not any(p.requires_grad for p in clap_encoder.clap.parameters())


def test_interface_and_determinism(clap_encoder):
    d = clap_encoder.embedding_dim
    assert d == 512
    gen = torch.Generator().manual_seed(0)
    waves = [0.1 * torch.randn(16_000, generator=gen), 0.1 * torch.randn(8_000, generator=gen), 0.1 * torch.randn(16_000, generator=gen)]
    together = clap_encoder.embed_audio(waves, 16_000)
    assert together.shape == (3, d) and torch.allclose(together.norm(dim=-1), torch.ones(3), atol=1e-5)
    alone = torch.cat([clap_encoder.embed_audio([w], 16_000) for w in waves])
    assert torch.allclose(together, alone, atol=1e-5)
    text = clap_encoder.embed_text(["a dog barking", "a violin", "rain"])
    assert text.shape == (3, d)
    assert torch.allclose(text, torch.cat([clap_encoder.embed_text([t]) for t in ["a dog barking", "a violin", "rain"]]), atol=1e-5)
    assert float((text[0] - text[1]).abs().max().detach()) > 1e-4  # a real tokenizer: different sentences differ
    assert clap_encoder.embed_image(torch.rand(2, 3, 32, 32)).shape == (2, d)


def test_an_unaligned_adapter_is_exactly_clap(clap_encoder):
    """Identity heads: the adapter's audio embedding is CLAP's own for a repeat-padded 10 s input."""
    wave = 0.1 * torch.randn(CLAP_SAMPLE_RATE * 2, generator=torch.Generator().manual_seed(3))
    ours = clap_encoder.embed_audio([wave], CLAP_SAMPLE_RATE)
    quantized = (wave.clamp(-1, 1) * 32767.0).to(torch.int16).float() / 32767.0
    padded = quantized.repeat(5)  # 2 s -> 10 s, as laion-clap's "repeatpad"
    theirs = clap_encoder.clap.get_audio_embedding([{"waveform": padded, "longer": torch.tensor([False])}])
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_long_audio_uses_deterministic_windows(clap_encoder):
    n = CLAP_WINDOW_SAMPLES * 2 + 48_000  # 21 s at 48 kHz -> windows at 0, 10 s, and flush with the end
    windows = clap_windows(torch.arange(n, dtype=torch.float32))
    assert windows.shape == (3, CLAP_WINDOW_SAMPLES)
    assert windows[2, -1] == n - 1 and windows[1, 0] == CLAP_WINDOW_SAMPLES
    wave = 0.05 * torch.randn(n, generator=torch.Generator().manual_seed(4))
    first = clap_encoder.embed_audio([wave], CLAP_SAMPLE_RATE)
    assert torch.equal(first, clap_encoder.embed_audio([wave], CLAP_SAMPLE_RATE))  # no random crop


def test_saved_adapter_directory_references_the_checkpoint(clap_encoder, tmp_path):
    out = save_encoder(clap_encoder, tmp_path / "clap-enc")
    meta = json.loads((out / "config.json").read_text())
    assert meta["encoder_type"] == "laion-clap" and meta["config"]["amodel"] == "HTSAT-tiny"
    assert (out / "model.safetensors").stat().st_size < 10_000_000  # heads only, not the CLAP trunk
    again = load_encoder(out)
    assert torch.allclose(again.embed_text(["a cat"]), clap_encoder.embed_text(["a cat"]), atol=1e-6)


def test_an_empty_tokenizer_is_refused(tiny_clap, tmp_path, no_network):
    """What offline transformers 5 builds for 'roberta-base': specials only. Never accept it."""
    checkpoint, _, _ = tiny_clap
    empty = write_roberta_files(tmp_path / "empty", with_bytes=False)
    with pytest.raises(MarsctlError, match="vocab.json and merges.txt"):
        ClapEncoder(ClapEncoderConfig(checkpoint=str(checkpoint), text_model=str(empty)))
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    with pytest.raises(MarsctlError, match="vocab.json and merges.txt"):
        ClapEncoder(ClapEncoderConfig(checkpoint=str(checkpoint), text_model=str(nothing)))


def test_checkpoints_are_never_unpickled(tiny_clap, tmp_path, no_network):
    checkpoint, text_dir, state = tiny_clap
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=1.0)}, unsafe)
    with pytest.raises(MarsctlError, match="weights-only"):
        ClapEncoder(ClapEncoderConfig(checkpoint=str(unsafe), text_model=str(text_dir)))
    with pytest.raises(MarsctlError, match="no such file"):
        ClapEncoder(ClapEncoderConfig(checkpoint=str(tmp_path / "missing.pt"), text_model=str(text_dir)))
    with pytest.raises(MarsctlError, match="not a LAION-CLAP checkpoint name"):
        load_encoder("laion-clap:not-a-name")


def test_nothing_reached_for_the_network(clap_encoder, no_network):
    clap_encoder.embed_text(["one more sentence"])
    assert no_network == []
