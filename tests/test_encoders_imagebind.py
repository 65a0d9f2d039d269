"""The ImageBind encoder (``imagebind:huge``) with its real loading code, on a small randomly initialized
ImageBind saved like the release (a plain state dict, depth/thermal/IMU towers included) and a small CLIP
BPE merges file the tests write; the network is cut off except for a 127.0.0.1 server for the downloads.

The full-size key layout is checked against ``imagebind_huge_keys.json``: the ``state_dict()`` of the
reference repository's ``imagebind_huge()`` (built on the meta device), which loads the official
checkpoint strictly. The numerical comparison with the reference code itself, and with the real CLIP
vocabulary, is ``bench/imagebind_reference_check.py`` (it needs a checkout of the reference)."""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("tokenizers")
pytest.importorskip("ftfy")

from marsctl.errors import MarsctlError  # noqa: E402
from marsctl.models.encoders import QueryEncoder, load_encoder, save_encoder  # noqa: E402
from marsctl.models.encoders import imagebind as ib  # noqa: E402
from marsctl.models.encoders.imagebind import (  # noqa: E402
    ClipBpeTokenizer,
    ImageBindArch,
    ImageBindEncoder,
    ImageBindEncoderConfig,
    ImageBindModel,
)
from clap_fixtures import no_network  # noqa: E402,F401  (fixture: connections refused but to 127.0.0.1)
from data_http import serve_folder  # noqa: E402

HERE = Path(__file__).parent
#: a few merges, so that BPE has words to build ("dog", "bark", "violin", "the")
MERGES = ["d o", "do g</w>", "b a", "ba r", "bar k", "bark i", "n g</w>", "barki ng</w>", "v i", "o l", "vi ol",
          "i n</w>", "viol in</w>", "t h", "th e</w>", "r a", "i n", "ra in</w>"]


def write_bpe(path: Path, merges=MERGES) -> Path:
    """A CLIP-format merges file: a version line, then one merge per line, gzipped."""
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return path


def tiny_arch(vocab_size: int) -> ImageBindArch:
    return ImageBindArch(out_embed_dim=24, vision_embed_dim=32, vision_num_blocks=1, vision_num_heads=2, text_embed_dim=32,
                         text_num_blocks=1, text_num_heads=2, audio_embed_dim=32, audio_num_blocks=1, audio_num_heads=2,
                         vocab_size=vocab_size)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, no_network):
    """(checkpoint, bpe file, arch, state written) of a small random ImageBind saved like imagebind_huge.pth."""
    root = tmp_path_factory.mktemp("tiny-imagebind")
    bpe = write_bpe(root / "bpe_simple_vocab_16e6.txt.gz")
    arch = tiny_arch(ClipBpeTokenizer(bpe).vocab_size)
    torch.manual_seed(0)
    state = ImageBindModel(arch).state_dict()
    # the release also holds the depth, thermal and IMU towers: they must be skipped, not refused
    state.update({
        "modality_preprocessors.depth.cls_token": torch.zeros(1, 1, 8),
        "modality_trunks.thermal.blocks.0.attn.in_proj_weight": torch.zeros(24, 8),
        "modality_heads.imu.3.weight": torch.zeros(24, 8),
        "modality_postprocessors.imu.1.log_logit_scale": torch.tensor(1.6),
    })
    checkpoint = root / "imagebind_tiny.pth"
    torch.save(state, checkpoint)
    return checkpoint, bpe, arch, state


@pytest.fixture(scope="module")
def encoder(tiny, tmp_path_factory) -> ImageBindEncoder:
    checkpoint, bpe, arch, _ = tiny
    cache = tmp_path_factory.mktemp("cache")
    config = ImageBindEncoderConfig(checkpoint=str(checkpoint), arch=arch, bpe=str(bpe), cache_dir=str(cache))
    return ImageBindEncoder(config).requires_grad_(False).eval()  # as load_encoder gives it


