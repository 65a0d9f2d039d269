"""The Beta mask policy and query fusion, checked against torch.distributions and by hand."""

import math

import pytest
import torch
from torch.distributions import Beta, kl_divergence

from marsctl.models.policy import BetaMaskPolicy
from marsctl.models.query import compose, fuse, negative_query, normalize, query_mixup_weights


@pytest.fixture
def probs():
    g = torch.Generator().manual_seed(0)
    return torch.rand(3, 7, 5, generator=g) * 0.98 + 0.01


@pytest.mark.parametrize("kappa", [9.0, 2.5])
def test_parameters_mode_mean(probs, kappa):
    policy = BetaMaskPolicy(probs, kappa)
    torch.testing.assert_close(policy.alpha, 1 + kappa * probs)
    torch.testing.assert_close(policy.beta, 1 + kappa * (1 - probs))
    ref = Beta(policy.alpha, policy.beta)
    torch.testing.assert_close(policy.mean, ref.mean)
    torch.testing.assert_close(policy.variance, ref.variance)
    # the mode is P exactly (bit for bit), and it is where the density peaks
    assert torch.equal(policy.mode, probs)
    near = torch.stack([probs - 1e-3, probs, probs + 1e-3])
    assert (policy.log_prob(near).argmax(0) == 1).all()


@pytest.mark.parametrize("kappa", [9.0, 2.5])
def test_log_prob_entropy_kl_match_torch(probs, kappa):
    policy = BetaMaskPolicy(probs, kappa)
    ref = Beta(policy.alpha, policy.beta)
    masks = torch.rand(4, *probs.shape, generator=torch.Generator().manual_seed(1)) * 0.98 + 0.01
    torch.testing.assert_close(policy.log_prob(masks), ref.log_prob(masks), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(policy.entropy(), ref.entropy(), rtol=1e-5, atol=1e-5)
    other = BetaMaskPolicy(probs.flip(0), kappa)
    torch.testing.assert_close(
        policy.kl_divergence(other), kl_divergence(ref, Beta(other.alpha, other.beta)), rtol=1e-4, atol=1e-5
    )
    assert torch.allclose(policy.kl_divergence(policy), torch.zeros_like(probs), atol=1e-5)
    assert (policy.kl_divergence(other) >= -1e-6).all()


def test_kappa_nine_hand_values():
    # P = 0.5, kappa = 9: Beta(5.5, 5.5); mean 0.5; var = 5.5^2 / (11^2 * 12) = 1/48
    policy = BetaMaskPolicy(torch.tensor([0.5]), 9.0)
    assert policy.mean.item() == pytest.approx(0.5)
    assert policy.variance.item() == pytest.approx(1 / 48)
    # log density at 0.5: 9 ln 0.5 - ln B(5.5, 5.5)
    log_b = 2 * math.lgamma(5.5) - math.lgamma(11.0)
    assert policy.log_prob(torch.tensor([0.5])).item() == pytest.approx(9 * math.log(0.5) - log_b, rel=1e-5)


def test_log_prob_finite_at_edges(probs):
    policy = BetaMaskPolicy(probs)
    edges = torch.stack([torch.zeros_like(probs), torch.ones_like(probs)])
    assert torch.isfinite(policy.log_prob(edges)).all()


def test_sample_statistics_and_decode():
    probs = torch.full((20000,), 0.3)
    policy = BetaMaskPolicy(probs, 9.0)
    torch.manual_seed(0)
    draws = policy.sample()
    assert draws.shape == probs.shape and (draws >= 0).all() and (draws <= 1).all()
    assert draws.mean().item() == pytest.approx(policy.mean[0].item(), abs=0.005)
    assert draws.var().item() == pytest.approx(policy.variance[0].item(), rel=0.05)
    assert policy.sample(3).shape == (3, 20000)
    assert torch.equal(policy.decode("mode"), probs)
    torch.testing.assert_close(policy.decode("mean"), policy.mean)
    with pytest.raises(ValueError):
        policy.decode("best")


def test_gradients_flow_into_probs(probs):
    logits = torch.logit(probs).requires_grad_()
    policy = BetaMaskPolicy.from_logits(logits)
    masks = policy.sample(2)
    ref = BetaMaskPolicy(torch.full_like(probs, 0.5))
    loss = policy.log_prob(masks).mean() + policy.entropy().mean() + policy.kl_divergence(ref).mean()
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert policy.detach().probs.grad_fn is None


def test_fuse_and_mixup():
    g = torch.Generator().manual_seed(0)
    text, audio, image = (normalize(torch.randn(4, 8, generator=g)) for _ in range(3))
    fused = fuse({"text": text, "audio": audio})
    torch.testing.assert_close(fused, normalize(text + audio))
    torch.testing.assert_close(fuse({"text": text}), text)
    weights = query_mixup_weights(4, ["text", "audio", "image"], generator=g)
    total = sum(weights.values())
    torch.testing.assert_close(total, torch.ones(4))
    assert all((w >= 0).all() for w in weights.values())
    mixed = fuse({"text": text, "audio": audio, "image": image}, weights)
    for i in range(4):
        expected = sum(weights[m][i] * e[i] for m, e in (("text", text), ("audio", audio), ("image", image)))
        torch.testing.assert_close(mixed[i], normalize(expected))
    with pytest.raises(ValueError):
        fuse({"smell": text})


def test_compose_and_negative():
    a = torch.tensor([1.0, 0.0, 0.0])
    b = torch.tensor([0.0, 1.0, 0.0])
    torch.testing.assert_close(compose(torch.stack([a, b])), normalize(a + b))
    torch.testing.assert_close(compose(torch.stack([a, b]), [3.0, 1.0]), normalize(3 * a + b))
    q = normalize(torch.tensor([1.0, 1.0, 0.0]))
    steered = negative_query(q, b, strength=0.5)
    torch.testing.assert_close(steered, normalize(1.5 * q - 0.5 * b))
    assert torch.dot(steered, b) < torch.dot(q, b)
    torch.testing.assert_close(negative_query(q, b, 0.0), q)
