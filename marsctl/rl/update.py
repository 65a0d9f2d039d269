"""One RL step of MARS-Sep on B mixtures (arXiv 2510.10509, Sec. 3), one equation per line.

``score_function`` (the paper's estimator)::

    z = f_theta(x_b, q_b)                                 ONE forward pass per mixture
    pi_theta: alpha = 1 + kappa sigmoid(z), beta = 1 + kappa (1 - sigmoid(z))
    pi_old = stop_grad(pi_theta)                          snapshotted at sampling time
    M_{g,b} ~ pi_old, R_{g,b} = sum_i w_i r_i(y_{g,b})    the rollout (marsctl.rl.rollout)
    A_{g,b} = (R - mean_g R) / (std_g R + eps)            or the moving-average baseline
    repeat K times (the first epoch reuses the sampling pass):
        L = -mean min(r A, clip(r, 1 +- eps) A) - lambda_H H(pi_theta) + lambda_KL KL(pi_theta || pi_ref)
        theta <- AdamW(theta, clip(grad L, max_norm))
    r_after = mean_{f,t} pi_theta'(M) / pi_old(M)          diagnostics of the updated policy (one more
                                                          forward pass, no gradient, on logged steps): clip fraction, KL

``pathwise`` (an extension: the same objective E_{M ~ pi_theta}[R(M)], another gradient)::

    M_g = rsample(pi_theta)                               G_a / (G_a + G_b), implicit reparameterization
    L = -mean_g R(M_g(theta)) - lambda_H H(pi_theta) + lambda_KL KL(pi_theta || pi_ref)
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import torch

from marsctl.models.policy import BetaMaskPolicy
from marsctl.models.separator import Separator
from marsctl.rl.advantages import MovingAverageBaseline, group_relative_advantages
from marsctl.rl.config import RLConfig
from marsctl.rl.losses import pathwise_loss, policy_loss, ratio_statistics
from marsctl.rl.rollout import PhaseTimer, RewardModel, Rollout, measured, rollout


@dataclasses.dataclass
class UpdateResult:
    samples: Rollout
    advantages: torch.Tensor  # [G, B] (or [G, B, K])
    #: policy-loss diagnostics of each PPO epoch and its grad_norm, 0-d tensors on the device (only
    #: grad_norm when ``diagnostics=False``)
    epoch_stats: list[dict[str, torch.Tensor]]
    #: score_function: the ratio diagnostics of the updated policy on this step's samples (with
    #: --ppo-epochs 1 the epochs' own are at sampling time, where every ratio is 1); pathwise, or
    #: ``diagnostics=False``: none
    after_update: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


def rl_update(
    model: Separator,
    train_model: torch.nn.Module,
    reference: Separator,
    reward_model: RewardModel,
    optimizer: torch.optim.Optimizer,
    config: RLConfig,
    mixture: torch.Tensor,
    query: torch.Tensor,
    target: torch.Tensor | None,
    labels: Sequence[str],
    sample_seed: int,
    device: torch.device,
    use_bf16: bool = False,
    baseline: MovingAverageBaseline | None = None,
    all_reduce_mean: Callable[[float], float] = lambda value: value,
    timer: PhaseTimer | None = None,
    kappa: float | None = None,
    diagnostics: bool = True,
) -> UpdateResult:
    """One RL step on B mixtures (the module docstring, without the LR schedule).

    ``train_model`` is ``model`` or its DDP wrapper; ``kappa`` is the policy's concentration
    (default: the model's); the masks are drawn from a generator seeded by ``sample_seed`` (a pure
    function of the step: exact resume). ``timer`` (benchmarks) records the seconds of each phase.
    ``diagnostics=False`` (the trainer's unlogged steps) skips the statistics: the loss diagnostics
    (``epoch_stats`` hold each epoch's grad_norm only), the score-function estimator's extra forward
    pass after the update (``after_update`` stays empty) and the rollout's synchronized reward timing.
    Nothing here copies a tensor to the host (the moving-average baseline's mean reward aside)."""
    timer = timer or PhaseTimer(device, enabled=False)
    kappa = model.config.kappa if kappa is None else kappa

    with torch.no_grad(), timer("analysis"):
        # X_b and log|X_b|~, once per step: the policy, the reference and the re-forwards of later
        # epochs all read the same mixtures
        mixture_stft, _, log_magnitude = model.analyze(mixture)

    def forward_policy(separator: Separator, forward: torch.nn.Module) -> BetaMaskPolicy:
        # z = f_theta(x, q); pi_theta: alpha = 1 + kappa sigmoid(z), beta = 1 + kappa (1 - sigmoid(z))
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            if forward is separator and separator.config.signal == model.config.signal:  # Separator.forward, analysis done
                logits = separator.logits(separator.features(log_magnitude), query)
            else:  # a DDP wrapper: only its forward() synchronizes the gradients
                logits = forward(mixture, query)
            return BetaMaskPolicy.from_logits(logits, kappa)

    with torch.no_grad(), timer("reference_forward"):
        reference_policy = forward_policy(reference, reference) if config.kl_coef != 0 else None  # pi_ref (none when lambda_KL = 0)
    with timer("policy_forward"):
        policy = forward_policy(model, train_model)  # pi_theta: one forward pass per mixture
    if config.estimator == "pathwise":
        return _pathwise_update(model, train_model, policy, reference_policy, reward_model, optimizer, config, mixture_stft, mixture,
                                query, target, labels, sample_seed, device, timer, forward_policy, diagnostics)

    old_policy = policy.detach()  # pi_old = stop_grad(pi_theta)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(sample_seed)
        samples = rollout(model, old_policy, mixture_stft, mixture, config.group_size, reward_model, labels, query, target, timer,
                          timed=diagnostics or timer.enabled)
    timer.seconds["reward"] = timer.seconds.get("reward", 0.0) + samples.reward_seconds
    rewards = samples.rewards  # R_{g,b} = sum_i w_i r_i(y_{g,b})
    if baseline is None:
        advantages = group_relative_advantages(rewards, config.advantage_eps)  # A = (R - mean_g R) / (std_g R + eps)
    else:
        mean_reward = all_reduce_mean(float(rewards.mean()))
        advantages = baseline.advantages(rewards, config.advantage_eps, mean_reward)  # A = (R - b) / (std_g R + eps)
    old_log_prob = old_policy.log_prob(samples.masks)  # log pi_old(M), fixed for the K epochs
    epoch_stats: list[dict[str, float]] = []
    for epoch in range(config.ppo_epochs):
        with timer("loss_backward_step"):
            if epoch > 0:
                policy = forward_policy(model, train_model)  # pi_theta after the previous epoch's step
            # L = -mean min(r A, clip(r, 1 +- eps) A) - lambda_H H(pi_theta) + lambda_KL KL(pi_theta || pi_ref)
            out = policy_loss(
                policy, old_policy, reference_policy, samples.masks, advantages, config.clip_eps,
                config.entropy_coef, config.kl_coef, old_log_prob=old_log_prob, surrogate=config.surrogate, stats=diagnostics,
            )
            grad_norm = apply_gradient(model, optimizer, out.loss, config.grad_clip_norm)
            epoch_stats.append({**out.tensors, "grad_norm": grad_norm})
    if not diagnostics:
        return UpdateResult(samples=samples, advantages=advantages, epoch_stats=epoch_stats)
    with torch.no_grad(), timer("diagnostics"):
        updated = forward_policy(model, model)  # pi_theta' after the K steps (the bare model: no DDP synchronization)
        segments = advantages.shape[-1] if advantages.ndim == 3 else None
        after = ratio_statistics(updated, old_policy, updated.log_prob(samples.masks), old_log_prob, config.clip_eps, config.surrogate, segments)
    return UpdateResult(samples=samples, advantages=advantages, epoch_stats=epoch_stats, after_update=after)


def apply_gradient(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor, grad_clip_norm: float) -> torch.Tensor:
    """theta <- AdamW(theta, clip(grad L, grad_clip_norm)); returns the gradient norm before clipping (a
    0-d tensor on the parameters' device: no host sync)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)  # clip(grad L, max_norm)
    optimizer.step()  # theta <- AdamW(theta, ...)
    return grad_norm.detach()


def _pathwise_update(model, train_model, policy, reference_policy, reward_model, optimizer, config, mixture_stft, mixture, query,
                     target, labels, sample_seed, device, timer, forward_policy, diagnostics: bool = True) -> UpdateResult:
    """``estimator: pathwise``: fresh on-policy samples each epoch; advantages are computed for the log only."""
    fork = [device] if device.type == "cuda" else []
    mixture_power = mixture_stft.abs().square()  # |X|^2, for the energy guard
    epoch_stats: list[dict[str, float]] = []
    with torch.random.fork_rng(devices=fork):
        torch.manual_seed(sample_seed)  # one stream for the K epochs' masks (a pure function of the step)
        for epoch in range(config.ppo_epochs):
            if epoch > 0:
                with timer("policy_forward"):
                    policy = forward_policy(model, train_model)
            with timer("sample"):
                masks = policy.rsample(config.group_size)  # M_g = g(eps_g; alpha(theta), beta(theta))
            with timer("synthesize"):
                estimates = model.synthesize(masks, mixture_stft, mixture.shape[-1])  # y_g(theta) = iSTFT(warp^-1(M_g) X)
            with timer("reward"), measured(device, diagnostics or timer.enabled) as reward_time:
                rewards, terms, source = reward_model.score(estimates, mixture, labels, query, target, mixture_power, differentiable=True)
            with timer("loss"):
                # L = -mean_g R(M_g(theta)) - lambda_H H(pi_theta) + lambda_KL KL(pi_theta || pi_ref)
                out = pathwise_loss(policy, reference_policy, rewards, config.entropy_coef, config.kl_coef, stats=diagnostics)
            with timer("backward_step"):
                grad_norm = apply_gradient(model, optimizer, out.loss, config.grad_clip_norm)
                epoch_stats.append({**out.tensors, "grad_norm": grad_norm})
            if epoch == 0:
                samples = Rollout(masks=masks.detach(), estimates=estimates.detach(), rewards=rewards.detach(),
                                  terms={k: v.detach() for k, v in terms.items()}, reward_seconds=reward_time.seconds, anchor_source=source)
    return UpdateResult(samples=samples, advantages=group_relative_advantages(samples.rewards, config.advantage_eps), epoch_stats=epoch_stats)
