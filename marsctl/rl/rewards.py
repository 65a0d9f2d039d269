"""Rewards as an open registry of named reward terms (TRL ``reward_funcs`` style), each term logged.

A term is one function of a :class:`RewardBatch` that returns one score per separated
estimate, registered by name with the inputs it reads::

    @reward("si_sdr", needs=("estimates", "targets"))
    def si_sdr_reward(batch): ...

The inputs a term may declare (:data:`REWARD_INPUTS`): the estimates, the mixtures, the
targets, the query embeddings, the anchors z*, the estimates' embeddings and those of the
residuals (x - y_hat); the trainer
computes only what the weighted terms read (no reward-encoder pass when none reads an
embedding). Recipes weigh terms by name, ``rewards: {si_sdr: 1.0, energy_guard: 1.0}`` (or
under ``rewards.weights``); the total is ``R = sum_i w_i r_i`` and every ``r_i`` is reported on
its own (:func:`compute_rewards`). Adding a term takes the function and its registration line.
The terms registered here:

``semantic_anchor`` (MARS-Sep's reward)
    cos(phi_a(y_hat), z*), with ``z*`` the target's anchor: the reward encoder's
    ``anchor_fusion`` of the target's audio, text (and image) embeddings. An encoder
    without an anchor module (never aligned) falls back to the query ``q`` itself; the
    trainer says so in its log (:func:`anchor_embeddings` returns which one was used).
``query_similarity``
    cos(phi_a(y_hat), q) with the query in the reward encoder's space.
``query_contrast`` (reference-free, an extension)
    cos(phi_a(y_hat), q) - cos(phi_a(x - y_hat), q): the estimate should sound like the query
    and what the mask leaves out (the residual) should not, so the query's sound left in the
    residual costs reward twice. Needs no reference; one more reward-encoder pass (the
    residuals are embedded with the estimates, in one batch). An all-pass mask leaves a silent
    residual, scored by whatever ``phi_a(silence)`` is near: the term alone does not keep a
    policy from passing everything.
``si_sdr``
    SI-SDR of the estimate against the known target, clamped to +-``si_sdr_cap_db`` and
    divided by it, so the term lies in [-1, 1] like the cosines (a perfect estimate gives 1).
``energy_guard`` (against reward hacking)
    -(E_excess + E_consistency) with
    ``E_excess = sum_{f,t} max(|Y|^2 - |X|^2, 0) / sum_{f,t} |X|^2`` (an estimate may not hold
    more energy than the mixture in any STFT bin) and
    ``E_consistency = ||x - (y_hat + r)||^2 / ||x||^2`` (target + residual add up to the
    mixture; zero by construction when no separate residual is given, as for masks).
    0 for any honest mask-based estimate, strongly negative for e.g. added noise.

Default weights (:data:`DEFAULT_WEIGHTS`, updated by the recipe's): semantic_anchor 1,
query_similarity 0 (logged only), si_sdr 0.25, energy_guard 1. With these an all-pass mask (y_hat = x) and a noise
estimate score below the true target (tests/test_rl_rewards.py).

Shapes: per-estimate tensors are ``[..., T]`` / ``[..., D]`` (``[G, B, ...]`` in training);
per-mixture tensors (mixtures, targets, anchors, queries) broadcast against them
(``[B, ...]``). Rewards come back with the leading shape ``[...]``.

Segment rewards (``segments = K > 1``, an extension; the paper's reward is K = 1): the signal
terms are scored per consecutive time segment, ``[..., K]`` -- ``si_sdr`` as the segmental
SI-SDR (:func:`marsctl.metrics.separation.segmental_si_sdr`: the clip's scaled target, each
segment's own error) and ``energy_guard`` over each segment's STFT frames -- while the
semantic terms, which judge the whole clip, are broadcast to every segment. The trainer then
normalizes advantages per segment and credits each mask bin with its own segment's advantage,
so that one rollout gives K signals instead of one (see ``marsctl.rl.losses``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from marsctl.audio import Spectrogram
from marsctl.config import SignalConfig
from marsctl.errors import ConfigError
from marsctl.metrics.separation import segment_sums, segmental_si_sdr, si_sdr

#: a small energy floor (silent mixtures do not divide by zero)
ENERGY_FLOOR = 1e-8


@dataclasses.dataclass
class RewardBatch:
    """What reward functions may look at (``None``: not available for this batch)."""

    estimates: torch.Tensor  # y_hat [..., T]
    mixtures: torch.Tensor  # x, broadcastable to estimates
    signal: SignalConfig = dataclasses.field(default_factory=SignalConfig)
    estimate_embeddings: torch.Tensor | None = None  # phi_a(y_hat) [..., D], unit norm
    anchors: torch.Tensor | None = None  # z* [..., D], unit norm
    queries: torch.Tensor | None = None  # q in the reward encoder's space [..., D]
    targets: torch.Tensor | None = None  # ground-truth target as in the mix [..., T]
    residuals: torch.Tensor | None = None  # separately estimated residual [..., T] (None: x - y_hat)
    residual_embeddings: torch.Tensor | None = None  # phi_a(residual) [..., D], unit norm (residual: x - y_hat if not given)
    #: |X|^2 of the mixtures [..., 513, frames], when the caller already has it
    mixture_power: torch.Tensor | None = None
    #: K: score the signal terms per consecutive time segment ([..., K]); 1 = one score per clip
    segments: int = 1
    #: the terms' settings (e.g. si_sdr_cap_db)
    config: "RewardConfig | None" = None


#: what a reward term may read (fields of RewardBatch), declared with ``needs`` when registering it
REWARD_INPUTS = ("estimates", "mixtures", "targets", "queries", "anchors", "estimate_embeddings", "residuals",
                 "residual_embeddings")


@dataclasses.dataclass(frozen=True)
class RewardTerm:
    name: str
    function: Callable[[RewardBatch], torch.Tensor]
    #: the RewardBatch fields it reads (the trainer computes only what the weighted terms read)
    needs: tuple[str, ...]


#: every registered reward term by name
REWARD_TERMS: dict[str, RewardTerm] = {}


def reward(name: str, needs: Sequence[str] = ("estimates",)) -> Callable[[Callable[[RewardBatch], torch.Tensor]], Callable[[RewardBatch], torch.Tensor]]:
    """Register ``function(batch) -> [...]`` scores as the reward term ``name`` reading ``needs``."""
    unknown = [need for need in needs if need not in REWARD_INPUTS]
    if unknown:
        raise ValueError(f"reward {name!r}: unknown input(s) {unknown}; a term may read {', '.join(REWARD_INPUTS)}")

    def register(function: Callable[[RewardBatch], torch.Tensor]) -> Callable[[RewardBatch], torch.Tensor]:
        REWARD_TERMS[name] = RewardTerm(name, function, tuple(needs))
        return function

    return register


def _need(value: torch.Tensor | None, what: str, reward: str) -> torch.Tensor:
    if value is None:
        raise ValueError(f"reward '{reward}' needs {what}")
    return value


@reward("semantic_anchor", needs=("estimate_embeddings", "anchors"))
def semantic_anchor_reward(batch: RewardBatch) -> torch.Tensor:
    """cos(phi_a(y_hat), z*)."""
    emb = _need(batch.estimate_embeddings, "estimate embeddings", "semantic_anchor").float()
    anchors = _need(batch.anchors, "anchors z*", "semantic_anchor").float()
    return F.cosine_similarity(emb, anchors.expand_as(emb), dim=-1)


@reward("query_similarity", needs=("estimate_embeddings", "queries"))
def query_similarity_reward(batch: RewardBatch) -> torch.Tensor:
    """cos(phi_a(y_hat), q)."""
    emb = _need(batch.estimate_embeddings, "estimate embeddings", "query_similarity").float()
    queries = _need(batch.queries, "query embeddings", "query_similarity").float()
    return F.cosine_similarity(emb, queries.expand_as(emb), dim=-1)


@reward("query_contrast", needs=("estimate_embeddings", "residual_embeddings", "queries"))
def query_contrast_reward(batch: RewardBatch) -> torch.Tensor:
    """cos(phi_a(y_hat), q) - cos(phi_a(x - y_hat), q)."""
    emb = _need(batch.estimate_embeddings, "estimate embeddings", "query_contrast").float()
    residual = _need(batch.residual_embeddings, "residual embeddings", "query_contrast").float()
    queries = _need(batch.queries, "query embeddings", "query_contrast").float()
    return F.cosine_similarity(emb, queries.expand_as(emb), dim=-1) - F.cosine_similarity(residual, queries.expand_as(residual), dim=-1)


@reward("si_sdr", needs=("estimates", "targets"))
def si_sdr_reward(batch: RewardBatch, cap_db: float | None = None) -> torch.Tensor:
    """clamp(SI-SDR(target, y_hat), -cap, cap) / cap; an all-zero estimate gets -1. The cap is
    ``cap_db``, else ``batch.config.si_sdr_cap_db``. With ``batch.segments`` K > 1: the segmental
    SI-SDR, ``[..., K]``."""
    if cap_db is None:
        cap_db = batch.config.si_sdr_cap_db if batch.config is not None else DEFAULT_SI_SDR_CAP_DB
    targets = _need(batch.targets, "the known target", "si_sdr")
    estimates = batch.estimates
    if batch.segments > 1:
        value = segmental_si_sdr(targets.expand_as(estimates), estimates, batch.segments)
    else:
        value = si_sdr(targets.expand_as(estimates), estimates)  # float64, inf for a perfect estimate
    value = torch.nan_to_num(value, nan=-cap_db, posinf=cap_db, neginf=-cap_db)
    return (value.clamp(-cap_db, cap_db) / cap_db).float()


@reward("energy_guard", needs=("estimates", "mixtures"))
def energy_guard_reward(batch: RewardBatch) -> torch.Tensor:
    """-(E_excess + E_consistency); see the module docstring. With ``batch.segments`` K > 1,
    per segment of STFT frames (and of samples for the consistency term), ``[..., K]``."""
    spectrogram = Spectrogram(batch.signal).to(batch.estimates.device)
    estimates, mixtures = batch.estimates.float(), batch.mixtures.float()
    with torch.autocast(device_type=estimates.device.type, enabled=False):
        est_power = spectrogram.stft(estimates).abs().square()  # |Y|^2
        mix_power = batch.mixture_power if batch.mixture_power is not None else spectrogram.stft(mixtures).abs().square()  # |X|^2
        k = batch.segments

        def over_time(values: torch.Tensor) -> torch.Tensor:  # sum over the last (frame/sample) axis, per segment when K > 1
            return segment_sums(values, k) if k > 1 else values.sum(-1)

        mix_energy = over_time(mix_power.sum(-2)) + ENERGY_FLOOR
        excess = over_time((est_power - mix_power).clamp_min(0).sum(-2)) / mix_energy  # E_excess
        if batch.residuals is None:
            consistency = torch.zeros_like(excess)  # r = x - y_hat: target + residual = x exactly
        else:
            error = (mixtures - (estimates + batch.residuals.float())).square()
            consistency = over_time(error) / (over_time(mixtures.square()) + ENERGY_FLOOR)  # E_consistency
    return -(excess + consistency.expand_as(excess))


#: the paper's reward with the guard; recipes update these by name
DEFAULT_WEIGHTS = {"semantic_anchor": 1.0, "query_similarity": 0.0, "si_sdr": 0.25, "energy_guard": 1.0}
DEFAULT_SI_SDR_CAP_DB = 30.0
#: settings that a recipe's ``rewards`` mapping may hold beside the terms' weights
_REWARD_SETTINGS = ("si_sdr_cap_db", "segments")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Weights w_i of R = sum_i w_i r_i by term name (:data:`DEFAULT_WEIGHTS` updated by the given
    ones), and the terms' settings. A term of weight 0 is out of R and is not computed in training
    steps; validation still logs every term."""

    weights: Mapping[str, float] = dataclasses.field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    #: SI-SDR is clamped to +-cap and divided by it
    si_sdr_cap_db: float = DEFAULT_SI_SDR_CAP_DB
    #: K consecutive time segments scored separately by the signal terms (1 = the paper's one
    #: reward per clip; see the module docstring)
    segments: int = 1

    def __post_init__(self) -> None:
        weights = dict(DEFAULT_WEIGHTS)
        for name, weight in dict(self.weights).items():
            if name not in REWARD_TERMS:
                raise ConfigError(f"rewards: unknown reward term {name!r}; registered terms: {', '.join(REWARD_TERMS)}")
            weights[name] = _number(weight, f"rewards: the weight of {name!r}")
        object.__setattr__(self, "weights", weights)
        if self.si_sdr_cap_db <= 0:
            raise ConfigError(f"rewards.si_sdr_cap_db must be positive, got {self.si_sdr_cap_db}")
        if self.segments < 1:
            raise ConfigError(f"rewards.segments must be >= 1, got {self.segments}")
        if not any(w != 0 for w in weights.values()):
            raise ConfigError("rewards: at least one reward weight must be non-zero")

    @classmethod
    def from_recipe(cls, rewards: Mapping[str, Any], where: str = "rewards") -> "RewardConfig":
        """A recipe's ``rewards`` mapping: ``{term: weight, ...}`` (or the same under ``weights:``) and the settings."""
        from marsctl.config import from_mapping

        if not isinstance(rewards, Mapping):
            raise ConfigError(f"{where}: expected a mapping of reward term names to weights, got {rewards!r}")
        given = dict(rewards)
        weights = given.pop("weights", None) or {}
        if not isinstance(weights, Mapping):
            raise ConfigError(f"{where}.weights: expected a mapping of reward term names to weights, got {weights!r}")
        settings = {key: given.pop(key) for key in _REWARD_SETTINGS if key in given}
        return from_mapping(cls, {**settings, "weights": {**weights, **given}}, where)  # the other keys name terms


