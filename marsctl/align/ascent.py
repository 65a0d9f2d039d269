"""Reward ascent: what climbing a semantic reward does to separation, and an objective that makes it help.

Pathwise RL moves a separator's masks along the gradient of the reward. An encoder can retrieve
well and still give a reward whose gradient points away from the target (it likes a caricature of
the class more than the source itself). Here, with masks made from known targets (no separator
needed), on the STFT of :class:`marsctl.audio.Spectrogram` at the alignment rate:

    M0   = clamp(|S| / (|S| + |I|) + beta (1 - |S| / (|S| + |I|)) + sigma n, 0, 1)   a partial separation
    y0   = iSTFT(M0 X)                                  leakage beta, mask noise sigma
    g    = dr(y0) / dM0                                  r = cos(phi_a(y), q) + cos(phi_a(y), z*)
    y1   = iSTFT(clamp(M0 + d g / rms(g), 0, 1) X)        one step up the reward

- :func:`ascent_report` (held-out metric): the SI-SDR change from y0 to y1 (dB; positive = climbing
  the reward separates better), for the text reward and for the anchor reward.
- :func:`ascent_agreement_loss` (stage-1 term ``ascent_agreement_weight``): ``1 - cos(g, g_S)`` with
  ``g_S = dSI-SDR(s, y0) / dM0``, the gradient itself trained (double backward) to point where SI-SDR rises.
- :func:`ascent_ranking_loss` (stage-1 term ``ascent_ranking_weight``): over the candidates
  {s, y0, y1, x} of each training target, a pairwise logistic loss that asks every reward to order
  them as their SI-SDR does, ``softplus(-scale (r_i - r_j))`` for SI-SDR_i > SI-SDR_j + margin:
  the reward learns that its own ascent step is worse when it lowers SI-SDR (and better when it
  raises it), the target above its partial separations, and those above the mixture.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from marsctl.audio import Spectrogram
from marsctl.metrics.separation import si_sdr

#: SI-SDR given to the clean target itself (finite, above any estimate)
CLEAN_SI_SDR_DB = 60.0


@dataclasses.dataclass(frozen=True)
class AscentSettings:
    #: leakage beta of the partial separations, drawn uniformly from this range
    leakage: tuple[float, float] = (0.0, 0.6)
    #: std of the Gaussian noise added to their masks
    mask_noise: float = 0.1
    #: step sizes d (rms change per mask bin) of the reward-ascent candidate, drawn uniformly
    step: tuple[float, float] = (0.01, 0.05)
    #: pairs closer than this in SI-SDR (dB) are not ranked
    margin_db: float = 0.5


def partial_separation_masks(targets: torch.Tensor, interference: torch.Tensor, spectrogram: Spectrogram,
                             leakage: torch.Tensor, mask_noise: float, gen: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M0 [B, F, frames], X [B, F, frames])`` for targets and interference ``[B, T]`` (mixture = their sum)."""
    s, i = spectrogram.stft(targets), spectrogram.stft(interference)
    ratio = s.abs() / (s.abs() + i.abs() + 1e-8)
    mask = ratio + leakage.view(-1, 1, 1) * (1 - ratio)
    if mask_noise > 0:
        mask = mask + mask_noise * torch.randn(mask.shape, generator=gen).to(mask.device)
    return mask.clamp(0, 1), s + i