def noise(n: int, samples: int, seed: int) -> torch.Tensor:
    return 0.1 * torch.randn(n, samples, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the key layout


def test_full_size_key_layout_is_the_reference_checkpoints():
    reference = json.loads((HERE / "imagebind_huge_keys.json").read_text())["shapes"]
    ours = {k: list(v.shape) for k, v in ib.build_on_meta(ImageBindArch()).state_dict().items()}
    kept = {k: v for k, v in reference.items() if not ib.skipped_key(k)}
    assert ours == kept  # every key and shape of the text, audio and vision towers
    assert {k.split(".")[1] for k in reference if ib.skipped_key(k)} == {"depth", "thermal", "imu"}
    assert len(kept) == 864 and sum(torch.Size(s).numel() for s in kept.values()) == 1_073_103_659


def test_the_checkpoint_loads_strictly_and_round_trips(encoder, tiny):
    _, _, _, state = tiny
    assert isinstance(encoder, QueryEncoder) and encoder.embedding_dim == 24
    loaded = encoder.imagebind.state_dict()
    assert set(loaded) == {k for k in state if not ib.skipped_key(k)}
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)
    assert not any(p.requires_grad for p in encoder.imagebind.parameters())
    assert not any(t.is_meta for t in list(encoder.imagebind.parameters()) + list(encoder.imagebind.buffers()))


def test_weights_that_do_not_fit_are_one_line_errors(tiny, tmp_path, no_network):
    checkpoint, bpe, arch, state = tiny
    config = dict(arch=arch, bpe=str(bpe), cache_dir=str(tmp_path))
    missing = {k: v for k, v in state.items() if k != "modality_heads.audio.2.weight"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(MarsctlError, match="missing: modality_heads.audio.2.weight"):
        ImageBindEncoder(ImageBindEncoderConfig(checkpoint=str(tmp_path / "missing.pth"), **config))
    with pytest.raises(MarsctlError, match=r"shapes: modality_heads.vision.2.weight: \(24, 32\) vs \(16, 32\)"):
        ImageBindEncoder(ImageBindEncoderConfig(checkpoint=str(checkpoint), **dict(config, arch=dataclasses.replace(arch, out_embed_dim=16))))
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"state_dict": state, "args": Path("/x")}, unsafe)
    with pytest.raises(MarsctlError, match="weights-only"):
        ImageBindEncoder(ImageBindEncoderConfig(checkpoint=str(unsafe), **config))
    (tmp_path / "partial.pth").write_bytes(checkpoint.read_bytes()[:1000])
    with pytest.raises(MarsctlError, match="delete it to download again"):
        ImageBindEncoder(ImageBindEncoderConfig(checkpoint=str(tmp_path / "partial.pth"), **config))
    with pytest.raises(MarsctlError, match="not an ImageBind checkpoint name"):
        ImageBindEncoder(ImageBindEncoderConfig(checkpoint=str(tmp_path / "nothing.pth"), **config))
    with pytest.raises(MarsctlError, match="huge architecture"):
        ImageBindEncoder(ImageBindEncoderConfig(checkpoint="huge", **config))


# ----------------------------------------------------------------------------- preprocessing


def test_tokenizer_follows_clips_bpe_and_imagebinds_padding(tiny):
    _, bpe, _, _ = tiny
    tok = ClipBpeTokenizer(bpe)
    alphabet = list(ib.bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(alphabet + [c + "</w>" for c in alphabet] + ["".join(m.split()) for m in MERGES])}
    assert tok.vocab_size == 512 + len(MERGES) + 2 and (tok.start_id, tok.end_id) == (tok.vocab_size - 2, tok.vocab_size - 1)
    ids = tok(["A  DOG barking&amp;amp;", "the rain"])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    # cleaning (HTML unescaped twice, spaces, lower case), BPE merges, then start ... end and zeros
    expected = [tok.start_id, vocab["a</w>"], vocab["dog</w>"], vocab["barking</w>"], vocab["&</w>"], tok.end_id]
    assert ids[0, :6].tolist() == expected and not ids[0, 6:].any()
    assert ids[1, :4].tolist() == [tok.start_id, vocab["the</w>"], vocab["rain</w>"], tok.end_id]
    long = tok(["dog " * 100])[0]
    assert long.tolist() == [tok.start_id] + [vocab["dog</w>"]] * 75 + [tok.end_id]  # truncated, the end token kept
    assert tok(["café"])[0, 1:4].tolist() == [vocab["c"], vocab["a"], vocab["f"]]  # bytes of é follow, as tokens
    assert int(tok(["<|endoftext|>"])[0, 1]) == tok.end_id  # a special token in the text stays one token


