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

But it barely ever clips: for masks drawn from pi_old, E[rho] = 1 in every bin, so the mean of
~10^4 per-bin ratios stays within a few percent of 1 however far pi_theta moves (measured: with
``--ppo-epochs 4`` the per-bin KL to pi_old reached 0.18 in one rollout with a clip fraction of 0).
``surrogate: per_bin`` therefore clips each bin's ratio before averaging, as token-level PPO
does for language models (one advantage per sequence, one clipped ratio per token)::

    L_clip(per_bin) = -mean_{g,b} mean_{f,t} min(rho A, clip(rho, 1 - eps, 1 + eps) A)

Segment advantages (``A`` of shape ``[G, B, K]``, one per consecutive time segment; see
``marsctl.rl.rewards``) credit each bin with its own segment's advantage: per_bin uses
``A_{g,b,k(t)}`` for the bins of frame t; bin_mean averages the ratios within each segment
and clips those ``r_{g,b,k}``. K = 1 is the formula above.

Both have the same value and gradient at sampling time (rho = 1, the only epoch when
``--ppo-epochs 1``); they differ from the second epoch on, where per_bin is a real trust region.

Diagnostics (:func:`ratio_diagnostics`, CleanRL's) are returned beside the loss: the clip
fraction (of the samples, or segments, whose bin-averaged ratio lies outside 1 +- eps for
bin_mean; of the bins for per_bin), the ratio range, and two estimates of the *same* KL,
KL(pi_old || pi_theta): ``kl_old_new`` in closed form per bin and ``kl_old_new_k3``, CleanRL's
k3 estimate on the sampled masks. ``kl_ref`` is the penalty's KL(pi_theta || pi_ref). The
pathwise loss has no ratio, so it reports none of the ratio diagnostics.
"""

from __future__ import annotations

import dataclasses

import torch

from marsctl.metrics.separation import segment_index, segment_sums
from marsctl.models.policy import BetaMaskPolicy

DEFAULT_CLIP_EPS = 0.2
DEFAULT_ENTROPY_COEF = 0.1
DEFAULT_KL_COEF = 0.01
#: "bin_mean": clip the bin-averaged ratio (the paper); "per_bin": clip every bin's ratio, then average
SURROGATES = ("per_bin", "bin_mean")


@dataclasses.dataclass
class PolicyLoss:
    loss: torch.Tensor
    surrogate: torch.Tensor
    entropy: torch.Tensor
    kl_ref: torch.Tensor
    #: diagnostics as 0-d tensors on the loss's device, no graph (the trainer copies them to the host
    #: together, on logged steps); empty when not asked for
    tensors: dict[str, torch.Tensor]

    @property
    def stats(self) -> dict[str, float]:
        """The diagnostics as floats (one host sync each)."""
        return {k: float(v) for k, v in self.tensors.items()}


def bin_averaged_ratio(new_log_prob: torch.Tensor, old_log_prob: torch.Tensor, bin_dims: int = 2, segments: int | None = None) -> torch.Tensor:
    """r = mean over the last ``bin_dims`` axes (f, t) of exp(log pi_theta - log pi_old), per bin first.

    With ``segments`` K: one mean per consecutive segment of the last (frame) axis, ``[..., K]``."""
    rho = torch.exp(new_log_prob - old_log_prob)  # rho_{g,b,f,t}
    if segments is None:
        return rho.mean(dim=tuple(range(-bin_dims, 0)))  # r_{g,b} = mean_{f,t} rho
    frame_sums = rho.sum(dim=tuple(range(-bin_dims, -1))) if bin_dims > 1 else rho  # sum_f rho, [..., T]
    bins_per_segment = segment_sums(rho.new_ones(rho.shape[-1]), segments) * rho.shape[-bin_dims:-1].numel()  # F x frames in k
    return segment_sums(frame_sums, segments) / bins_per_segment  # r_{..., k} = mean over segment k's bins


def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, clip_eps: float = DEFAULT_CLIP_EPS) -> torch.Tensor:
    """-mean(min(r A, clip(r, 1 - eps, 1 + eps) A)) over every (g, b)."""
    unclipped = ratio * advantages  # r A
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages  # clip(r, 1-eps, 1+eps) A
    return -torch.minimum(unclipped, clipped).mean()  # L_clip


def per_bin_clipped_surrogate(rho: torch.Tensor, advantages: torch.Tensor, clip_eps: float = DEFAULT_CLIP_EPS) -> torch.Tensor:
    """-mean_{g,b,f,t} min(rho A, clip(rho, 1 - eps, 1 + eps) A): per-bin ratios ``rho`` ``[G, B, ...]``,
    advantages ``A`` ``[G, B]`` (one per sample, broadcast over the bins) or any shape that
    broadcasts against ``rho`` once padded with trailing axes (e.g. ``[G, B, 1, T]`` per frame)."""
    advantages = advantages.reshape(*advantages.shape, *([1] * (rho.ndim - advantages.ndim)))
    unclipped = rho * advantages  # rho A
    clipped = torch.clamp(rho, 1.0 - clip_eps, 1.0 + clip_eps) * advantages  # clip(rho, 1-eps, 1+eps) A
    return -torch.minimum(unclipped, clipped).mean()  # L_clip(per_bin)


def policy_entropy(policy: BetaMaskPolicy, entropy_coef: float) -> torch.Tensor:
    """H(pi_theta), the mean per bin; outside the graph when lambda_H = 0 (logged only: its backward
    through lgamma and digamma would cost time for a zero gradient)."""
    if entropy_coef != 0:
        return policy.entropy().mean()
    with torch.no_grad():
        return policy.entropy().mean()


def pathwise_loss(
    policy: BetaMaskPolicy,
    reference: BetaMaskPolicy | None,
    rewards: torch.Tensor,
    entropy_coef: float = DEFAULT_ENTROPY_COEF,
    kl_coef: float = DEFAULT_KL_COEF,
    stats: bool = True,
) -> PolicyLoss:
    """The pathwise (reparameterized) objective: rewards ``[G, ...]`` of masks drawn with
    :meth:`BetaMaskPolicy.rsample` carry the graph back to theta, so no ratio or advantage is needed::

        L = -mean_{g,b} R(M_g(theta)) - lambda_H H(pi_theta) + lambda_KL KL(pi_theta || pi_ref)

    Same expected objective as the surrogate (E_{M ~ pi_theta} R), another gradient estimator.
    No ratio, so no clip fraction or ratio diagnostics. ``stats=False`` (unlogged steps) returns none."""
    mean_reward = rewards.mean()
    entropy = policy_entropy(policy, entropy_coef)  # H(pi_theta), mean per bin
    kl_ref = policy.kl_divergence(reference).mean() if reference is not None else torch.zeros((), device=rewards.device)
    loss = -mean_reward - entropy_coef * entropy + kl_coef * kl_ref  # L = -mean R - lambda_H H + lambda_KL KL_ref
    diagnostics = _loss_stats(loss, -mean_reward, entropy, kl_ref) if stats else {}
    return PolicyLoss(loss=loss, surrogate=-mean_reward, entropy=entropy, kl_ref=kl_ref, tensors=diagnostics)


def _loss_stats(loss: torch.Tensor, surrogate: torch.Tensor, entropy: torch.Tensor, kl_ref: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"loss": loss.detach(), "surrogate": surrogate.detach(), "entropy": entropy.detach(), "kl_ref": kl_ref.detach()}


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
    surrogate: str = "bin_mean",
    stats: bool = True,
) -> PolicyLoss:
    """The loss of the module docstring (``surrogate``: "bin_mean", the paper's, or "per_bin").

    ``policy``/``old_policy``/``reference`` have per-bin shape ``[B, F, T]``; ``masks`` are the
    ``[G, B, F, T]`` samples drawn from ``old_policy``; ``advantages`` are ``[G, B]``, or
    ``[G, B, K]`` for K consecutive segments of the frame axis T.
    ``old_log_prob`` (``[G, B, F, T]``) may be passed to skip recomputing it every epoch.
    ``stats=False`` (unlogged steps) skips the diagnostics: no closed-form KL to pi_old, no ratio range.
    """
    if masks.ndim != policy.probs.ndim + 1 or advantages.shape[:2] != masks.shape[:2] or advantages.ndim not in (2, 3):
        raise ValueError(f"expected masks [G, *policy shape] and advantages [G, B] or [G, B, K]; got {tuple(masks.shape)} and {tuple(advantages.shape)}")
    bin_dims = policy.probs.ndim - 1
    new_log_prob = policy.log_prob(masks)  # log pi_theta(M)
    if old_log_prob is None:
        old_log_prob = old_policy.detach().log_prob(masks)  # log pi_old(M), fixed at sampling time
    old_log_prob = old_log_prob.detach()
    advantages = advantages.detach().float()
    if surrogate not in SURROGATES:
        raise ValueError(f"surrogate must be one of {', '.join(SURROGATES)}, got {surrogate!r}")
    segments = advantages.shape[-1] if advantages.ndim == 3 else None  # segment advantages A_{g,b,k}
    # r = mean_{f,t} rho (or r_{g,b,k}: the mean over segment k's bins)
    ratio = bin_averaged_ratio(new_log_prob, old_log_prob, bin_dims, segments)
    if surrogate == "bin_mean":
        clipped_term = clipped_surrogate(ratio, advantages, clip_eps)  # -mean min(r A, clip(r) A)
    else:
        rho = torch.exp(new_log_prob - old_log_prob)  # rho_{g,b,f,t}
        if segments is not None:  # A_{g,b,k(t)} for the bins of frame t, broadcast over f
            advantages = advantages[..., segment_index(masks.shape[-1], segments, masks.device)].unsqueeze(-2)
        clipped_term = per_bin_clipped_surrogate(rho, advantages, clip_eps)  # -mean min(rho A, clip(rho) A)
    entropy = policy_entropy(policy, entropy_coef)  # H(pi_theta), mean per bin
    kl_ref = policy.kl_divergence(reference).mean() if reference is not None else torch.zeros((), device=masks.device)
    loss = clipped_term - entropy_coef * entropy + kl_coef * kl_ref  # L = L_clip - lambda_H H + lambda_KL KL_ref

    diagnostics = {} if not stats else {
        **_loss_stats(loss, clipped_term, entropy, kl_ref),
        **ratio_statistics(policy, old_policy, new_log_prob, old_log_prob, clip_eps, surrogate, segments),
    }
    return PolicyLoss(loss=loss, surrogate=clipped_term, entropy=entropy, kl_ref=kl_ref, tensors=diagnostics)


def ratio_diagnostics(*args, **kwargs) -> dict[str, float]:
    """:func:`ratio_statistics` as floats."""
    return {k: float(v) for k, v in ratio_statistics(*args, **kwargs).items()}


@torch.no_grad()
def ratio_statistics(
    policy: BetaMaskPolicy,
    old_policy: BetaMaskPolicy,
    new_log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    clip_eps: float = DEFAULT_CLIP_EPS,
    surrogate: str = "bin_mean",
    segments: int | None = None,
) -> dict[str, torch.Tensor]:
    """How far pi_theta is from pi_old on the sampled masks (log-probabilities ``[G, B, F, T]``), as 0-d tensors.

    ``clip_fraction``: the share of what the surrogate clips whose ratio lies outside 1 +- eps (the
    bin-averaged ratios r of each sample, or segment, for bin_mean; every bin's rho for per_bin);
    ``ratio_min``/``ratio_max`` of the bin-averaged ratios; ``kl_old_new`` = KL(pi_old || pi_theta) in
    closed form and ``kl_old_new_k3`` its k3 estimate on the samples (CleanRL's approx_kl), both per bin."""
    bin_dims = policy.probs.ndim - 1
    log_rho = new_log_prob.detach() - old_log_prob.detach()  # log rho_{g,b,f,t}
    ratio = bin_averaged_ratio(new_log_prob.detach(), old_log_prob.detach(), bin_dims, segments)  # r
    clipped = ratio if surrogate == "bin_mean" else torch.exp(log_rho)
    return {
        "clip_fraction": ((clipped - 1.0).abs() > clip_eps).float().mean(),
        "ratio_min": ratio.min(),
        "ratio_max": ratio.max(),
        "kl_old_new": old_policy.detach().kl_divergence(policy.detach()).mean(),  # KL(pi_old || pi_theta)
        "kl_old_new_k3": ((torch.exp(log_rho) - 1) - log_rho).mean(),  # E_old[(rho - 1) - log rho]
    }
