"""Differentiable semantic rewards: ``embed_audio(..., differentiable=True)`` passes a correct gradient
back to the waveform through the built-in encoder and through the LAION-CLAP adapter (a tiny randomly
initialized CLAP saved like the released checkpoints, see clap_fixtures.py); without the request the
output is today's, with no graph back to the waveform."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from marsctl.models.encoders import ProjectedEncoder, load_encoder
from marsctl.models.encoders.clap import (
    CLAP_SAMPLE_RATE,
    ClapEncoder,
    ClapEncoderConfig,
    clap_windows,
    int16_round_trip,
    straight_through,
)
from clap_fixtures import no_network, tiny_clap  # noqa: F401  (fixtures)

SR = 16_000
needs_laion_clap = pytest.mark.skipif(importlib.util.find_spec("laion_clap") is None, reason="the laion-clap extra is not installed")


def noise(rows: int, samples: int, seed: int, scale: float = 0.1) -> torch.Tensor:
    return scale * torch.randn(rows, samples, generator=torch.Generator().manual_seed(seed))


def query_similarity(encoder: ProjectedEncoder, waves: torch.Tensor, query: torch.Tensor, sample_rate: int = SR, **kwargs) -> torch.Tensor:
    """The query-similarity reward summed over the batch: sum_i cos(phi_a(y_i), q)."""
    return (encoder.embed_audio(waves, sample_rate, **kwargs) * query).sum()


def check_gradient(encoder: ProjectedEncoder, waves: torch.Tensor, query: torch.Tensor, sample_rate: int = SR) -> torch.Tensor:
    """The waveform gradient is finite, non-zero, and predicts the change of the reward along itself
    (a central finite difference over a step of RMS 1e-4 per sample)."""
    leaf = waves.clone().requires_grad_(True)
    reward = query_similarity(encoder, leaf, query, sample_rate, differentiable=True)
    (grad,) = torch.autograd.grad(reward, leaf)
    assert torch.isfinite(grad).all() and float(grad.abs().max()) > 0
    step = 1e-4 * waves.numel() ** 0.5 * grad / grad.norm()
    with torch.no_grad():
        change = float(query_similarity(encoder, waves + step, query, sample_rate) - query_similarity(encoder, waves - step, query, sample_rate)) / 2
    predicted = float((grad * step).sum())
    assert change > 0 and abs(change - predicted) < 0.3 * predicted, (change, predicted)
    return grad


def check_default_keeps_no_graph(encoder: ProjectedEncoder, waves: torch.Tensor, sample_rate: int = SR) -> None:
    """Not asked: even with grad mode on and a waveform that requires grad, the (frozen) encoder's
    output carries no graph; asked, it does even under no_grad; both give the same value."""
    leaf = waves.clone().requires_grad_(True)
    with torch.enable_grad():
        default = encoder.embed_audio(leaf, sample_rate)
    assert not default.requires_grad and default.grad_fn is None
    with torch.no_grad():
        asked = encoder.embed_audio(leaf, sample_rate, differentiable=True)
        under_no_grad = encoder.embed_audio(waves, sample_rate)
    assert asked.requires_grad
    assert torch.equal(default, under_no_grad)
    assert torch.equal(asked.detach(), default)  # the same forward value (the straight-through quantizer included)


# -- the built-in encoder ---------------------------------------------------------------


@pytest.fixture(scope="module")
def builtin():
    return load_encoder("builtin")


def test_builtin_gradient_reaches_the_waveform(builtin):
    query = builtin.embed_text(["a dog barking"])
    check_gradient(builtin, noise(2, SR, seed=0), query)
    # through the resampler too (22.05 kHz -> the encoder's 16 kHz)
    check_gradient(builtin, noise(1, 22_050, seed=1), query, sample_rate=22_050)
    assert not any(p.grad is not None for p in builtin.parameters())  # frozen: nothing accumulates in the encoder


def test_builtin_computes_no_graph_unless_asked(builtin):
    check_default_keeps_no_graph(builtin, noise(2, SR, seed=2))


def test_alignment_still_trains_the_builtin_without_a_waveform_gradient():
    """A trainable encoder (what `marsctl align` trains) gets parameter gradients from the default
    path, and none reach the waveform unless asked."""
    encoder = load_encoder("builtin").unfreeze_trainable()
    leaf = noise(2, SR, seed=3).requires_grad_(True)
    out = encoder.embed_audio(leaf, SR)
    head_grad, wave_grad = torch.autograd.grad(out.sum(), [encoder.audio_head.weight, leaf], allow_unused=True)
    assert head_grad is not None and float(head_grad.abs().max()) > 0
    assert wave_grad is None
    (wave_grad,) = torch.autograd.grad(encoder.embed_audio(leaf, SR, differentiable=True)[:, 0].sum(), [leaf])
    assert float(wave_grad.abs().max()) > 0


# -- the LAION-CLAP adapter ---------------------------------------------------------------


def test_straight_through_quantization_keeps_the_value_and_passes_the_gradient():
    x = torch.tensor([0.5, -0.25, 1e-6, 0.12345678, 1.7, -3.0]).requires_grad_(True)
    quantized = int16_round_trip(x)
    assert float((quantized - x.detach())[:4].abs().max()) < 1 / 32767 and quantized[4] == 1.0 and quantized[5] == -1.0
    passed = straight_through(x, quantized)
    assert torch.equal(passed.detach(), quantized)  # bit-identical forward value
    (grad,) = torch.autograd.grad((passed * torch.arange(6.0)).sum(), x)
    assert torch.equal(grad, torch.arange(6.0))  # the identity backward, clipped samples included


def clap_embedding_as_of_ff85a41(encoder: ClapEncoder, waves_48k: torch.Tensor) -> torch.Tensor:
    """The adapter's audio embedding before gradients could be asked for (commit ff85a41), verbatim:
    no_grad, int16 round trip, 10 s windows, mean of the window embeddings, the audio head."""
    with torch.no_grad():
        waveforms = (waves_48k.clamp(-1, 1) * 32767.0).to(torch.int16).to(torch.float32) / 32767.0
        out = []
        for wave in waveforms:
            windows = clap_windows(wave)
            inputs = [{"waveform": w, "longer": torch.tensor([False])} for w in windows]
            embeddings = encoder.clap.get_audio_embedding(inputs)
            out.append(F.normalize(embeddings.mean(0), dim=-1))
        features = torch.stack(out)
    return F.normalize(encoder.audio_head(features), dim=-1)


@pytest.fixture(scope="module")
def clap_encoder(tiny_clap, no_network) -> ClapEncoder:
    checkpoint, text_dir, _ = tiny_clap
    return ClapEncoder(ClapEncoderConfig(checkpoint=str(checkpoint), text_model=str(text_dir))).eval().requires_grad_(False)


@needs_laion_clap
def test_clap_gradient_reaches_the_waveform(clap_encoder):
    query = clap_encoder.embed_text(["a dog barking"])
    check_gradient(clap_encoder, noise(2, SR, seed=4), query)
    assert not any(p.grad is not None for p in clap_encoder.clap.parameters())


@needs_laion_clap
def test_clap_without_the_request_is_todays_output(clap_encoder):
    waves = noise(2, CLAP_SAMPLE_RATE, seed=5, scale=0.5)  # scale 0.5: some samples clip at +-1
    reference = clap_embedding_as_of_ff85a41(clap_encoder, waves)
    for wave, expected in zip(waves, reference):  # one clip: bit for bit
        assert torch.equal(clap_encoder.embed_audio(wave[None], CLAP_SAMPLE_RATE)[0], expected)
    # several clips share one HTSAT batch now (issue 26): equal up to float32 rounding
    assert torch.allclose(clap_encoder.embed_audio(waves, CLAP_SAMPLE_RATE), reference, rtol=0, atol=1e-6)
    check_default_keeps_no_graph(clap_encoder, noise(1, SR, seed=6))


@needs_laion_clap
def test_clap_gradient_flows_without_quantization_too(tiny_clap, no_network):
    """quantize_int16 off: the same path minus the straight-through step; the heads train as before."""
    checkpoint, text_dir, _ = tiny_clap
    encoder = ClapEncoder(ClapEncoderConfig(checkpoint=str(checkpoint), text_model=str(text_dir), quantize_int16=False)).eval()
    leaf = noise(1, SR, seed=7).requires_grad_(True)
    out = encoder.embed_audio(leaf, SR, differentiable=True)
    head_grad, wave_grad = torch.autograd.grad(out[:, :4].sum(), [encoder.audio_head.weight, leaf])
    assert torch.isfinite(wave_grad).all() and float(wave_grad.abs().max()) > 0 and float(head_grad.abs().max()) > 0
    assert not any(p.requires_grad for p in encoder.clap.parameters())