def _number(value: Any, what: str) -> float:
    """A weight as a float (YAML 1.1 reads ``5e-4`` as text)."""
    try:
        if isinstance(value, bool):
            raise ValueError
        return float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number, got {value!r}") from None


@dataclasses.dataclass(frozen=True)
class RewardFunction:
    name: str
    weight: float
    function: Callable[[RewardBatch], torch.Tensor]
    #: what of a RewardBatch it reads (the trainer computes only what is read)
    needs: tuple[str, ...] = ()


def reward_functions(config: RewardConfig = RewardConfig()) -> list[RewardFunction]:
    """The weighted list of named reward terms of ``config``, in its order."""
    return [RewardFunction(name, weight, REWARD_TERMS[name].function, REWARD_TERMS[name].needs) for name, weight in config.weights.items()]


def compute_rewards(functions: Sequence[RewardFunction], batch: RewardBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """R = sum_i w_i r_i, and each r_i by name (for logging). All on the estimates' leading shape
    (``[..., K]`` with ``batch.segments`` K > 1: whole-clip terms are broadcast over the segments)."""
    terms: dict[str, torch.Tensor] = {}
    total = None
    lead = batch.estimates.shape[:-1]
    for function in functions:
        value = function.function(batch).float()
        if batch.segments > 1 and value.shape == lead:
            value = value.unsqueeze(-1).expand(*lead, batch.segments)  # a whole-clip score counts in every segment
        terms[function.name] = value
        total = function.weight * value if total is None else total + function.weight * value  # R = sum_i w_i r_i
    if total is None:
        raise ValueError("no reward functions")
    return total, terms


@torch.no_grad()
def anchor_embeddings(
    encoder,
    target_audio: torch.Tensor | None,
    texts: Sequence[str] | None,
    sample_rate: int,
    images: torch.Tensor | None = None,
    fallback_queries: torch.Tensor | None = None,
) -> tuple[torch.Tensor, str]:
    """The anchors z* ``[B, D]`` of B targets, and where they came from.

    With ``encoder.anchor_fusion`` (an aligned encoder): z* = AnchorFusion(audio, text, image)
    of the targets' embeddings ("anchor_fusion"). Without it: the queries
    (``fallback_queries``, or the encoder's text embeddings of ``texts``): "query (no anchor module)".
    """
    fusion = getattr(encoder, "anchor_fusion", None)
    if fusion is not None:
        parts = {}
        if target_audio is not None and "audio" in fusion.modalities:
            parts["audio"] = encoder.embed_audio(target_audio.float(), sample_rate).float()
        if texts is not None and "text" in fusion.modalities:
            parts["text"] = encoder.embed_text(list(texts)).float()
        if images is not None and "image" in fusion.modalities:
            parts["image"] = encoder.embed_image(images).float()
        if parts:
            return F.normalize(fusion(**parts).float(), dim=-1), "anchor_fusion"
    if fallback_queries is not None:
        return F.normalize(fallback_queries.float(), dim=-1), "query (no anchor module)"
    if texts is None:
        raise ValueError("no anchor module, no fallback queries and no texts")
    return encoder.embed_text(list(texts)).float(), "query (no anchor module)"
