"""The RL rollout: G masks sampled per mixture, separated, and scored by the frozen reward encoder.

    M_{g,b} ~ pi_old, g = 1..G                       the group: G masks from one forward pass
    y_{g,b} = iSTFT(warp^-1(M_{g,b}) X_b)            mixture phase
    e_{g,b} = phi_a(y_{g,b})                         all G*B estimates in ONE reward-encoder batch (fp32)
    R_{g,b} = sum_i w_i r_i(y_{g,b})                 the registered reward terms (marsctl.rl.rewards)
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Sequence

import torch

from marsctl.errors import MarsctlError
from marsctl.models.encoder_base import QueryEncoder
from marsctl.models.policy import BetaMaskPolicy
from marsctl.models.separator import Separator
from marsctl.queries import QueryBuilder
from marsctl.rl.rewards import RewardBatch, RewardConfig, RewardFunction, anchor_embeddings, compute_rewards


@dataclasses.dataclass
class Rollout:
    """G samples per mixture and their rewards (all ``[G, B, ...]``)."""

    masks: torch.Tensor  # [G, B, F_log, frames]
    estimates: torch.Tensor  # [G, B, T]
    rewards: torch.Tensor  # [G, B], or [G, B, K] with K reward segments
    terms: dict[str, torch.Tensor]  # each like rewards
    reward_seconds: float
    #: where z* came from ("anchor_fusion" or the query fallback); None when no term needed it
    anchor_source: str | None


class RewardModel:
    """The frozen reward encoder plus the weighted reward terms: scores ``[G, B, T]`` estimates."""

    def __init__(self, encoder: QueryEncoder, functions: Sequence[RewardFunction], signal, same_space_as_queries: bool,
                 segments: int = 1, config: RewardConfig | None = None):
        self.encoder = encoder.eval().requires_grad_(False)
        self.functions = list(functions)
        #: K: time segments scored separately by the signal terms (rewards come back [G, B, K])
        self.segments = segments
        self.signal = signal
        self.config = config
        self.same_space_as_queries = same_space_as_queries
        self._text_cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def text(self, labels: Sequence[str]) -> torch.Tensor:
        """The reward encoder's text embeddings, each label on its own (as :meth:`marsctl.queries.QueryBuilder.text`)."""
        for label in labels:
            if label not in self._text_cache:
                self._text_cache[label] = self.encoder.embed_text([label])[0].float()
        return torch.stack([self._text_cache[label] for label in labels])

    def score(
        self,
        estimates: torch.Tensor,
        mixtures: torch.Tensor,
        labels: Sequence[str],
        queries: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        mixture_power: torch.Tensor | None = None,
        all_terms: bool = False,
        differentiable: bool = False,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], str | None]:
        """Rewards ``[G, B]`` (``[G, B, K]`` with K segments) of estimates ``[G, B, T]`` for B
        mixtures (targets ``[B, T]`` when known).

        Training steps compute the weighted terms only; ``all_terms`` (validation) adds the
        weight-0 ones, which are logged but not in R. Terms that need the target are skipped
        when it is unknown. The reward encoder runs only when a computed term reads its output.
        ``differentiable`` (the pathwise estimator) keeps the graph from the estimates to R and
        fails, naming the term, when a weighted term does not depend differentiably on them."""
        with torch.enable_grad() if differentiable else torch.no_grad():
            total, terms, source = self._score(estimates, mixtures, labels, queries, targets, mixture_power, all_terms, differentiable)
        if differentiable and estimates.requires_grad:
            for function in self.functions:
                if function.weight != 0 and function.name in terms and not terms[function.name].requires_grad:
                    raise MarsctlError(f"estimator 'pathwise': reward term '{function.name}' is not differentiable in the estimate "
                                       "(its encoder gave no gradient); give it weight 0 or use estimator 'score_function'")
        return total, terms, source

    def _score(self, estimates, mixtures, labels, queries, targets, mixture_power, all_terms, differentiable):
        group, batch, length = estimates.shape
        device = self.encoder.device
        functions = [f for f in self.functions if (all_terms or f.weight != 0) and (targets is not None or "targets" not in f.needs)]
        needs = {need for f in functions for need in f.needs}
        embeddings = residual_embeddings = anchors = reward_queries = None
        source = None
        with torch.autocast(device_type=estimates.device.type, enabled=False):  # the reward encoder runs in fp32
            if needs & {"estimate_embeddings", "residual_embeddings"}:
                # e_{g,b} = phi_a(y_{g,b}) (and phi_a(x_b - y_{g,b}) when a term reads it): all in one batch
                waves = [estimates.reshape(group * batch, length)]
                if "residual_embeddings" in needs:
                    waves.append((mixtures.expand_as(estimates) - estimates).reshape(group * batch, length))
                joint = self.encoder.embed_audio(torch.cat(waves).float().to(device), self.signal.sample_rate, differentiable=differentiable)
                joint = joint.float().view(len(waves), group, batch, -1).to(estimates.device)
                embeddings = joint[0]
                residual_embeddings = joint[1] if len(waves) > 1 else None
            if needs & {"queries", "anchors"}:
                if self.same_space_as_queries and queries is not None:
                    reward_queries = queries.float()
                else:
                    reward_queries = self.text(labels).to(estimates.device)
            if "anchors" in needs:
                anchors, source = anchor_embeddings(
                    self.encoder, None if targets is None else targets.float().to(device), labels, self.signal.sample_rate,
                    fallback_queries=reward_queries,
                )
                anchors = anchors.to(estimates.device)
            reward_batch = RewardBatch(
                estimates=estimates.float(), mixtures=mixtures.float(), signal=self.signal, estimate_embeddings=embeddings,
                residual_embeddings=residual_embeddings,
                anchors=anchors, queries=reward_queries, targets=None if targets is None else targets.float(),
                mixture_power=mixture_power, segments=self.segments, config=self.config,
            )
            total, terms = compute_rewards(functions, reward_batch)
        return total, terms, source


