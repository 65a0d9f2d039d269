"""The RL defects found in review (issue 15, item 6), each by hand on small tensors."""

from __future__ import annotations

import pytest
import torch

from marsctl.models.policy import BetaMaskPolicy
from marsctl.rl.advantages import MovingAverageBaseline
from marsctl.rl.losses import policy_loss, ratio_diagnostics
from marsctl.train.loop import step_seed


def test_moving_average_advantages_are_scaled_by_the_batch_spread():
    """An easy group (all G rewards equal) far from the baseline: dividing by its own spread
    (std 0 + eps) made advantages of thousands; the batch's spread keeps them of order 1."""
    baseline = MovingAverageBaseline(beta=0.92, value=0.2)
    rewards = torch.tensor([[0.9, 0.1], [0.9, 0.3], [0.9, 0.5], [0.9, 0.7]])  # [G=4, B=2]; group 0 is easy
    advantages = baseline.advantages(rewards, eps=1e-4)
    assert torch.allclose(advantages, (rewards - 0.2) / (rewards.std() + 1e-4))
    assert advantages.abs().max() < 3.0, advantages


def test_per_rank_seeds_never_collide():
    """Rank r's mask-sampling seed used to be rank r+1's query/target seed."""
    for world_size in (1, 2, 4, 8):
        seeds = [step_seed(7, step, rank, stream, world_size) for step in range(1, 300) for rank in range(world_size) for stream in (0, 1)]
        assert len(set(seeds)) == len(seeds), world_size
    assert step_seed(0, 5, 0, 1, 2) != step_seed(0, 5, 1, 0, 2)


def test_logged_kls_point_the_same_way():
    """kl_old_new (closed form) and kl_old_new_k3 (sampled) both estimate KL(pi_old || pi_theta)."""
    torch.manual_seed(0)
    old = BetaMaskPolicy(torch.full((1, 1, 1), 0.5), kappa=9.0)
    new = BetaMaskPolicy(torch.full((1, 1, 1), 0.8), kappa=9.0)
    masks = old.sample(1_000_000)  # [G, B=1, F=1, T=1]
    stats = ratio_diagnostics(new, old, new.log_prob(masks), old.log_prob(masks))
    forward = float(old.kl_divergence(new).mean())  # KL(old || new)
    backward = float(new.kl_divergence(old).mean())  # KL(new || old)
    assert backward > 1.1 * forward  # the two directions differ here (1.53 and 1.71 nats)
    assert stats["kl_old_new"] == pytest.approx(forward, rel=1e-6)
    assert stats["kl_old_new_k3"] == pytest.approx(forward, rel=0.03)
    assert abs(stats["kl_old_new_k3"] - forward) < abs(stats["kl_old_new_k3"] - backward)


def test_clip_fraction_counts_the_clipped_bin_averaged_ratios():
    """bin_mean clips the bin-averaged ratio r of each sample: with few bins a moved policy takes
    some r outside 1 +- eps, and the clip fraction is that share (not a constant)."""
    torch.manual_seed(3)
    old = BetaMaskPolicy(torch.rand(2, 2, 2) * 0.6 + 0.2, kappa=9.0)
    new = BetaMaskPolicy((old.probs + 0.3 * torch.randn(2, 2, 2)).clamp(0.05, 0.95), kappa=9.0)
    masks, advantages = old.sample(16), torch.randn(16, 2)
    out = policy_loss(new, old, None, masks, advantages, clip_eps=0.2, entropy_coef=0.0, kl_coef=0.0, surrogate="bin_mean")
    ratio = torch.exp(new.log_prob(masks) - old.log_prob(masks)).mean(dim=(-2, -1))  # [G, B]
    expected = float(((ratio - 1).abs() > 0.2).float().mean())
    assert 0 < expected < 1 and out.stats["clip_fraction"] == pytest.approx(expected)


def test_default_estimator_is_pathwise_and_the_paper_recipe_keeps_its_own():
    from pathlib import Path

    from marsctl.rl.config import RLConfig, load_rl_config

    assert RLConfig().estimator == "pathwise"
    assert load_rl_config(Path(__file__).parents[1] / "recipes" / "train" / "rl.yaml").estimator == "score_function"
