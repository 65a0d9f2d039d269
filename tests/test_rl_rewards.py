"""Reward functions: each one by hand, the weighted sum, anchors, and the hacking guard."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from marsctl.config import SignalConfig
from marsctl.errors import ConfigError
from marsctl.models.encoders import AnchorFusion
from marsctl.models.query import normalize
from marsctl.rl.rewards import (
    RewardBatch,
    RewardConfig,
    anchor_embeddings,
    compute_rewards,
    energy_guard_reward,
    query_similarity_reward,
    reward_functions,
    semantic_anchor_reward,
    si_sdr_reward,
)
from test_separator_fixtures import SR, LabelTestEncoder, synth

SIGNAL = SignalConfig()


@pytest.fixture(scope="module")
def sources():
    rng = np.random.default_rng(5)
    target = torch.from_numpy(synth("low hum", 1.0, rng)) * 0.5
    other = torch.from_numpy(synth("high whistle", 1.0, rng)) * 0.5
    return target, other


def _audio_anchor_encoder():
    encoder = LabelTestEncoder(embedding_dim=16)
    encoder.anchor_fusion = AnchorFusion(16, rank=4, modalities=("audio",))  # untrained: z* = phi_a(target)
    return encoder


def test_semantic_anchor_is_cosine_to_anchor(sources):
    target, other = sources
    encoder = _audio_anchor_encoder()
    anchors, origin = anchor_embeddings(encoder, target[None], ["low hum"], SR)
    assert origin == "anchor_fusion"
    estimates = torch.stack([target, other, target + other])
    batch = RewardBatch(estimates, (target + other)[None], estimate_embeddings=encoder.embed_audio(estimates, SR), anchors=anchors)
    reward = semantic_anchor_reward(batch)
    assert reward[0].item() == pytest.approx(1.0, abs=1e-5)
    assert reward[0] > reward[2] > reward[1]  # target > mixture > the other source
    by_hand = (batch.estimate_embeddings[1] * anchors[0]).sum() / batch.estimate_embeddings[1].norm()
    assert reward[1].item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_anchor_falls_back_to_the_query_without_anchor_module(sources):
    target, _ = sources
    encoder = LabelTestEncoder(embedding_dim=16)
    q = normalize(torch.randn(1, 16))
    anchors, origin = anchor_embeddings(encoder, target[None], ["low hum"], SR, fallback_queries=q)
    assert origin == "query (no anchor module)" and torch.allclose(anchors, q)
    anchors, _ = anchor_embeddings(encoder, target[None], ["low hum"], SR)
    assert torch.allclose(anchors, encoder.embed_text(["low hum"]))


def test_query_similarity_by_hand():
    emb = torch.tensor([[1.0, 0.0], [0.6, 0.8]])  # [G=2, D]
    q = torch.tensor([[0.0, 1.0]])
    batch = RewardBatch(torch.zeros(2, 10), torch.zeros(1, 10), estimate_embeddings=emb, queries=q)
    assert torch.allclose(query_similarity_reward(batch), torch.tensor([0.0, 0.8]))


def test_si_sdr_reward_by_hand(sources):
    target, other = sources
    # remove the mean so the residual's energy ratio is exactly the SI-SDR
    target = target - target.mean()
    noise = torch.randn(target.shape[0], generator=torch.Generator().manual_seed(0))
    noise = noise - noise.mean()
    noise = noise - (noise @ target) / (target @ target) * target  # orthogonal to the target
    noise = noise * (target.norm() / noise.norm()) * 10 ** (-10 / 20)  # 10 dB below the target
    estimates = torch.stack([target, 3.0 * target, target + noise, torch.zeros_like(target)])
    reward = si_sdr_reward(RewardBatch(estimates, target[None], targets=target[None]), cap_db=30.0)
    assert reward[0].item() == pytest.approx(1.0) and reward[1].item() == pytest.approx(1.0)  # scale-invariant, capped
    assert reward[2].item() == pytest.approx(10.0 / 30.0, abs=1e-4)
    assert reward[3].item() == pytest.approx(-1.0)  # silence: the floor


def test_energy_guard_by_hand(sources):
    target, other = sources
    mixture = target + other
    # a masked estimate never holds more energy than the mixture (up to STFT inconsistency),
    # and a true source only where it cancels against the other one: the guard is about zero
    from marsctl.audio import Spectrogram

    spectrogram = Spectrogram(SIGNAL)
    spec = spectrogram.stft(mixture)
    mask = torch.rand(spec.shape, generator=torch.Generator().manual_seed(0))
    masked = spectrogram.istft(mask * spec, mixture.shape[0])
    guard = energy_guard_reward(RewardBatch(torch.stack([masked, target, 0.5 * mixture]), mixture[None], SIGNAL))
    assert (guard <= 0).all() and (guard > -1e-3).all(), guard
    # y = 2x holds 4 |X|^2 in every bin: excess = (4 - 1) sum|X|^2 / sum|X|^2 = 3
    guard = energy_guard_reward(RewardBatch((2 * mixture)[None], mixture[None], SIGNAL))
    assert guard.item() == pytest.approx(-3.0, rel=1e-4)
    # target + residual must add up to the mixture: an error e costs ||e||^2 / ||x||^2
    error = 0.1 * mixture
    guard = energy_guard_reward(RewardBatch(target[None], mixture[None], SIGNAL, residuals=(other + error)[None]))
    assert guard.item() == pytest.approx(-0.01, abs=5e-4)  # (+ the tiny excess of the target alone)


def test_weighted_sum_and_every_term_reported(sources):
    target, other = sources
    encoder = _audio_anchor_encoder()
    anchors, _ = anchor_embeddings(encoder, target[None], ["low hum"], SR)
    estimates = torch.stack([target, other])
    batch = RewardBatch(
        estimates, (target + other)[None], SIGNAL, estimate_embeddings=encoder.embed_audio(estimates, SR),
        anchors=anchors, queries=encoder.embed_text(["low hum"]), targets=target[None],
    )
    config = RewardConfig(weights={"semantic_anchor": 2.0, "query_similarity": 0.5, "si_sdr": 0.25, "energy_guard": 1.0})
    total, terms = compute_rewards(reward_functions(config), batch)
    assert set(terms) == {"semantic_anchor", "query_similarity", "si_sdr", "energy_guard"}
    by_hand = 2.0 * terms["semantic_anchor"] + 0.5 * terms["query_similarity"] + 0.25 * terms["si_sdr"] + terms["energy_guard"]
    assert torch.allclose(total, by_hand)
    with pytest.raises(ConfigError):
        RewardConfig(weights={"semantic_anchor": 0.0, "query_similarity": 0.0, "si_sdr": 0.0, "energy_guard": 0.0})


def test_all_pass_and_noise_score_below_the_true_target(sources):
    """The hacking guard: under the default weights, returning the whole mixture (all-pass
    mask) or noise as loud as the mixture scores below the true target."""
    target, other = sources
    mixture = target + other
    encoder = _audio_anchor_encoder()
    anchors, _ = anchor_embeddings(encoder, target[None], ["low hum"], SR)
    noise = torch.randn(mixture.shape[0], generator=torch.Generator().manual_seed(1)) * mixture.std()
    estimates = torch.stack([target, mixture, noise, mixture + noise])
    batch = RewardBatch(
        estimates, mixture[None], SIGNAL, estimate_embeddings=encoder.embed_audio(estimates, SR),
        anchors=anchors, queries=encoder.embed_text(["low hum"]), targets=target[None],
    )
    total, terms = compute_rewards(reward_functions(RewardConfig()), batch)
    assert total[0] > total[1] and total[0] > total[2] and total[0] > total[3], (total, terms)
    assert terms["energy_guard"][2] < -0.1 and terms["energy_guard"][3] < -0.1  # noise adds energy the mixture lacks
    assert terms["energy_guard"][1].item() == pytest.approx(0.0, abs=1e-4)  # all-pass is consistent ...
    assert terms["si_sdr"][1] < terms["si_sdr"][0] - 0.5  # ... but far from the target


class _CountingEncoder(LabelTestEncoder):
    """The test encoder, counting its audio passes (to check when the reward encoder runs)."""

    def __init__(self):
        super().__init__(embedding_dim=16)
        self.audio_calls = 0

    def embed_audio(self, waveforms, sample_rate, *, differentiable=False):
        self.audio_calls += 1
        return super().embed_audio(waveforms, sample_rate, differentiable=differentiable)


def test_reward_model_computes_weighted_terms_and_logs_the_rest_on_request(sources):
    from marsctl.rl.rollout import RewardModel

    target, other = sources
    mixture = (target + other)[None]
    estimates = torch.stack([target, other, mixture[0]])[:, None]  # [G=3, B=1, T]
    signal_only = RewardConfig(weights={"semantic_anchor": 0.0, "si_sdr": 1.0, "energy_guard": 1.0})
    encoder = _CountingEncoder()
    model = RewardModel(encoder, reward_functions(signal_only), SIGNAL, same_space_as_queries=False)
    total, terms, source = model.score(estimates, mixture, ["low hum"], targets=target[None])
    # training step: only the weighted terms, and no reward-encoder pass (no weighted term reads it)
    assert set(terms) == {"si_sdr", "energy_guard"} and encoder.audio_calls == 0 and source is None
    assert torch.allclose(total, terms["si_sdr"] + terms["energy_guard"])
    assert total[0, 0] > total[1, 0] and total[0, 0] > total[2, 0]  # the target beats the other source and the mixture
    total_all, terms_all, _ = model.score(estimates, mixture, ["low hum"], targets=target[None], all_terms=True)
    assert set(terms_all) == {"semantic_anchor", "query_similarity", "si_sdr", "energy_guard"} and encoder.audio_calls == 1
    assert torch.allclose(total_all, total)  # weight-0 terms are logged, not added
    # without a known target the SI-SDR term is skipped
    _, unlabeled, _ = model.score(estimates, mixture, ["low hum"], all_terms=True)
    assert "si_sdr" not in unlabeled and "semantic_anchor" in unlabeled


def test_segment_rewards_score_where_the_error_is(sources):
    """K = 4 segments: an estimate spoiled only in its last quarter loses SI-SDR and energy-guard
    reward there only; whole-clip terms are broadcast; K = 1 is the clip's SI-SDR."""
    from marsctl.metrics.separation import segmental_si_sdr, si_sdr

    target, other = sources
    mixture = target + other
    spoiled = target.clone()
    quarter = len(target) // 4
    spoiled[-quarter:] += 2.0 * other[-quarter:]  # louder than the mixture there: excess energy too
    estimates = torch.stack([target + 0.01 * other, spoiled])
    assert torch.allclose(segmental_si_sdr(target, estimates, 1)[..., 0], si_sdr(target, estimates))
    encoder = _audio_anchor_encoder()
    anchors, _ = anchor_embeddings(encoder, target[None], ["low hum"], SR)
    batch = RewardBatch(estimates, mixture[None], SIGNAL, estimate_embeddings=encoder.embed_audio(estimates, SR), anchors=anchors,
                        queries=encoder.embed_text(["low hum"]), targets=target[None], segments=4)
    total, terms = compute_rewards(reward_functions(RewardConfig(segments=4)), batch)
    assert total.shape == (2, 4) and all(v.shape == (2, 4) for v in terms.values())
    sdr = terms["si_sdr"]
    assert (sdr[1, :3] > sdr[1, 3] + 0.3).all()  # the spoiled segment scores far below the clean ones
    guard = -terms["energy_guard"][1]  # the frames next to the boundary (window 1024) see a little of it
    assert guard[:2].max() < 2e-3 and guard[3] > 5 * guard[2], guard
    assert torch.equal(terms["semantic_anchor"][:, 0], terms["semantic_anchor"][:, 3])  # broadcast
    with pytest.raises(ConfigError, match="segments"):
        RewardConfig(segments=0)


