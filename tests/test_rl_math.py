"""RL math: group-relative advantages, the clipped surrogate (value and gradient), policy loss."""

from __future__ import annotations

import math

import pytest
import torch

from marsctl.models.policy import BetaMaskPolicy
from marsctl.rl.advantages import MovingAverageBaseline, group_relative_advantages
from marsctl.rl.losses import bin_averaged_ratio, clipped_surrogate, per_bin_clipped_surrogate, policy_loss


def test_group_normalization_by_hand():
    rewards = torch.tensor([[1.0, 2.0], [3.0, 2.0], [5.0, 8.0]])  # [G=3, B=2]
    adv = group_relative_advantages(rewards, eps=0.0)
    # column 0: mean 3, unbiased std 2 -> (-1, 0, 1); column 1: mean 4, std sqrt(12) -> (-2, -2, 4)/sqrt(12)
    assert torch.allclose(adv[:, 0], torch.tensor([-1.0, 0.0, 1.0]))
    assert torch.allclose(adv[:, 1], torch.tensor([-2.0, -2.0, 4.0]) / math.sqrt(12))
    # each group is centred and unit-spread whatever its reward scale and offset
    scaled = group_relative_advantages(100 * rewards + 7, eps=0.0)
    assert torch.allclose(scaled, adv, atol=1e-5)
    # eps keeps a constant group finite (all zeros)
    assert torch.equal(group_relative_advantages(torch.ones(4, 3)), torch.zeros(4, 3))
    with pytest.raises(ValueError):
        group_relative_advantages(torch.ones(1, 3))


def test_moving_average_baseline_by_hand():
    baseline = MovingAverageBaseline(beta=0.92)
    first = torch.tensor([[1.0], [3.0]])  # mean 2, std sqrt(2)
    adv = baseline.advantages(first, eps=0.0)
    # b_0 = mean of the first batch = 2, so the first advantages equal the group-relative ones
    assert torch.allclose(adv, torch.tensor([[-1.0], [1.0]]) / math.sqrt(2))
    assert baseline.value == pytest.approx(2.0)  # 0.92 * 2 + 0.08 * 2
    second = torch.tensor([[4.0], [6.0]])  # mean 5, std sqrt(2): centred on b = 2, not on 5
    adv = baseline.advantages(second, eps=0.0)
    assert torch.allclose(adv, torch.tensor([[2.0], [4.0]]) / math.sqrt(2))
    assert baseline.value == pytest.approx(0.92 * 2 + 0.08 * 5)
    restored = MovingAverageBaseline()
    restored.load_state_dict(baseline.state_dict())
    assert restored.value == baseline.value


@pytest.mark.parametrize(
    "ratio, advantage, loss, grad",
    [
        (1.1, 1.0, -1.1, -1.0),  # inside the clip range: plain r A, gradient -A
        (1.5, 1.0, -1.2, 0.0),  # r > 1 + eps with A > 0: clipped, no gradient
        (0.5, 1.0, -0.5, -1.0),  # r < 1 - eps with A > 0: the unclipped term is smaller, kept
        (0.5, -1.0, 0.8, 0.0),  # r < 1 - eps with A < 0: clipped at 0.8, no gradient
        (1.5, -1.0, 1.5, 1.0),  # r > 1 + eps with A < 0: pessimistic unclipped term, gradient -A
        (0.9, -2.0, 1.8, 2.0),  # inside, negative advantage
    ],
)
def test_clipped_surrogate_value_and_gradient(ratio, advantage, loss, grad):
    r = torch.tensor([ratio], requires_grad=True)
    value = clipped_surrogate(r, torch.tensor([advantage]), clip_eps=0.2)
    value.backward()
    assert value.item() == pytest.approx(loss)
    assert r.grad.item() == pytest.approx(grad)


def test_surrogate_averages_over_samples():
    r = torch.tensor([1.1, 1.5, 0.5, 1.5], requires_grad=True)
    a = torch.tensor([1.0, 1.0, -1.0, -1.0])
    value = clipped_surrogate(r, a, 0.2)
    value.backward()
    assert value.item() == pytest.approx((-1.1 - 1.2 + 0.8 + 1.5) / 4, abs=1e-6)
    assert torch.allclose(r.grad, torch.tensor([-1.0, 0.0, 0.0, 1.0]) / 4)