def test_clip_bounds_are_pytorchvideos_constant_clips():
    assert ib.clip_bounds(160_000) == [(0, 32_000), (42_666, 74_666), (85_333, 117_333)]  # 10 s: 0, 8/3, 16/3 s
    assert ib.clip_bounds(16_000) == [(0, 16_000)] * 3  # shorter than 2 s: the whole clip, three times
    assert ib.clip_bounds(32_000) == [(0, 32_000)] * 3


def test_batched_fbank_is_kaldis(encoder):
    from torchaudio.compliance.kaldi import fbank

    waves = noise(3, 16_123, seed=1) + 0.02  # an offset, for the DC removal
    ours = ib.kaldi_fbank(waves, encoder.mel_banks)
    for row in range(3):
        theirs = fbank(waves[row : row + 1], htk_compat=True, sample_frequency=16_000, use_energy=False, window_type="hanning",
                       num_mel_bins=128, dither=0.0, frame_length=25, frame_shift=10)
        assert ours[row].shape == theirs.shape == (99, 128)
        assert torch.allclose(ours[row], theirs, atol=1e-4), float((ours[row] - theirs).abs().max())
    inputs = ib.audio_input(noise(2, 20_000, seed=2), encoder.mel_banks)
    assert inputs.shape == (2, 3, 1, 128, 204)
    # 1.25 s gives 123 frames; the 81 padded ones are zeros before normalization
    assert torch.allclose(inputs[..., 123:], torch.full_like(inputs[..., 123:], -ib.FBANK_MEAN / ib.FBANK_STD))


