"""``marsctl train rl``: MARS-Sep fine-tuning of a supervised separator as a Beta mask policy.

One loop (CleanRL style), one line per equation; per step and process, for ``B`` mixtures:

    q_b            query of the target source b (text by default; Query-Mixup over modalities)
    z = f_theta(x_b, q_b)          ONE forward pass per mixture -> Beta parameters
    pi_theta       alpha = 1 + kappa sigmoid(z),  beta = 1 + kappa (1 - sigmoid(z))
    pi_old         = stop_grad(pi_theta)             snapshotted at sampling time
    M_{g,b} ~ pi_old, g = 1..G                       the group: G masks from that one pass
    y_{g,b}        = iSTFT(warp^-1(M_{g,b}) X_b)     mixture phase
    e_{g,b}        = phi_a(y_{g,b})                  all G*B estimates in ONE reward-encoder batch (fp32)
    R_{g,b}        = sum_i w_i r_i(y_{g,b})          named reward functions (marsctl.rl.rewards)
    A_{g,b}        = (R - mean_g R) / (std_g R + eps)      or the moving-average baseline
    repeat K times (--ppo-epochs; the first epoch reuses the sampling pass):
        L = -mean min(r A, clip(r, 1 +- eps) A) - lambda_H H(pi_theta) + lambda_KL KL(pi_theta || pi_ref)
        theta <- AdamW(theta, clip(grad L, 1.0))          (LR: warmup, then cosine decay)

With ``estimator: pathwise`` (an extension) the masks are drawn with gradient and the
rewards differentiated through them (no ratio, no advantage)::

    M_{g,b}        = rsample(pi_theta)                 Beta implicit reparameterization
    L = -mean R(M(theta)) - lambda_H H(pi_theta) + lambda_KL KL(pi_theta || pi_ref)

``pi_ref`` is the frozen starting (supervised) separator. The separator runs with its
BatchNorm layers in inference mode (running statistics frozen), so the optimized policy is
exactly the one ``marsctl separate`` deploys and KL(pi_theta || pi_ref) is 0 at step 0.

The target of each mixture is one of its sources, drawn from a generator seeded by
(seed, step, rank) so that a resumed run draws the same targets. Checkpoints, exact
resume, the step-indexed batch order, TensorBoard and the torchrun/DDP launch are the
supervised trainer's (``marsctl.train``). The run directory's artifact is the *latest*
policy (written at each checkpoint): RL optimizes the reward, so selecting by validation
SI-SDRi (which is logged) would quietly undo it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from marsctl.config import load_recipe, to_mapping
from marsctl.errors import ConfigError, MarsctlError
from marsctl.files import write_json_atomic, write_text_atomic
from marsctl.models.encoder_base import QueryEncoder
from marsctl.models.policy import BetaMaskPolicy
from marsctl.models.separator import Separator, load_separator, save_separator
from marsctl.rl.advantages import (
    DEFAULT_BASELINE_BETA,
    DEFAULT_EPS,
    MovingAverageBaseline,
    group_relative_advantages,
)
from marsctl.rl.losses import (
    DEFAULT_CLIP_EPS,
    DEFAULT_ENTROPY_COEF,
    DEFAULT_KL_COEF,
    SURROGATES,
    pathwise_loss,
    policy_loss,
)
from marsctl.rl.rewards import (
    RewardBatch,
    RewardConfig,
    RewardFunction,
    anchor_embeddings,
    compute_rewards,
    reward_functions,
)
from marsctl.train import checkpoint as ckpt
from marsctl.train.data import (
    EpochIndexedDataset,
    StepBatchSampler,
    collate,
    fixed_mixtures,
    mixing_dataset,
)
from marsctl.train.distributed import DistributedContext
from marsctl.train.loop_config import TrainingLoopConfig
from marsctl.train.supervised import QueryBuilder, SupervisedConfig, validate

BASELINES = ("group", "moving_average")
#: how the gradient of E_{M ~ pi_theta}[R(M)] is estimated (see RLConfig.estimator)
ESTIMATORS = ("score_function", "pathwise")
ESTIMATOR_SUMMARY = {
    "score_function": "clipped surrogate on bin-averaged ratios, group-relative advantages",
    "pathwise": "pathwise gradient of the expected reward through reparameterized Beta masks",
}


@dataclasses.dataclass(frozen=True)
class RLConfig(TrainingLoopConfig):
    """Everything ``marsctl train rl`` needs; ``recipes/train/rl*.yaml`` fill it.

    The shared loop settings are :class:`~marsctl.train.loop_config.TrainingLoopConfig`'s;
    the defaults that differ from supervised training are redeclared here."""

    #: the starting separator (a ``marsctl train sup`` run directory or Hub id); also pi_ref
    init_model: str = ""
    #: query encoder spec; empty = the one the starting separator was trained with
    encoder: str = ""
    #: frozen reward encoder spec (an aligned encoder directory); empty = the query encoder
    reward_encoder: str = ""
    batch_size: int = 4
    #: G: masks sampled per mixture from one forward pass
    group_size: int = 8
    #: K: optimization epochs per rollout batch (the old policy is fixed at sampling time)
    ppo_epochs: int = 1
    max_steps: int = 2000
    learning_rate: float = 2e-4
    warmup_steps: int = 50
    #: Beta concentration kappa during RL (alpha = 1 + kappa P, beta = 1 + kappa (1 - P));
    #: None keeps the starting separator's. The mode (= P, what ``separate`` deploys) does not
    #: depend on kappa; a larger kappa samples masks closer to it. Saved with the fine-tuned model.
    kappa: float | None = None
    #: epsilon of clip(r, 1 - eps, 1 + eps)
    clip_eps: float = DEFAULT_CLIP_EPS
    #: "bin_mean" clips the bin-averaged ratio (the paper); "per_bin" clips each bin's ratio and
    #: then averages (token-level PPO). Identical when ppo_epochs = 1; see marsctl.rl.losses.
    surrogate: str = "bin_mean"
    #: "score_function": the paper's PPO clipped surrogate on log-probability ratios (REINFORCE
    #: with group-relative advantages; any reward, differentiable or not). "pathwise": the
    #: reparameterized gradient of the same objective, d/dtheta mean_g R(M_g(theta)) with
    #: M_g = Beta.rsample (an extension; needs every weighted reward term differentiable in the
    #: estimate: si_sdr and energy_guard are, the semantic terms are with the built-in encoder but
    #: not with LAION-CLAP, whose audio features are computed without gradients). Over the ~3·10^4
    #: independent Beta bins of a 2 s clip the score-function gradient is close to noise
    #: (BENCHMARKS.md section 5, bench/rl_gradient_quality.py); the pathwise one is not.
    estimator: str = "score_function"
    #: lambda_H (entropy bonus). The paper's 0.1 is the default; note that with per-bin means for
    #: both the ratio and the entropy, the entropy gradient is coherent over bins while the policy
    #: gradient is not: in 25-step CPU runs on the test tones 0.1 pulled the masks toward 0.5
    #: (validation reward 0.883 -> 0.752), 0.01 and 0 let it rise (-> 0.891, -> 0.913).
    entropy_coef: float = DEFAULT_ENTROPY_COEF
    #: lambda_KL (KL to the frozen starting policy)
    kl_coef: float = DEFAULT_KL_COEF
    #: eps in (R - mean) / (std + eps)
    advantage_eps: float = DEFAULT_EPS
    #: "group" (GRPO: centre on the group mean) or "moving_average" (the paper's option)
    baseline: str = "group"
    baseline_beta: float = DEFAULT_BASELINE_BETA
    rewards: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    val_every: int = 100
    val_mixtures: int = 32
    checkpoint_every: int = 100
    log_every: int = 1

    _positive = TrainingLoopConfig._positive + ("ppo_epochs",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group_size < 2:
            raise ConfigError(f"group_size must be >= 2 (advantages are normalized within the group), got {self.group_size}")
        if self.baseline not in BASELINES:
            raise ConfigError(f"baseline must be one of {', '.join(BASELINES)}, got {self.baseline!r}")
        if self.estimator not in ESTIMATORS:
            raise ConfigError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {self.estimator!r}")
        if self.estimator == "pathwise" and self.baseline == "moving_average":
            raise ConfigError("baseline 'moving_average' belongs to the score_function estimator; the pathwise gradient uses no baseline")
        if self.surrogate not in SURROGATES:
            raise ConfigError(f"surrogate must be one of {', '.join(SURROGATES)}, got {self.surrogate!r}")
        if not 0 < self.clip_eps < 1:
            raise ConfigError(f"clip_eps must be in (0, 1), got {self.clip_eps}")
        if self.kappa is not None and self.kappa <= 0:
            raise ConfigError(f"kappa must be positive, got {self.kappa}")


def load_rl_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RLConfig:
    """A recipe YAML (or the defaults) with command-line overrides (``None`` values ignored)."""
    return load_recipe(RLConfig, path, overrides, where="train rl")


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
    """The frozen reward encoder plus the weighted reward functions: scores ``[G, B, T]`` estimates."""

    def __init__(self, encoder: QueryEncoder, functions: Sequence[RewardFunction], signal, same_space_as_queries: bool, segments: int = 1):
        self.encoder = encoder.eval().requires_grad_(False)
        self.functions = list(functions)
        #: K: time segments scored separately by the signal terms (rewards come back [G, B, K])
        self.segments = segments
        self.signal = signal
        self.same_space_as_queries = same_space_as_queries
        self._text_cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def text(self, labels: Sequence[str]) -> torch.Tensor:
        missing = sorted({label for label in labels if label not in self._text_cache})
        if missing:
            for label, emb in zip(missing, self.encoder.embed_text(missing).float()):
                self._text_cache[label] = emb
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
            total, terms, source = self._score(estimates, mixtures, labels, queries, targets, mixture_power, all_terms)
        if differentiable and estimates.requires_grad:
            for function in self.functions:
                if function.weight != 0 and function.name in terms and not terms[function.name].requires_grad:
                    raise MarsctlError(f"estimator 'pathwise': reward term '{function.name}' is not differentiable in the estimate "
                                       "(the encoders compute embeddings without gradients); give it weight 0 or use estimator 'score_function'")
        return total, terms, source

    def _score(self, estimates, mixtures, labels, queries, targets, mixture_power, all_terms):
        group, batch, length = estimates.shape
        device = self.encoder.device
        functions = [f for f in self.functions if (all_terms or f.weight != 0) and (targets is not None or "targets" not in f.needs)]
        needs = {need for f in functions for need in f.needs}
        embeddings = anchors = reward_queries = None
        source = None
        with torch.autocast(device_type=estimates.device.type, enabled=False):  # the reward encoder runs in fp32
            if "estimate_embeddings" in needs:
                # e_{g,b} = phi_a(y_{g,b}): all G*B estimates in one batch
                embeddings = self.encoder.embed_audio(estimates.reshape(group * batch, length).float().to(device), self.signal.sample_rate)
                embeddings = embeddings.float().view(group, batch, -1).to(estimates.device)
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
                anchors=anchors, queries=reward_queries, targets=None if targets is None else targets.float(),
                mixture_power=mixture_power, segments=self.segments,
            )
            total, terms = compute_rewards(functions, reward_batch)
        return total, terms, source


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
) -> Rollout:
    """Sample G masks per mixture from ``policy`` (``[B, F, T]``), separate and score them
    (``all_terms``: also the weight-0 reward terms, for logging)."""
    timer = timer or PhaseTimer(mixtures.device, enabled=False)
    with torch.no_grad():
        with timer("sample"):
            masks = policy.detach().sample(group_size)  # M_{g,b} ~ pi_old
        with timer("synthesize"):
            estimates = model.synthesize(masks, mixture_stft, mixtures.shape[-1])  # y = iSTFT(warp^-1(M) X)
        if estimates.device.type == "cuda":
            torch.cuda.synchronize(estimates.device)
        start = time.perf_counter()
        mixture_power = mixture_stft.abs().square()
        rewards, terms, source = reward_model.score(estimates, mixtures, labels, queries, targets, mixture_power, all_terms)
        if rewards.device.type == "cuda":
            torch.cuda.synchronize(rewards.device)
        seconds = time.perf_counter() - start
    return Rollout(masks=masks, estimates=estimates, rewards=rewards, terms=terms, reward_seconds=seconds, anchor_source=source)


@dataclasses.dataclass
class UpdateResult:
    samples: Rollout
    advantages: torch.Tensor  # [G, B] (or [G, B, K])
    #: policy-loss diagnostics of each PPO epoch (+ grad_norm)
    epoch_stats: list[dict[str, float]]


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
) -> UpdateResult:
    """One RL step on B mixtures (the module docstring's loop body, without the LR schedule).

    ``train_model`` is ``model`` or its DDP wrapper; the masks are drawn from a generator
    seeded by ``sample_seed`` (a pure function of the step: exact resume). ``timer`` (benchmarks)
    records the seconds of each phase."""
    timer = timer or PhaseTimer(device, enabled=False)
    with torch.no_grad(), timer("reference_forward"):
        mixture_stft, _, _ = model.analyze(mixture)  # X_b
        reference_policy = None  # lambda_KL = 0: no reference pass at all
        if config.kl_coef != 0:
            reference_policy = _forward_policy(reference, reference, mixture, query, device, use_bf16)  # pi_ref
    with timer("policy_forward"):
        # z = f_theta(x, q), one forward pass per mixture; pi_theta: alpha = 1 + kappa P, beta = 1 + kappa (1 - P)
        policy = _forward_policy(model, train_model, mixture, query, device, use_bf16)
    if config.estimator == "pathwise":
        return _pathwise_update(model, train_model, policy, reference_policy, reward_model, optimizer, config, mixture_stft, mixture,
                                query, target, labels, sample_seed, device, use_bf16, timer)
    old_policy = policy.detach()  # pi_old, snapshotted at sampling time
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(sample_seed)
        samples = rollout(model, old_policy, mixture_stft, mixture, config.group_size, reward_model, labels, query, target, timer)
    timer.seconds["reward"] = timer.seconds.get("reward", 0.0) + samples.reward_seconds
    rewards = samples.rewards  # R_{g,b} = sum_i w_i r_i
    if baseline is None:
        advantages = group_relative_advantages(rewards, config.advantage_eps)  # (R - mean_g) / (std_g + eps)
    else:
        mean_reward = all_reduce_mean(float(rewards.mean()))
        advantages = baseline.advantages(rewards, config.advantage_eps, mean_reward)  # (R - b) / (std_g + eps)
    old_log_prob = old_policy.log_prob(samples.masks)  # log pi_old(M), fixed for the K epochs
    epoch_stats: list[dict[str, float]] = []
    for epoch in range(config.ppo_epochs):
        with timer("loss_backward_step"):
            if epoch > 0:
                policy = _forward_policy(model, train_model, mixture, query, device, use_bf16)
            # L = -mean min(r A, clip(r, 1 +- eps) A) - lambda_H H + lambda_KL KL(pi_theta || pi_ref)
            out = policy_loss(
                policy, old_policy, reference_policy, samples.masks, advantages, config.clip_eps,
                config.entropy_coef, config.kl_coef, old_log_prob=old_log_prob, surrogate=config.surrogate,
            )
            epoch_stats.append({**out.stats, "grad_norm": _apply_gradient(model, optimizer, out.loss, config.grad_clip_norm)})
    return UpdateResult(samples=samples, advantages=advantages, epoch_stats=epoch_stats)


def _forward_policy(separator: Separator, forward: torch.nn.Module, mixture, query, device, use_bf16) -> BetaMaskPolicy:
    """The Beta policy of ``separator`` for these mixtures and queries: one forward pass of
    ``forward`` (the separator itself or its DDP wrapper) under bf16 autocast when asked."""
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
        return separator.policy(forward(mixture, query))


def _apply_gradient(model, optimizer, loss: torch.Tensor, grad_clip_norm: float) -> float:
    """theta <- AdamW(theta, clip(grad L, grad_clip_norm)); returns the gradient norm before clipping."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)  # clip(grad L, 1.0)
    optimizer.step()  # theta <- AdamW(theta, ...)
    return float(grad_norm)


def _pathwise_update(model, train_model, policy, reference_policy, reward_model, optimizer, config, mixture_stft, mixture, query,
                     target, labels, sample_seed, device, use_bf16, timer) -> UpdateResult:
    """``estimator: pathwise``: theta <- AdamW(grad of -mean_g R(M_g(theta)) - lambda_H H + lambda_KL KL),
    M_g = rsample (fresh on-policy samples each epoch). Advantages are computed for the log only."""
    fork = [device] if device.type == "cuda" else []
    mixture_power = mixture_stft.abs().square()  # |X|^2, for the energy guard
    epoch_stats: list[dict[str, float]] = []
    for epoch in range(config.ppo_epochs):
        with timer("loss_backward_step"):
            if epoch > 0:
                policy = _forward_policy(model, train_model, mixture, query, device, use_bf16)
            with torch.random.fork_rng(devices=fork):
                torch.manual_seed(sample_seed + epoch)
                masks = policy.rsample(config.group_size)  # M_g = g(eps_g; alpha(theta), beta(theta))
            estimates = model.synthesize(masks, mixture_stft, mixture.shape[-1])  # y_g(theta)
            start = time.perf_counter()
            rewards, terms, source = reward_model.score(estimates, mixture, labels, query, target, mixture_power, differentiable=True)
            reward_seconds = time.perf_counter() - start
            out = pathwise_loss(policy, reference_policy, rewards, config.entropy_coef, config.kl_coef)
            epoch_stats.append({**out.stats, "grad_norm": _apply_gradient(model, optimizer, out.loss, config.grad_clip_norm)})
            if epoch == 0:
                samples = Rollout(masks=masks.detach(), estimates=estimates.detach(), rewards=rewards.detach(),
                                  terms={k: v.detach() for k, v in terms.items()}, reward_seconds=reward_seconds, anchor_source=source)
    timer.seconds["reward"] = timer.seconds.get("reward", 0.0) + samples.reward_seconds
    return UpdateResult(samples=samples, advantages=group_relative_advantages(samples.rewards, config.advantage_eps), epoch_stats=epoch_stats)


@torch.no_grad()
def validation_reward(
    model: Separator, mixtures, query_builder: QueryBuilder, reward_model: RewardModel, group_size: int, device: torch.device, seed: int = 0
) -> dict[str, float]:
    """Mean reward of the current policy on fixed mixtures (every source a target with its text
    query, ``group_size`` seeded samples each): the RL objective on data it never trains on."""
    totals: list[torch.Tensor] = []
    terms: dict[str, list[torch.Tensor]] = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for fixed in mixtures:
            count = len(fixed.labels)
            mixture = torch.from_numpy(fixed.mixture).to(device)[None].expand(count, -1)  # [S, T]: one row per target
            queries = query_builder.text(fixed.labels).to(device)  # [S, D]
            stft, _, log_magnitude = model.analyze(mixture)
            policy = model.policy(model.logits(model.features(log_magnitude), queries))
            targets = torch.from_numpy(fixed.sources).to(device)
            samples = rollout(model, policy, stft, mixture, group_size, reward_model, fixed.labels, queries, targets, all_terms=True)
            totals.append(samples.rewards.flatten())
            for name, value in samples.terms.items():
                terms.setdefault(name, []).append(value.flatten())
    if not totals:
        return {}
    return {"reward": float(torch.cat(totals).mean()), **{f"reward/{k}": float(torch.cat(v).mean()) for k, v in terms.items()}}


@dataclasses.dataclass
class RLResult:
    model: Separator
    run_dir: Path
    step: int
    history: list[dict[str, Any]]


def _model_card(config: RLConfig, step: int, val: float | None, anchor_source: str | None) -> str:
    weights = ", ".join(f"{k} {v:g}" for k, v in to_mapping(config.rewards.weights).items())
    score = f"{val:.2f} dB" if val is not None else "not measured"
    return (
        "# marsctl separator (MARS-Sep RL fine-tuned)\n\n"
        "Query-conditioned mask separator fine-tuned by `marsctl train rl` as a Beta mask policy "
        f"({ESTIMATOR_SUMMARY[config.estimator]}, entropy bonus, KL to the starting policy).\n\n"
        f"- starting model (reference policy): `{config.init_model}`\n- training data: `{config.data}`\n"
        f"- reward encoder: `{config.reward_encoder or 'the query encoder'}`; anchor z*: {anchor_source or 'n/a'}\n"
        f"- reward weights: {weights}\n"
        f"- steps: {step} (batch {config.batch_size} x group {config.group_size} per process, {config.ppo_epochs} PPO epoch(s)), "
        f"AdamW lr {config.learning_rate}\n"
        f"- last validation SI-SDRi: {score} on fixed `{config.val_split}` mixtures\n\n"
        "Full settings are in `config.json` (`training`).\n"
    )


def train_rl(
    config: RLConfig,
    run_dir: str | Path,
    encoder: QueryEncoder | None = None,
    reward_encoder: QueryEncoder | None = None,
    device: str | None = None,
    resume: bool = True,
    progress: bool = True,
    on_step_end: Callable[[int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> RLResult:
    """Fine-tune ``config.init_model`` with RL into ``run_dir`` (resuming from its latest checkpoint)."""
    from torch.utils.tensorboard import SummaryWriter

    run_dir = Path(run_dir)
    ctx = DistributedContext.from_env(device)
    say = (log or (lambda message: None)) if ctx.is_main else (lambda message: None)
    dataset_dir = Path(config.data)
    if not dataset_dir.is_dir():
        raise MarsctlError(f"{dataset_dir}: no such dataset directory")
    if not config.init_model:
        raise MarsctlError("train rl needs a starting separator: --init-model (a 'marsctl train sup' run directory)")
    start = load_separator(config.init_model, device=ctx.device)
    model = start.model
    signal = model.config.signal
    reference = load_separator(config.init_model, device=ctx.device).model.eval().requires_grad_(False)  # pi_ref, frozen
    if config.kappa is not None:  # the RL policy's concentration (pi_ref gets the same, so KL compares like with like)
        for separator in (model, reference):
            separator.config = dataclasses.replace(separator.config, kappa=float(config.kappa))
    encoder_spec = config.encoder or start.encoder
    if encoder is None:
        from marsctl.models.encoders import load_encoder

        encoder = load_encoder(encoder_spec, device=str(ctx.device))
    encoder.eval().requires_grad_(False)
    if encoder.embedding_dim != model.config.query_dim:
        raise MarsctlError(f"encoder {encoder_spec} gives {encoder.embedding_dim}-d queries; {config.init_model} expects {model.config.query_dim}")
    if reward_encoder is None:
        if config.reward_encoder and config.reward_encoder != encoder_spec:
            from marsctl.models.encoders import load_encoder

            reward_encoder = load_encoder(config.reward_encoder, device=str(ctx.device))
        else:
            reward_encoder = encoder
    reward_model = RewardModel(reward_encoder, reward_functions(config.rewards), signal, same_space_as_queries=reward_encoder is encoder,
                               segments=config.rewards.segments)
    if getattr(reward_encoder, "anchor_fusion", None) is None:
        say("reward encoder has no anchor module (not aligned): semantic_anchor uses the query as z*")
    torch.manual_seed(config.seed + ctx.rank)

    model.eval()  # BatchNorm in inference mode: the optimized policy is the deployed one (see the docstring)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, config.lr_lambda())
    baseline = MovingAverageBaseline(config.baseline_beta) if config.baseline == "moving_average" else None
    start_step, history = 0, []

    latest = ckpt.latest_checkpoint(run_dir) if resume else None
    if latest is not None:
        state = ckpt.load_training_state(latest, map_location=ctx.device)
        saved = state.get("config", {})
        for key in ("init_model", "num_sources", "group_size", "kappa", "rewards", "baseline"):
            if key in saved and saved[key] != to_mapping(config)[key]:
                raise MarsctlError(f"{run_dir}: cannot resume, '{key}' differs from the checkpoint's; use a new --out or --no-resume")
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(latest / "model.safetensors"), device=str(ctx.device)))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        if baseline is not None and state.get("baseline") is not None:
            baseline.load_state_dict(state["baseline"])
        start_step = int(state["step"])
        history = list(state.get("history", []))
        say(f"resuming from {latest} (step {start_step})")

    train_model: torch.nn.Module = model
    if ctx.enabled:
        train_model = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)

    dataset = EpochIndexedDataset(mixing_dataset(dataset_dir, "train", signal, config.num_sources, seed=config.seed))
    sampler = StepBatchSampler(len(dataset), config.batch_size, config.seed, start_step, config.max_steps, ctx.rank, ctx.world_size)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=config.num_workers, persistent_workers=False)
    query_config = SupervisedConfig(data=config.data, signal=signal, query_modalities=config.query_modalities, query_mixup=config.query_mixup)
    queries = QueryBuilder(encoder, query_config, dataset_dir)
    val_set = fixed_mixtures(dataset_dir, config.val_split, signal, config.val_mixtures, config.num_sources) if ctx.is_main else []
    use_bf16 = config.bf16 and ctx.device.type == "cuda"
    last_val: float | None = next((h["val_si_sdri"] for h in reversed(history) if "val_si_sdri" in h), None)
    anchor_source: str | None = None

    writer = SummaryWriter(str(run_dir / "tensorboard")) if ctx.is_main else None
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "train_config.json", to_mapping(config))
        write_text_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))

    def save_artifact(directory: Path, step: int) -> None:
        extra = {"training": {"stage": "rl", **to_mapping(config), "encoder": encoder_spec, "step": step, "last_val_si_sdri_db": last_val}}
        save_separator(model, directory, encoder=encoder_spec, extra=extra, card=_model_card(config, step, last_val, anchor_source))

    def save_checkpoint(step: int) -> None:
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": ckpt.rng_state(),
            "baseline": baseline.state_dict() if baseline is not None else None,
            "history": history,
            "config": to_mapping(config),
        }
        ckpt.save_checkpoint(run_dir, step, lambda d: save_artifact(d, step), state, keep=config.keep_checkpoints)

    progress_bar = None
    if ctx.is_main and progress:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        progress_bar = Progress(
            TextColumn("[bold]train rl"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
        )
        progress_bar.start()
        task = progress_bar.add_task("train", total=config.max_steps, completed=start_step, status="")

    if ctx.is_main and start_step == 0 and val_set:
        # the starting point, so that the curve of every validation metric begins at step 0
        metrics = validate(model, val_set, queries, ctx.device)
        model.eval()
        last_val = metrics["si_sdri"]
        val_reward = validation_reward(model, val_set, queries, reward_model, config.group_size, ctx.device, config.seed)
        history.append({"step": 0, "val_si_sdri": last_val, **{f"val_{k}": v for k, v in val_reward.items()}})
        with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as log_file:
            log_file.write(json.dumps(history[-1]) + "\n")
        for key, value in history[-1].items():
            if key != "step":
                writer.add_scalar(f"val/{key.removeprefix('val_')}", value, 0)

    step = start_step
    try:
        for step, batch in enumerate(loader, start=start_step + 1):
            step_start = time.perf_counter()
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step * 9_973 + ctx.rank)
            all_queries = queries(batch, generator)  # [B, S, D]
            num_items, num_sources = all_queries.shape[:2]
            target_index = torch.randint(num_sources, (num_items,), generator=generator)  # which source each mixture targets
            rows = torch.arange(num_items)
            query = all_queries[rows, target_index].to(ctx.device)  # q_b [B, D]
            target = batch["sources"][rows, target_index].to(ctx.device)  # [B, T], as in the mix
            labels = [item[int(i)] for item, i in zip(batch["labels"], target_index)]
            mixture = batch["mixture"].to(ctx.device)  # x_b [B, T]
            update = rl_update(
                model, train_model, reference, reward_model, optimizer, config, mixture, query, target, labels,
                sample_seed=config.seed * 1_000_003 + step * 9_973 + ctx.rank + 1, device=ctx.device, use_bf16=use_bf16,
                baseline=baseline, all_reduce_mean=ctx.all_reduce_mean,
            )
            samples, rewards, advantages, epoch_stats = update.samples, update.samples.rewards, update.advantages, update.epoch_stats
            anchor_source = samples.anchor_source or anchor_source
            scheduler.step()
            if ctx.device.type == "cuda":
                torch.cuda.synchronize(ctx.device)
            step_seconds = time.perf_counter() - step_start

            record: dict[str, Any] = {}
            if step % config.log_every == 0 or step == config.max_steps:
                record = {
                    "step": step,
                    "reward_mean": ctx.all_reduce_mean(float(rewards.mean())),
                    "reward_std": ctx.all_reduce_mean(float(rewards.std())),
                    **{f"reward/{name}": ctx.all_reduce_mean(float(value.mean())) for name, value in samples.terms.items()},
                    "advantage_mean": float(advantages.mean()),
                    "advantage_std": float(advantages.std()),
                    "advantage_min": float(advantages.min()),
                    "advantage_max": float(advantages.max()),
                    # the first epoch's stats are at sampling time; the last epoch's show how far the policy moved
                    **{k: ctx.all_reduce_mean(v) for k, v in epoch_stats[-1].items()},
                    "entropy": ctx.all_reduce_mean(epoch_stats[0]["entropy"]),
                    "lr": scheduler.get_last_lr()[0],
                    "step_time_s": step_seconds,
                    "reward_time_share": samples.reward_seconds / step_seconds,
                }
                if baseline is not None:
                    record["baseline"] = baseline.value
            if ctx.is_main and (step % config.val_every == 0 or step == config.max_steps) and val_set:
                metrics = validate(model, val_set, queries, ctx.device)
                model.eval()  # validate() puts the model back in train mode; RL keeps BatchNorm frozen
                last_val = metrics["si_sdri"]
                val_reward = validation_reward(model, val_set, queries, reward_model, config.group_size, ctx.device, config.seed)
                record = {**record, "step": step, "val_si_sdri": last_val, **{f"val_{k}": v for k, v in val_reward.items()}}
            if ctx.is_main and record:
                history.append(record)
                with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as log_file:
                    log_file.write(json.dumps(record) + "\n")
                for key, value in record.items():
                    if key != "step" and value is not None:
                        name = f"val/{key.removeprefix('val_')}" if key.startswith("val_") else f"train/{key}"
                        writer.add_scalar(name, value, step)
                if progress_bar is not None and "reward_mean" in record:
                    shown = (
                        f"R {record['reward_mean']:+.3f}±{record['reward_std']:.3f}  H {record['entropy']:+.3f}  "
                        f"KLref {record['kl_ref']:.4f}  clip {record['clip_fraction']:.2f}  "
                        f"{record['step_time_s']:.2f}s/step (reward {100 * record['reward_time_share']:.0f}%)"
                    )
                    if last_val is not None:
                        shown += f"  val SI-SDRi {last_val:.2f} dB"
                    progress_bar.update(task, status=shown)
            if ctx.is_main and (step % config.checkpoint_every == 0 or step == config.max_steps):
                save_checkpoint(step)
                save_artifact(run_dir, step)  # the run directory is the latest policy
            if progress_bar is not None:
                progress_bar.update(task, completed=step)
            if on_step_end is not None:
                on_step_end(step)
    finally:
        if progress_bar is not None:
            progress_bar.stop()
        if writer is not None:
            writer.close()
    if ctx.is_main:
        write_json_atomic(run_dir / "history.json", history)
    ctx.barrier()
    ctx.close()
    return RLResult(model=model, run_dir=run_dir, step=step, history=history)