def test_per_bin_surrogate_clips_each_bin_by_hand():
    """Per-bin ratios (2, 1, 0.5, 0.5) of one sample: their mean is exactly 1 (nothing clipped for
    bin_mean) while per_bin clips three of the four bins."""
    rho = torch.tensor([[[[2.0, 1.0], [0.5, 0.5]]]], requires_grad=True)  # [G=1, B=1, F=2, T=2]
    positive = per_bin_clipped_surrogate(rho, torch.tensor([[1.0]]), clip_eps=0.2)
    # A = +1: min(rho, clip(rho)) = (1.2, 1, 0.5, 0.5); gradient -1/4 where the unclipped term is kept
    assert positive.item() == pytest.approx(-(1.2 + 1.0 + 0.5 + 0.5) / 4)
    (grad,) = torch.autograd.grad(positive, rho)
    assert torch.allclose(grad, torch.tensor([[[[0.0, -1.0], [-1.0, -1.0]]]]) / 4)
    negative = per_bin_clipped_surrogate(rho, torch.tensor([[-2.0]]), clip_eps=0.2)
    # A = -2: min(-2 rho, -2 clip(rho)) = (-4, -2, -1.6, -1.6); the 0.5-bins are clipped (no gradient)
    assert negative.item() == pytest.approx((4.0 + 2.0 + 1.6 + 1.6) / 4)
    (grad,) = torch.autograd.grad(negative, rho)
    assert torch.allclose(grad, torch.tensor([[[[2.0, 2.0], [0.0, 0.0]]]]) / 4)
    assert clipped_surrogate(rho.mean(dim=(-2, -1)), torch.tensor([[1.0]]), 0.2).item() == pytest.approx(-1.0)


def test_per_bin_and_bin_mean_agree_at_sampling_time_and_differ_after():
    torch.manual_seed(1)
    old_p = torch.rand(2, 8, 6) * 0.8 + 0.1
    old = BetaMaskPolicy(old_p, 9.0)
    masks, adv = old.sample(4), torch.randn(4, 2)
    same = old_p.clone().requires_grad_(True)
    grads = {}
    for surrogate in ("bin_mean", "per_bin"):
        out = policy_loss(BetaMaskPolicy(same, 9.0), old, None, masks, adv, entropy_coef=0.0, kl_coef=0.0, surrogate=surrogate)
        grads[surrogate] = torch.autograd.grad(out.loss, same)[0]
        assert out.stats["clip_fraction"] == 0.0
    assert torch.allclose(grads["bin_mean"], grads["per_bin"], atol=1e-6)
    moved = BetaMaskPolicy((old_p + 0.3 * torch.randn_like(old_p)).clamp(0.02, 0.98), 9.0)
    stats = {s: policy_loss(moved, old, None, masks, adv, entropy_coef=0.0, kl_coef=0.0, surrogate=s).stats for s in ("bin_mean", "per_bin")}
    assert stats["per_bin"]["clip_fraction"] > 0.3  # most bins moved beyond 1 +- 0.2
    assert stats["per_bin"]["loss"] != pytest.approx(stats["bin_mean"]["loss"])
    with pytest.raises(ValueError, match="surrogate"):
        policy_loss(moved, old, None, masks, adv, surrogate="joint")


def test_bin_averaged_ratio_by_hand():
    new = torch.log(torch.tensor([[[[2.0, 1.0], [0.5, 0.5]]]]))  # [G=1, B=1, F=2, T=2]
    old = torch.zeros_like(new)
    assert bin_averaged_ratio(new, old).item() == pytest.approx((2 + 1 + 0.5 + 0.5) / 4)


def _dlogp_dp(m: float, p: float, kappa: float) -> float:
    """d/dP log Beta(m; 1 + kP, 1 + k(1 - P)) = k [ln m - ln(1 - m) - psi(alpha) + psi(beta)]."""
    a, b = torch.tensor(1 + kappa * p), torch.tensor(1 + kappa * (1 - p))
    return kappa * (math.log(m) - math.log(1 - m) - float(torch.digamma(a)) + float(torch.digamma(b)))