def test_vision_preprocessing_sizes(encoder):
    out = ib.vision_input(torch.rand(2, 3, 300, 400))
    assert out.shape == (2, 3, 224, 224)
    square = torch.rand(1, 3, 224, 224)
    mean, std = torch.tensor(ib.CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(ib.CLIP_STD).view(1, 3, 1, 1)
    assert torch.allclose(ib.vision_input(square), (square - mean) / std)


# ----------------------------------------------------------------------------- the encoder


def test_interface_determinism_and_an_unaligned_encoder_is_imagebind(encoder):
    d = encoder.embedding_dim
    waves = [noise(1, 16_000, 3)[0], noise(1, 40_000, 4)[0], noise(1, 16_000, 5)[0]]
    together = encoder.embed_audio(waves, 16_000)
    assert together.shape == (3, d) and torch.allclose(together.norm(dim=-1), torch.ones(3), atol=1e-5)
    alone = torch.cat([encoder.embed_audio([w], 16_000) for w in waves])
    assert torch.allclose(together, alone, atol=1e-5)
    with torch.no_grad():  # identity heads: the mean of ImageBind's clip embeddings
        clips = encoder.imagebind.embed("audio", ib.audio_input(waves[1][None], encoder.mel_banks).flatten(0, 1))
    assert torch.allclose(together[1], torch.nn.functional.normalize(clips.mean(0), dim=-1), atol=1e-5)
    text = encoder.embed_text(["a dog barking", "a violin", "rain"])
    assert text.shape == (3, d) and float((text[0] - text[1]).abs().max()) > 1e-4
    assert torch.allclose(text[2], encoder.embed_text(["rain"])[0], atol=1e-5)
    images = encoder.embed_image(torch.rand(2, 3, 64, 80))
    assert images.shape == (2, d) and torch.allclose(images.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert encoder.embed_audio(waves[:1], 44_100).shape == (1, d)  # resampled to 16 kHz first


def test_gradients_reach_the_waveform_finite_and_nonzero(encoder):
    query = encoder.embed_text(["a dog barking"])
    for rate in (16_000, 44_100):
        waves = noise(2, 2 * rate, seed=6).requires_grad_(True)
        reward = (encoder.embed_audio(waves, rate, differentiable=True) * query).sum()
        reward.backward()
        grad = waves.grad
        assert torch.isfinite(grad).all() and grad.abs().sum(-1).min() > 0  # every clip gets a gradient
    assert not any(p.grad is not None for p in encoder.imagebind.parameters())  # frozen tower
    plain = encoder.embed_audio(noise(1, 16_000, 7).requires_grad_(True), 16_000)
    assert plain.grad_fn is None  # without the request: no graph to the waveform


def test_saved_directory_references_the_checkpoint(encoder, tmp_path, tiny, monkeypatch):
    out = save_encoder(encoder, tmp_path / "ib-enc")
    meta = json.loads((out / "config.json").read_text())
    assert meta["encoder_type"] == "imagebind" and meta["config"]["arch"]["text_num_blocks"] == 1
    assert (out / "model.safetensors").stat().st_size < 100_000  # the heads only, not the towers
    again = load_encoder(out)
    assert torch.allclose(again.embed_text(["a dog"]), encoder.embed_text(["a dog"]), atol=1e-6)
    # the spec means the huge arch (the BPE file is found in the default cache, where a user may put it by hand)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    (tmp_path / "xdg" / "marsctl" / "imagebind").mkdir(parents=True)
    (tmp_path / "xdg" / "marsctl" / "imagebind" / "bpe_simple_vocab_16e6.txt.gz").write_bytes(tiny[1].read_bytes())
    with pytest.raises(MarsctlError, match="a vocabulary of 532 tokens, the text tower has 49408"):
        load_encoder(f"imagebind:{tiny[0]}")


# ----------------------------------------------------------------------------- downloads


def test_downloads_are_cached_and_checked(tiny, tmp_path, monkeypatch, no_network):
    checkpoint, bpe, arch, _ = tiny
    served = tmp_path / "served"
    served.mkdir()
    (served / "imagebind_tiny.pth").write_bytes(checkpoint.read_bytes())
    (served / "bpe.txt.gz").write_bytes(bpe.read_bytes())
    cache = tmp_path / "cache"
    with serve_folder(served) as base:
        config = ImageBindEncoderConfig(checkpoint=f"{base}/imagebind_tiny.pth", arch=arch, bpe=f"{base}/bpe.txt.gz", cache_dir=str(cache))
        first = ImageBindEncoder(config)
        # the named checkpoint and the default BPE file, from their own URL (here the local server)
        monkeypatch.setitem(ib.IMAGEBIND_CHECKPOINTS, "huge", f"{base}/imagebind_tiny.pth")
        assert ib.resolve_checkpoint("huge", cache) == cache / "imagebind_tiny.pth"
        monkeypatch.setattr(ib, "BPE_URL", f"{base}/bpe.txt.gz")
        with pytest.raises(MarsctlError, match="cannot download it"):  # the real file's SHA-256 is not this one's
            ib.resolve_bpe("", cache)
        assert not (cache / "bpe_simple_vocab_16e6.txt.gz").exists()  # nothing half-checked left under the name
        monkeypatch.setattr(ib, "BPE_SHA256", __import__("hashlib").sha256(bpe.read_bytes()).hexdigest())
        assert ib.resolve_bpe("", cache).read_bytes() == bpe.read_bytes()
        with pytest.raises(MarsctlError, match="cannot download it.*give a local path"):
            ib.cached_download(f"{base}/missing.pth", cache)
    assert len(list(cache.rglob("*.pth"))) == 2 and not list(cache.rglob("*.partial")) and not list(cache.rglob("tmp*"))
    again = ImageBindEncoder(config)  # the server is gone: from the cache
    assert torch.equal(again.embed_text(["a dog"]), first.embed_text(["a dog"]))
    assert no_network == []


# ----------------------------------------------------------------------------- alignment


def test_align_stages_1_to_3_run_on_it(encoder, tmp_path):
    import yaml
    from test_align import invoke, make_dataset

    start = save_encoder(encoder, tmp_path / "start")
    data = make_dataset(tmp_path / "ds", per_split=(3, 1, 1))
    stage = {"steps": 2, "batch_size": 6, "crop_seconds": 1.0, "learning_rate": 3e-3, "eval_every": 2, "checkpoint_every": 2}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({f"stage{k}": dict(stage) for k in (1, 2, 3)} | {"eval": {"max_seconds": 0.5}}))
    out = tmp_path / "run"
    result = invoke("align", "--encoder", str(start), "--data", str(data), "--stages", "1,2,3", "--recipe", str(recipe),
                    "--out", str(out), "--device", "cpu", "-q")
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["stages"]) == {"1", "2", "3"} and "audio_to_image_R@1" in metrics["stages"]["3"]["report"]
    aligned = load_encoder(out / "encoder")
    assert aligned.encoder_type == "imagebind" and aligned.anchor_fusion is not None
    heads = {k: v for k, v in aligned.persistent_state_dict().items() if k.endswith("head.weight")}
    assert any(not torch.equal(v, torch.eye(v.shape[0])) for v in heads.values())  # the heads were trained