def test_differentiable_scoring_keeps_the_graph_and_names_a_term_without_one(sources):
    """The pathwise estimator scores with gradients: si_sdr and energy_guard carry them back to the
    estimates; a weighted term computed without gradients (an encoder's embedding) is named."""
    from marsctl.errors import MarsctlError
    from marsctl.rl.rollout import RewardModel

    target, other = sources
    mixture = (target + other)[None]
    estimates = (0.7 * mixture + 0.3 * target[None])[None].clone().requires_grad_(True)  # [G=1, B=1, T]
    signal_only = RewardConfig(weights={"semantic_anchor": 0.0, "si_sdr": 1.0, "energy_guard": 1.0})
    model = RewardModel(_CountingEncoder(), reward_functions(signal_only), SIGNAL, same_space_as_queries=False)
    total, _, _ = model.score(estimates, mixture, ["low hum"], targets=target[None], differentiable=True)
    (grad,) = torch.autograd.grad(total.sum(), estimates)
    assert grad.abs().sum() > 0
    # moving the estimate along the gradient raises the reward
    stepped, _, _ = model.score((estimates + 1e-3 * grad / grad.norm()).detach(), mixture, ["low hum"], targets=target[None])
    assert float(stepped.sum()) > float(total.sum())
    semantic = RewardConfig(weights={"semantic_anchor": 1.0, "si_sdr": 1.0})

    class NoGradEncoder(_CountingEncoder):
        def embed_audio(self, waveforms, sample_rate, *, differentiable=False):
            with torch.no_grad():
                return super().embed_audio(waveforms, sample_rate, differentiable=differentiable)

    model = RewardModel(NoGradEncoder(), reward_functions(semantic), SIGNAL, same_space_as_queries=False)
    with pytest.raises(MarsctlError, match="'semantic_anchor' is not differentiable"):
        model.score(estimates, mixture, ["low hum"], targets=target[None], differentiable=True)