def test_policy_loss_gradient_matches_hand_formula_at_sampling_time():
    """At sampling time (pi = pi_old) r = 1, nothing is clipped and
    dL_clip/dP = -(1/G) sum_g A_g dlog pi(M_g)/dP (one bin, one mixture)."""
    kappa, p0 = 9.0, 0.3
    probs = torch.tensor([[[p0]]], requires_grad=True)  # [B=1, F=1, T=1]
    policy = BetaMaskPolicy(probs, kappa)
    masks = torch.tensor([0.2, 0.7]).view(2, 1, 1, 1)  # G = 2
    adv = torch.tensor([[1.0], [-1.0]])
    out = policy_loss(policy, policy.detach(), None, masks, adv, clip_eps=0.2, entropy_coef=0.0, kl_coef=0.0)
    out.loss.backward()
    expected = -(1.0 * _dlogp_dp(0.2, p0, kappa) - 1.0 * _dlogp_dp(0.7, p0, kappa)) / 2
    assert probs.grad.item() == pytest.approx(expected, rel=1e-5)
    assert out.stats["ratio_min"] == pytest.approx(1.0) and out.stats["ratio_max"] == pytest.approx(1.0)
    assert out.stats["clip_fraction"] == 0.0 and out.stats["kl_old_new_k3"] == pytest.approx(0.0, abs=1e-7)


def test_policy_loss_terms_against_torch_distributions():
    torch.manual_seed(0)
    kappa = 9.0
    old_p = torch.rand(3, 4, 5) * 0.8 + 0.1
    ref_p = torch.rand(3, 4, 5) * 0.8 + 0.1
    new_p = (old_p + 0.05 * torch.randn_like(old_p)).clamp(0.05, 0.95).requires_grad_(True)
    new, old, ref = BetaMaskPolicy(new_p, kappa), BetaMaskPolicy(old_p, kappa), BetaMaskPolicy(ref_p, kappa)
    masks = old.sample(6)  # [G=6, B=3, F=4, T=5]
    adv = torch.randn(6, 3)
    out = policy_loss(new, old, ref, masks, adv, clip_eps=0.2, entropy_coef=0.1, kl_coef=0.01)

    def beta(p):
        return torch.distributions.Beta(1 + kappa * p, 1 + kappa * (1 - p))

    m = masks.clamp(1e-6, 1 - 1e-6)
    ratio = torch.exp(beta(new_p).log_prob(m) - beta(old_p).log_prob(m)).mean(dim=(-2, -1))
    surrogate = -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv).mean()
    entropy = beta(new_p).entropy().mean()
    kl = torch.distributions.kl_divergence(beta(new_p), beta(ref_p)).mean()
    expected = surrogate - 0.1 * entropy + 0.01 * kl
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-5)
    grad_ours = torch.autograd.grad(out.loss, new_p, retain_graph=True)[0]
    grad_ref = torch.autograd.grad(expected, new_p)[0]
    assert torch.allclose(grad_ours, grad_ref, rtol=1e-3, atol=1e-6)
    assert out.stats["clip_fraction"] == pytest.approx(float(((ratio - 1).abs() > 0.2).float().mean()))
    assert out.stats["ratio_min"] == pytest.approx(float(ratio.detach().min()), rel=1e-5)
    assert out.stats["kl_ref"] == pytest.approx(float(kl.detach()), rel=1e-4)


def test_entropy_bonus_and_kl_penalty_push_the_right_way():
    """-lambda_H H pushes P toward 1/2 (max entropy); +lambda_KL KL pulls P toward the reference."""
    probs = torch.tensor([[[0.9]]], requires_grad=True)
    policy = BetaMaskPolicy(probs)
    masks = torch.full((2, 1, 1, 1), 0.5)
    zero_adv = torch.zeros(2, 1)
    policy_loss(policy, policy.detach(), None, masks, zero_adv, entropy_coef=1.0, kl_coef=0.0).loss.backward()
    assert probs.grad.item() > 0  # gradient descent lowers P from 0.9 toward 0.5
    probs.grad = None
    policy = BetaMaskPolicy(probs)
    ref = BetaMaskPolicy(torch.tensor([[[0.99]]]))
    policy_loss(policy, policy.detach(), ref, masks, zero_adv, entropy_coef=0.0, kl_coef=1.0).loss.backward()
    assert probs.grad.item() < 0  # descent raises P toward the reference's 0.99