class Stopwatch:
    """Seconds of one ``with`` block (:func:`measured`)."""

    seconds: float = 0.0


@contextlib.contextmanager
def measured(device: torch.device, synchronized: bool = True):
    """Time the block; ``synchronized``: synchronize a CUDA ``device`` before and after, so that the
    seconds are the GPU's (unlogged steps skip it: on a GPU the seconds are then only the time to
    queue the work)."""
    watch = Stopwatch()
    sync = synchronized and device.type == "cuda"
    if sync:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    yield watch
    if sync:
        torch.cuda.synchronize(device)
    watch.seconds = time.perf_counter() - start


class PhaseTimer:
    """Wall-clock seconds per named phase (CUDA-synchronized), for benchmarks; disabled = free."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.device, self.enabled = device, enabled
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        if not self.enabled:
            yield
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def rollout(
    model: Separator,
    policy: BetaMaskPolicy,
    mixture_stft: torch.Tensor,
    mixtures: torch.Tensor,
    group_size: int,
    reward_model: RewardModel,
    labels: Sequence[str],
    queries: torch.Tensor | None,
    targets: torch.Tensor | None,
    timer: PhaseTimer | None = None,
    all_terms: bool = False,
    timed: bool = True,
) -> Rollout:
    """Sample G masks per mixture from ``policy`` (``[B, F, T]``), separate and score them
    (``all_terms``: also the weight-0 reward terms, for logging). ``timed``: synchronize a GPU around
    the reward so that ``reward_seconds`` is its time (else no sync, and the time to queue it)."""
    timer = timer or PhaseTimer(mixtures.device, enabled=False)
    with torch.no_grad():
        with timer("sample"):
            masks = policy.detach().sample(group_size)  # M_{g,b} ~ pi_old
        with timer("synthesize"):
            estimates = model.synthesize(masks, mixture_stft, mixtures.shape[-1])  # y = iSTFT(warp^-1(M) X)
        with measured(estimates.device, timed) as reward_time:
            mixture_power = mixture_stft.abs().square()
            rewards, terms, source = reward_model.score(estimates, mixtures, labels, queries, targets, mixture_power, all_terms)
    return Rollout(masks=masks, estimates=estimates, rewards=rewards, terms=terms, reward_seconds=reward_time.seconds, anchor_source=source)


@torch.no_grad()
def mean_policy_reward(model: Separator, items, reward_model: RewardModel, group_size: int, device: torch.device,
                       seed: int = 0, kappa: float | None = None) -> dict[str, float]:
    """Mean reward and reward terms (and each term's std) of the current policy (concentration
    ``kappa``, default the model's) over ``items`` of ``(mixture [T] array, queries [S, D], labels,
    targets [S, T] array or None)``: every query scored with ``group_size`` seeded samples."""
    kappa = model.config.kappa if kappa is None else kappa
    totals: list[torch.Tensor] = []
    terms: dict[str, list[torch.Tensor]] = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for mixture, query, labels, targets in items:
            mixture = torch.from_numpy(mixture).to(device)[None].expand(len(labels), -1)  # [S, T]: one row per query
            query = query.to(device)  # [S, D]
            stft, _, log_magnitude = model.analyze(mixture)
            policy = BetaMaskPolicy.from_logits(model.logits(model.features(log_magnitude), query), kappa)
            targets = torch.from_numpy(targets).to(device) if targets is not None else None
            samples = rollout(model, policy, stft, mixture, group_size, reward_model, list(labels), query, targets, all_terms=True)
            totals.append(samples.rewards.flatten())
            for name, value in samples.terms.items():
                terms.setdefault(name, []).append(value.flatten())
    if not totals:
        return {}
    return {"reward": float(torch.cat(totals).mean()), **{f"reward/{k}": float(torch.cat(v).mean()) for k, v in terms.items()},
            **{f"reward_std/{k}": float(torch.cat(v).std()) for k, v in terms.items()}}


def validation_reward(
    model: Separator, mixtures, queries: QueryBuilder, reward_model: RewardModel, group_size: int, device: torch.device,
    seed: int = 0, kappa: float | None = None,
) -> dict[str, float]:
    """Mean reward of the current policy on fixed mixtures (every source a target with its text
    query): the RL objective on data it never trains on (:func:`mean_policy_reward`)."""
    items = ((fixed.mixture, queries.text(fixed.labels), fixed.labels, fixed.sources) for fixed in mixtures)
    return mean_policy_reward(model, items, reward_model, group_size, device, seed, kappa)
