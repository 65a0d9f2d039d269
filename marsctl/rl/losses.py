"""The MARS-Sep policy loss: a PPO clipped surrogate on bin-averaged ratios, entropy, KL to the reference.

For a group of ``G`` masks ``M_g`` sampled from the old policy (snapshotted at sampling
time) for each of ``B`` mixtures, with advantages ``A_{g,b}``::

    rho_{g,b,f,t} = pi_theta(M_{g,b,f,t}) / pi_old(M_{g,b,f,t})         per-bin probability ratio
    r_{g,b}       = mean_{f,t} rho_{g,b,f,t}                           ratios averaged over bins
    L_clip        = -mean_{g,b} min(r A, clip(r, 1 - eps, 1 + eps) A)
    H             = mean_{b,f,t} H(pi_theta)                           Beta entropy per bin
    KL_ref        = mean_{b,f,t} KL(pi_theta || pi_ref)                closed-form Beta KL per bin
    L             = L_clip - lambda_H H + lambda_KL KL_ref

Averaging the per-bin ratios (instead of multiplying them, i.e. the joint ratio over
~10^4 bins) keeps ``r`` on the scale where the clip range 1 +- eps means something.
Diagnostics are returned beside the loss (CleanRL's clip fraction and approximate KL).
"""

from __future__ import annotations

import dataclasses

import torch

from marsctl.models.policy import BetaMaskPolicy

DEFAULT_CLIP_EPS = 0.2
DEFAULT_ENTROPY_COEF = 0.1
DEFAULT_KL_COEF = 0.01


@dataclasses.dataclass
class PolicyLoss:
    loss: torch.Tensor
    surrogate: torch.Tensor
    entropy: torch.Tensor
    kl_ref: torch.Tensor
    #: diagnostics (floats, no graph)
    stats: dict[str, float]


def bin_averaged_ratio(new_log_prob: torch.Tensor, old_log_prob: torch.Tensor, bin_dims: int = 2) -> torch.Tensor:
    """r = mean over the last ``bin_dims`` axes (f, t) of exp(log pi_theta - log pi_old), per bin first."""
    rho = torch.exp(new_log_prob - old_log_prob)  # rho_{g,b,f,t}
    return rho.mean(dim=tuple(range(-bin_dims, 0)))  # r_{g,b} = mean_{f,t} rho


def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, clip_eps: float = DEFAULT_CLIP_EPS) -> torch.Tensor:
    """-mean(min(r A, clip(r, 1 - eps, 1 + eps) A)) over every (g, b)."""
    unclipped = ratio * advantages  # r A
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages  # clip(r, 1-eps, 1+eps) A
    return -torch.minimum(unclipped, clipped).mean()  # L_clip


def policy_loss(
    policy: BetaMaskPolicy,
    old_policy: BetaMaskPolicy,
    reference: BetaMaskPolicy | None,
    masks: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float = DEFAULT_CLIP_EPS,
    entropy_coef: float = DEFAULT_ENTROPY_COEF,
    kl_coef: float = DEFAULT_KL_COEF,
    old_log_prob: torch.Tensor | None = None,
) -> PolicyLoss:
    """The loss of the module docstring.

    ``policy``/``old_policy``/``reference`` have per-bin shape ``[B, F, T]``; ``masks`` are the
    ``[G, B, F, T]`` samples drawn from ``old_policy``; ``advantages`` are ``[G, B]``.
    ``old_log_prob`` (``[G, B, F, T]``) may be passed to skip recomputing it every epoch.
    """
    if masks.ndim != policy.probs.ndim + 1 or advantages.shape != masks.shape[:2]:
        raise ValueError(f"expected masks [G, *policy shape] and advantages [G, B]; got {tuple(masks.shape)} and {tuple(advantages.shape)}")
    bin_dims = policy.probs.ndim - 1
    new_log_prob = policy.log_prob(masks)  # log pi_theta(M)
    if old_log_prob is None:
        old_log_prob = old_policy.detach().log_prob(masks)  # log pi_old(M), fixed at sampling time
    old_log_prob = old_log_prob.detach()
    advantages = advantages.detach().float()
    ratio = bin_averaged_ratio(new_log_prob, old_log_prob, bin_dims)  # r = mean_{f,t} rho
    surrogate = clipped_surrogate(ratio, advantages, clip_eps)  # -mean min(r A, clip(r) A)
    entropy = policy.entropy().mean()  # H(pi_theta), mean per bin
    kl_ref = policy.kl_divergence(reference).mean() if reference is not None else torch.zeros((), device=masks.device)
    loss = surrogate - entropy_coef * entropy + kl_coef * kl_ref  # L = L_clip - lambda_H H + lambda_KL KL_ref

    with torch.no_grad():
        log_rho = new_log_prob.detach() - old_log_prob
        stats = {
            "loss": float(loss),
            "surrogate": float(surrogate),
            "entropy": float(entropy),
            "kl_ref": float(kl_ref),
            # CleanRL's k3 estimator of KL(old || new) on the sampled masks, per bin
            "approx_kl_old": float(((torch.exp(log_rho) - 1) - log_rho).mean()),
            # closed form, per bin
            "kl_old": float(policy.detach().kl_divergence(old_policy.detach()).mean()),
            "clip_fraction": float(((ratio.detach() - 1.0).abs() > clip_eps).float().mean()),
            "ratio_min": float(ratio.detach().min()),
            "ratio_max": float(ratio.detach().max()),
        }
    return PolicyLoss(loss=loss, surrogate=surrogate, entropy=entropy, kl_ref=kl_ref, stats=stats)