def test_segment_advantages_credit_each_frame_with_its_segment():
    """Advantages [G, B, K]: per_bin weighs frame t's bins by A_{k(t)}; bin_mean clips per-segment
    mean ratios. K = 1 is the whole-clip loss."""
    from marsctl.rl.losses import per_bin_clipped_surrogate

    torch.manual_seed(2)
    old_p = torch.rand(2, 3, 8) * 0.8 + 0.1  # [B=2, F=3, T=8 frames]
    old = BetaMaskPolicy(old_p, 9.0)
    masks = old.sample(4)
    new = BetaMaskPolicy((old_p + 0.2 * torch.randn_like(old_p)).clamp(0.05, 0.95), 9.0)
    rho = torch.exp(new.log_prob(masks) - old.log_prob(masks))
    adv = torch.randn(4, 2, 2)  # K = 2: frames 0-3 and 4-7
    per_frame = torch.cat([adv[..., :1].expand(4, 2, 4), adv[..., 1:].expand(4, 2, 4)], dim=-1).unsqueeze(-2)
    out = policy_loss(new, old, None, masks, adv, entropy_coef=0.0, kl_coef=0.0, surrogate="per_bin")
    assert out.stats["surrogate"] == pytest.approx(per_bin_clipped_surrogate(rho, per_frame, 0.2).item(), rel=1e-5)
    out = policy_loss(new, old, None, masks, adv, entropy_coef=0.0, kl_coef=0.0, surrogate="bin_mean")
    seg_ratio = torch.stack([rho[..., :4].mean(dim=(-2, -1)), rho[..., 4:].mean(dim=(-2, -1))], dim=-1)
    assert out.stats["surrogate"] == pytest.approx(clipped_surrogate(seg_ratio, adv, 0.2).item(), rel=1e-5)
    one = policy_loss(new, old, None, masks, adv[..., :1], entropy_coef=0.0, kl_coef=0.0)
    whole = policy_loss(new, old, None, masks, adv[..., 0], entropy_coef=0.0, kl_coef=0.0)
    assert one.stats["surrogate"] == pytest.approx(whole.stats["surrogate"], rel=1e-6)
    # group normalization runs per (mixture, segment)
    norm = group_relative_advantages(torch.randn(4, 2, 2) * 5 + 3)
    assert torch.allclose(norm.mean(0), torch.zeros(2, 2), atol=1e-5) and torch.allclose(norm.std(0), torch.ones(2, 2), atol=1e-3)


def test_rsample_is_a_differentiable_draw_from_the_policy():
    torch.manual_seed(0)
    probs = torch.tensor([0.1, 0.5, 0.9], requires_grad=True)
    policy = BetaMaskPolicy(probs, kappa=9.0)
    draws = policy.rsample(20000)
    assert draws.shape == (20000, 3) and bool(((draws > 0) & (draws < 1)).all())
    assert torch.allclose(draws.mean(0), policy.mean.detach(), atol=0.01)  # (1 + kappa P) / (2 + kappa)
    draws.sum().backward()
    assert probs.grad is not None and bool((probs.grad > 0).all())  # a larger P moves every draw up


def test_rsample_matches_the_beta_distribution_and_its_gradient_at_the_rl_concentration():
    """The Gamma-ratio draw of rsample against torch.distributions.Beta at kappa 200 (the RL recipes'),
    from the balanced to the most skewed bins: the same mean, variance and quantiles, and the
    gradient of E[(M - c)^2] in P equal to the closed form's (unbiased). Its spread per draw is wider
    than torch's Beta.rsample's in skewed bins (the Gamma ratio's gradient is not conditioned on M:
    1.5x at P = 0.1, measured) and never more than 1.7x."""
    torch.manual_seed(0)
    probs = torch.tensor([0.005, 0.1, 0.5, 0.9, 0.995], requires_grad=True)
    policy = BetaMaskPolicy(probs, kappa=200.0)
    draws = policy.rsample(200000)
    reference = torch.distributions.Beta(policy.alpha.detach(), policy.beta.detach()).sample(torch.Size([200000]))
    assert torch.allclose(draws.mean(0), policy.mean.detach(), rtol=2e-3, atol=1e-4)
    assert torch.allclose(draws.var(0), policy.variance.detach(), rtol=0.02)
    quantiles = torch.tensor([0.05, 0.5, 0.95])
    assert torch.allclose(torch.quantile(draws.detach(), quantiles, dim=0), torch.quantile(reference, quantiles, dim=0), rtol=0.01, atol=1e-3)

    c = 0.3
    expected = (policy.variance + (policy.mean - c).square()).sum()  # sum over bins of E[(M - c)^2]
    (exact,) = torch.autograd.grad(expected, probs)
    per_draw = lambda m: (m - c).square()
    fresh = lambda: BetaMaskPolicy(probs, kappa=200.0)  # a new graph from probs for every gradient
    (ours,) = torch.autograd.grad(per_draw(fresh().rsample(200000)).mean(0).sum(), probs)
    assert torch.allclose(ours, exact, rtol=0.02, atol=1e-5), (ours, exact)
    spread = {}
    for name, sampler in (("ours", lambda: fresh().rsample(1)[0]),
                          ("torch", lambda: (lambda p: torch.distributions.Beta(p.alpha, p.beta).rsample())(fresh()))):
        grads = torch.stack([torch.autograd.grad(per_draw(sampler()).sum(), probs)[0] for _ in range(2000)])
        spread[name] = grads.std(0)
    assert bool((spread["ours"] <= 1.7 * spread["torch"] + 1e-7).all()), spread