def drawn_partial_separations(targets: torch.Tensor, interference: torch.Tensor, spectrogram: Spectrogram,
                              settings: AscentSettings, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`partial_separation_masks` with each row's leakage drawn from ``settings.leakage``."""
    low, high = settings.leakage
    leakage = low + (high - low) * torch.rand(len(targets), generator=gen)
    return partial_separation_masks(targets, interference, spectrogram, leakage.to(targets.device), settings.mask_noise, gen)


def reward_scores(encoder, estimates: torch.Tensor, text: torch.Tensor, anchor: torch.Tensor | None,
                  sample_rate: int, differentiable: bool = False) -> dict[str, torch.Tensor]:
    """``{"text": cos(phi_a(y), q), "anchor": cos(phi_a(y), z*)}`` per row of ``estimates [B, T]``."""
    embedding = encoder.embed_audio(estimates, sample_rate, differentiable=differentiable)
    scores = {"text": F.cosine_similarity(embedding, text, dim=-1)}
    if anchor is not None:
        scores["anchor"] = F.cosine_similarity(embedding, anchor, dim=-1)
    return scores


def ascent_step(encoder, mask: torch.Tensor, mixture_stft: torch.Tensor, spectrogram: Spectrogram, length: int,
                text: torch.Tensor, anchor: torch.Tensor | None, step: torch.Tensor, sample_rate: int,
                reward: str | None = None) -> torch.Tensor:
    """``clamp(M0 + d g / rms(g), 0, 1)`` with ``g`` the gradient of the reward (``reward``: one of
    "text"/"anchor", None = their sum) in the mask; detached."""
    with torch.enable_grad():
        mask = mask.detach().requires_grad_(True)
        estimates = spectrogram.istft(mask * mixture_stft, length)
        scores = reward_scores(encoder, estimates, text.detach(), None if anchor is None else anchor.detach(), sample_rate,
                               differentiable=True)
        total = sum(scores.values()) if reward is None else scores[reward]
        (gradient,) = torch.autograd.grad(total.sum(), mask)
    rms = gradient.pow(2).mean(dim=(-2, -1), keepdim=True).sqrt() + 1e-12
    return (mask + step.view(-1, 1, 1) * gradient / rms).clamp(0, 1).detach()


def ascent_ranking_loss(encoder, targets: torch.Tensor, interference: torch.Tensor, text: torch.Tensor,
                        anchor: torch.Tensor | None, scale: torch.Tensor, sample_rate: int, settings: AscentSettings,
                        gen: torch.Generator) -> torch.Tensor:
    """The pairwise ranking loss of the module docstring, averaged over ranked pairs and rewards."""
    spectrogram = Spectrogram().to(targets.device)
    batch, length = targets.shape
    mask, mixture_stft = drawn_partial_separations(targets, interference, spectrogram, settings, gen)
    step = settings.step[0] + (settings.step[1] - settings.step[0]) * torch.rand(batch, generator=gen)
    climbed = ascent_step(encoder, mask, mixture_stft, spectrogram, length, text, anchor, step.to(targets.device), sample_rate)
    with torch.no_grad():
        partial = spectrogram.istft(mask * mixture_stft, length)
        after = spectrogram.istft(climbed * mixture_stft, length)
    mixtures = targets + interference
    candidates = torch.stack([targets, partial, after, mixtures], dim=1)  # [B, 4, T]
    quality = si_sdr(targets[:, None].expand_as(candidates), candidates).float()
    quality[:, 0] = CLEAN_SI_SDR_DB
    quality = torch.nan_to_num(quality, nan=-CLEAN_SI_SDR_DB, posinf=CLEAN_SI_SDR_DB, neginf=-CLEAN_SI_SDR_DB)
    count = candidates.shape[1]
    expand = lambda e: None if e is None else e[:, None].expand(batch, count, -1).reshape(batch * count, -1)  # noqa: E731
    scores = reward_scores(encoder, candidates.reshape(batch * count, length), expand(text), expand(anchor), sample_rate)
    losses = [pairwise_ranking_loss(r.view(batch, count), quality, scale, settings.margin_db) for r in scores.values()]
    return torch.stack(losses).mean()


def ascent_agreement_loss(encoder, targets: torch.Tensor, interference: torch.Tensor, text: torch.Tensor,
                          anchor: torch.Tensor | None, sample_rate: int, settings: AscentSettings,
                          gen: torch.Generator) -> torch.Tensor:
    """1 - cos(g_r, g_S) per partial separation, averaged over rows and rewards: the reward's gradient in
    the mask (kept as a function of the encoder's weights: double backward) should point where the
    SI-SDR's gradient does."""
    spectrogram = Spectrogram().to(targets.device)
    batch, length = targets.shape
    mask, mixture_stft = drawn_partial_separations(targets, interference, spectrogram, settings, gen)
    mask = mask.detach().requires_grad_(True)
    with torch.enable_grad():
        estimates = spectrogram.istft(mask * mixture_stft, length)
        (oracle,) = torch.autograd.grad(si_sdr(targets, estimates).sum(), mask, retain_graph=True)  # g_S
        scores = reward_scores(encoder, estimates, text, anchor, sample_rate, differentiable=True)
        losses = []
        for reward in scores.values():
            (gradient,) = torch.autograd.grad(reward.sum(), mask, create_graph=True)  # g_r(theta)
            losses.append(1 - F.cosine_similarity(gradient.flatten(1), oracle.detach().flatten(1).to(gradient.dtype), dim=1).mean())
    return torch.stack(losses).mean()


def pairwise_ranking_loss(scores: torch.Tensor, quality: torch.Tensor, scale: torch.Tensor | float, margin: float) -> torch.Tensor:
    """mean over pairs (i, j) of a row with quality_i > quality_j + margin of softplus(-scale (s_i - s_j));
    ``scores`` and ``quality`` ``[B, C]``; 0 when no pair qualifies."""
    better = (quality[:, :, None] - quality[:, None, :]) > margin  # [B, i, j]: i should score above j
    if not better.any():
        return scores.sum() * 0
    return F.softplus(-scale * (scores[:, :, None] - scores[:, None, :]))[better].mean()


@torch.no_grad()
def ascent_report(encoder, targets: list[torch.Tensor], mixtures: list[torch.Tensor], text: torch.Tensor,
                  anchor: torch.Tensor | None, sample_rate: int, seed: int, leakage: float = 0.3, step: float = 0.03,
                  ) -> dict[str, float]:
    """Held-out ascent: for each (target, mixture) pair, the partial separation with ``leakage`` and
    seeded mask noise, one step ``step`` up each reward, and the SI-SDR change (dB): mean and SE per reward
    (``ascent_si_sdr_text``, ``ascent_si_sdr_anchor``), and the share of pairs where it is positive."""
    settings = AscentSettings()
    spectrogram = Spectrogram().to(encoder.device)
    gen = torch.Generator().manual_seed(seed)
    changes: dict[str, list[float]] = {}
    for index, (target, mixture) in enumerate(zip(targets, mixtures)):
        target, mixture = target[None].to(encoder.device), mixture[None].to(encoder.device)
        mask, mixture_stft = partial_separation_masks(target, mixture - target, spectrogram,
                                                      torch.full((1,), leakage, device=target.device), settings.mask_noise, gen)
        before = si_sdr(target, spectrogram.istft(mask * mixture_stft, target.shape[-1]))
        for reward in ("text", "anchor") if anchor is not None else ("text",):
            climbed = ascent_step(encoder, mask, mixture_stft, spectrogram, target.shape[-1], text[index : index + 1],
                                  None if anchor is None else anchor[index : index + 1], torch.full((1,), step, device=target.device),
                                  sample_rate, reward=reward)
            after = si_sdr(target, spectrogram.istft(climbed * mixture_stft, target.shape[-1]))
            changes.setdefault(reward, []).append(float(after - before))
    out: dict[str, float] = {}
    for reward, values in changes.items():
        data = torch.tensor(values, dtype=torch.float64)
        out[f"ascent_si_sdr_{reward}"] = float(data.mean())
        out[f"ascent_si_sdr_{reward}_se"] = float(data.std() / len(data) ** 0.5) if len(data) > 1 else float("nan")
        out[f"ascent_positive_{reward}"] = float((data > 0).double().mean())
    return out