def test_query_contrast_scores_the_estimate_against_what_the_mask_leaves_out(sources):
    """query_contrast = cos(phi_a(y), q) - cos(phi_a(x - y), q): by hand (the all-pass mask's residual is
    silence); the target scores above zero and the other source below; gradients reach the estimates;
    it needs no reference, so a plain folder may use it."""
    from marsctl.rl.folder_data import check_reference_free
    from marsctl.rl.rollout import RewardModel

    target, other = sources
    mixture = (target + other)[None]
    encoder = _CountingEncoder()
    q = encoder.embed_audio(target[None], SR)  # a query in the audio space: the target's own embedding
    encoder.audio_calls = 0
    weights = {"semantic_anchor": 0.0, "si_sdr": 0.0, "energy_guard": 0.0, "query_contrast": 1.0}
    model = RewardModel(encoder, reward_functions(RewardConfig(weights=weights)), SIGNAL, same_space_as_queries=True)
    estimates = torch.stack([target, other, mixture[0]])[:, None]  # [G=3, B=1, T]
    total, terms, _ = model.score(estimates, mixture, ["low hum"], queries=q)
    assert set(terms) == {"query_contrast"} and encoder.audio_calls == 1  # estimates and residuals in one pass
    cos = lambda wave: float((encoder.embed_audio(wave[None], SR) * q).sum())  # noqa: E731
    by_hand = [cos(target) - cos(other), cos(other) - cos(target), cos(mixture[0]) - cos(torch.zeros_like(target))]
    assert total[:, 0].tolist() == pytest.approx(by_hand, abs=1e-5)
    assert total[0, 0] > 0 > total[1, 0]  # the target scores above zero, the other source below

    partial = (0.7 * mixture + 0.3 * target[None])[None].clone().requires_grad_(True)
    scored, _, _ = model.score(partial, mixture, ["low hum"], queries=q, differentiable=True)
    (grad,) = torch.autograd.grad(scored.sum(), partial)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    check_reference_free(RewardConfig(weights={**weights, "semantic_anchor": 0.0}))  # allowed on a folder: no error
