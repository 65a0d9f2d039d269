"""The settings of ``marsctl train rl`` (``recipes/train/rl*.yaml`` fill them)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

from marsctl.config import load_recipe, setting
from marsctl.data.augment import AugmentConfig
from marsctl.errors import ConfigError
from marsctl.rl.advantages import DEFAULT_BASELINE_BETA, DEFAULT_EPS
from marsctl.rl.losses import DEFAULT_CLIP_EPS, DEFAULT_ENTROPY_COEF, DEFAULT_KL_COEF, SURROGATES
from marsctl.rl.rewards import RewardConfig
from marsctl.train.loop_config import TrainingLoopConfig, resolve_recipe_paths

BASELINES = ("group", "moving_average")
#: how the gradient of E_{M ~ pi_theta}[R(M)] is estimated (see RLConfig.estimator)
ESTIMATORS = ("score_function", "pathwise")
ESTIMATOR_SUMMARY = {
    "score_function": "clipped surrogate on bin-averaged ratios, group-relative advantages",
    "pathwise": "pathwise gradient of the expected reward through reparameterized Beta masks",
}
#: settings that change what a step computes: a run resumes only when they equal the checkpoint's
RESUME_KEYS = (
    "init_model", "num_sources", "group_size", "kappa", "rewards", "baseline", "baseline_beta", "estimator", "surrogate",
    "ppo_epochs", "clip_eps", "entropy_coef", "kl_coef", "advantage_eps",
)


@dataclasses.dataclass(frozen=True)
class RLConfig(TrainingLoopConfig):
    """Everything ``marsctl train rl`` needs.

    The shared loop settings are :class:`~marsctl.train.loop_config.TrainingLoopConfig`'s;
    the defaults that differ from supervised training are redeclared here."""

    #: the starting separator (a ``marsctl train sup`` run directory or Hub id); also pi_ref
    init_model: str = ""
    #: per-file queries (CSV/TSV/JSON, the format of ``marsctl separate --queries``): ``data`` is
    #: then a plain folder of mixtures, fine-tuned with reference-free reward terms only
    #: (:mod:`marsctl.rl.folder_data`); empty = ``data`` is a ``marsctl data build`` dataset
    queries: str = ""
    #: query encoder spec; empty = the one the starting separator was trained with
    encoder: str = ""
    #: frozen reward encoder spec (an aligned encoder directory); empty = the query encoder
    reward_encoder: str = ""
    #: an independent judge encoder (any encoder spec: an aligned encoder directory, builtin,
    #: laion-clap:NAME, a Hub id); empty = none. When set, each validation also logs
    #: ``val_judge_score`` (mean 100 x cos(label text, mode-mask estimate audio) by the judge)
    #: beside ``val_reward``, and warns when the reward rose while the judge's score fell
    #: (marsctl.rl.judge.reward_hacking_warning). Refused when it has the reward encoder's weights.
    judge: str = ""
    batch_size: int = 4
    #: G: masks sampled per mixture from one forward pass
    group_size: int = setting(8, ge=2)
    #: K: optimization epochs per rollout batch (the old policy is fixed at sampling time)
    ppo_epochs: int = setting(1, ge=1)
    max_steps: int = 2000
    learning_rate: float = 2e-4
    warmup_steps: int = 50
    #: Beta concentration kappa of the RL policy (alpha = 1 + kappa P, beta = 1 + kappa (1 - P));
    #: None keeps the starting separator's. The mode (= P, what ``separate`` deploys) does not
    #: depend on kappa; a larger kappa samples masks closer to it. Saved with the fine-tuned model.
    kappa: float | None = setting(None, gt=0)
    #: epsilon of clip(r, 1 - eps, 1 + eps)
    clip_eps: float = setting(DEFAULT_CLIP_EPS, gt=0, lt=1)
    #: "bin_mean" clips the bin-averaged ratio (the paper); "per_bin" clips each bin's ratio and
    #: then averages (token-level PPO). Identical when ppo_epochs = 1; see marsctl.rl.losses.
    surrogate: str = setting("bin_mean", choices=SURROGATES)
    #: "pathwise" (the default): the reparameterized gradient of the expected reward,
    #: d/dtheta mean_g R(M_g(theta)) with M_g = BetaMaskPolicy.rsample; needs every weighted reward term
    #: differentiable in the estimate (si_sdr and energy_guard are; the semantic terms are when the
    #: reward encoder computes its audio embedding with gradients). "score_function": the paper's
    #: PPO clipped surrogate on log-probability ratios (REINFORCE with group-relative advantages;
    #: any reward). Over the ~3·10^4 independent Beta bins of a 2 s clip the score-function
    #: gradient is close to noise (BENCHMARKS.md section 5, bench/rl_gradient_quality.py).
    estimator: str = setting("pathwise", choices=ESTIMATORS)
    #: lambda_H (entropy bonus). The paper's 0.1 is the default; note that with per-bin means for
    #: both the ratio and the entropy, the entropy gradient is coherent over bins while the policy
    #: gradient is not: in 25-step CPU runs on the test tones 0.1 pulled the masks toward 0.5
    #: (validation reward 0.883 -> 0.752), 0.01 and 0 let it rise (-> 0.891, -> 0.913).
    entropy_coef: float = setting(DEFAULT_ENTROPY_COEF, ge=0)
    #: lambda_KL (KL to the frozen starting policy); a negative one would push the policy away from it
    kl_coef: float = setting(DEFAULT_KL_COEF, ge=0)
    #: eps in (R - mean) / (std + eps)
    advantage_eps: float = setting(DEFAULT_EPS, gt=0)
    #: "group" (GRPO: centre on the group mean) or "moving_average" (the paper's option)
    baseline: str = setting("group", choices=BASELINES)
    baseline_beta: float = setting(DEFAULT_BASELINE_BETA, ge=0, lt=1)
    #: a :class:`~marsctl.rl.rewards.RewardConfig`; recipes give ``rewards: {term: weight, ...}``
    rewards: Any = dataclasses.field(default_factory=RewardConfig)
    val_every: int = 100
    val_mixtures: int = 32
    checkpoint_every: int = 100
    log_every: int = 1
    #: augmentation of the training mixtures of a dataset (:mod:`marsctl.data.augment`); all off by default
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.queries and self.augment.enabled:
            raise ConfigError("augment: applies to the mixtures drawn from a dataset; train rl --queries trains on a folder's own mixtures")
        if isinstance(self.rewards, Mapping):
            object.__setattr__(self, "rewards", RewardConfig.from_recipe(self.rewards))
        elif not isinstance(self.rewards, RewardConfig):
            raise ConfigError(f"rewards must be a mapping of reward term names to weights, got {self.rewards!r}")
        if self.estimator == "pathwise" and self.baseline == "moving_average":
            raise ConfigError("baseline 'moving_average' belongs to the score_function estimator; the pathwise gradient uses no baseline")


#: settings that name files or folders (relative ones in a recipe are looked up next to it first)
PATH_KEYS = ("init_model", "data", "encoder", "reward_encoder", "judge", "queries")


def load_rl_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RLConfig:
    """A recipe YAML (or the defaults) with command-line overrides (``None`` values ignored).

    Relative paths in the recipe are looked up next to it first (:func:`resolve_recipe_paths`);
    ``init_model: default`` is the small separator shipped with marsctl."""
    try:
        config = load_recipe(RLConfig, path, overrides, where="train rl")
    except ConfigError as exc:
        if path is not None and not str(exc).startswith(str(path)):
            raise ConfigError(f"{path}: {exc}") from None
        raise
    config = resolve_recipe_paths(config, path, PATH_KEYS, overrides)
    if config.init_model == "default":
        from marsctl.pretrained import DEFAULT_SEPARATOR_DIR

        config = dataclasses.replace(config, init_model=str(DEFAULT_SEPARATOR_DIR))
    return config