def test_pathwise_loss_value_and_gradient_match_the_expected_reward():
    """R(M) = -(M - c)^2 per bin: E[R] = -(Var + (mean - c)^2) in closed form. The pathwise loss
    -mean R over many reparameterized draws matches it, and so does its gradient in P."""
    from marsctl.rl.losses import pathwise_loss

    torch.manual_seed(0)
    c = torch.tensor([0.2, 0.7, 0.95])
    probs = torch.tensor([0.3, 0.5, 0.8], requires_grad=True)
    policy = BetaMaskPolicy(probs, kappa=9.0)
    reference = BetaMaskPolicy(torch.tensor([0.4, 0.5, 0.6]), kappa=9.0)
    rewards = -(policy.rsample(200000) - c).square()  # [G, 3]: the bins play the role of B here
    out = pathwise_loss(policy, reference, rewards, entropy_coef=0.1, kl_coef=0.01)
    expected_reward = -(policy.variance + (policy.mean - c).square())
    expected = -expected_reward.mean() - 0.1 * policy.entropy().mean() + 0.01 * policy.kl_divergence(reference).mean()
    assert float(out.loss.detach()) == pytest.approx(float(expected.detach()), abs=2e-4)
    (grad,) = torch.autograd.grad(out.loss, probs, retain_graph=True)
    (expected_grad,) = torch.autograd.grad(expected, probs)
    assert torch.allclose(grad, expected_grad, atol=2e-3), (grad, expected_grad)
    assert "clip_fraction" not in out.stats and out.stats["surrogate"] == pytest.approx(-float(rewards.mean()))  # no ratio to clip


def test_entropy_is_logged_outside_the_graph_when_its_weight_is_zero():
    """entropy_coef 0: the logged entropy has the same value but no graph (no backward through lgamma and
    digamma for a zero gradient); the loss's gradient is the same as with the entropy in the graph."""
    from marsctl.rl.losses import pathwise_loss

    probs = torch.tensor([0.2, 0.6, 0.9], requires_grad=True)
    reference = BetaMaskPolicy(torch.tensor([0.3, 0.5, 0.7]), kappa=200.0)
    make_rewards = lambda: -(BetaMaskPolicy(probs, kappa=200.0).mean - 0.5).square()[None]  # a fresh graph each time
    out = pathwise_loss(BetaMaskPolicy(probs, kappa=200.0), reference, make_rewards(), entropy_coef=0.0, kl_coef=0.1)
    assert not out.entropy.requires_grad
    assert float(out.entropy) == pytest.approx(float(BetaMaskPolicy(probs, kappa=200.0).entropy().mean()))
    (grad,) = torch.autograd.grad(out.loss, probs)
    policy = BetaMaskPolicy(probs, kappa=200.0)
    expected = -make_rewards().mean() - 0.0 * policy.entropy().mean() + 0.1 * policy.kl_divergence(reference).mean()
    (expected_grad,) = torch.autograd.grad(expected, probs)
    assert torch.allclose(grad, expected_grad)
    assert pathwise_loss(BetaMaskPolicy(probs, kappa=200.0), None, make_rewards(), entropy_coef=0.1).entropy.requires_grad
