"""The LAION-CLAP adapter, with the real loading code on a tiny randomly initialized HTSAT/RoBERTa
CLAP saved locally (checkpoint laid out like the released ones, position_ids included) and the
network cut off: loading a local checkpoint + local text model must never reach it."""

from __future__ import annotations

import argparse
import importlib.util
import json
import socket
from pathlib import Path

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
    build_clap_model,
    clap_windows,
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable-character table (the alphabet of byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_roberta_files(path: Path, with_bytes: bool = True) -> Path:
    """A byte-level BPE RoBERTa tokenizer (no merges: one token per byte) and a 1-layer RoBERTa config."""
    from transformers import RobertaConfig, RobertaTokenizer

    path.mkdir(parents=True, exist_ok=True)
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    if with_bytes:
        for char in bytes_to_unicode().values():
            vocab[char] = len(vocab)
    vocab["<mask>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    RobertaTokenizer(str(path / "vocab.json"), str(path / "merges.txt")).save_pretrained(str(path))
    RobertaConfig(
        vocab_size=len(vocab), hidden_size=768, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=80, pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1,
    ).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def no_network():
    """Every connection attempt is refused *and recorded* (a library may swallow the error)."""
    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args)[:200])
        raise OSError("network access is not allowed in this test")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        yield attempts


@pytest.fixture(scope="module")
def tiny_clap(tmp_path_factory, no_network):
    """(checkpoint path, text model dir, the state dict written) of a tiny random CLAP."""
    from transformers import RobertaConfig

    root = tmp_path_factory.mktemp("tiny-clap")
    text_dir = write_roberta_files(root / "roberta")
    torch.manual_seed(0)
    model = build_clap_model("HTSAT-tiny", RobertaConfig.from_pretrained(str(text_dir)))
    state = {f"module.{k}": v for k, v in model.state_dict().items()}  # saved from DDP, like the releases
    state["module.text_branch.embeddings.position_ids"] = torch.arange(80)[None]  # transformers < 4.31 stored it
    checkpoint = root / "tiny-clap.pt"
    torch.save({"epoch": 3, "name": "tiny", "state_dict": state}, checkpoint)
    return checkpoint, text_dir, state


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
