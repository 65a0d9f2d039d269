"""``marsctl train rl``: MARS-Sep fine-tuning of a supervised separator as a Beta mask policy.

Per step and process, for ``B`` mixtures of the training split (dynamic mixing):

    q_b            query of the target source b (text by default; Query-Mixup over modalities)
    rl_update      one forward pass, G sampled masks, rewards, advantages, K optimizer steps
                   (marsctl.rl.update, one equation per line; the rollout in marsctl.rl.rollout)

``pi_ref`` is the frozen starting (supervised) separator. The separator runs with its
BatchNorm layers in inference mode (running statistics frozen), so the optimized policy is
exactly the one ``marsctl separate`` deploys and KL(pi_theta || pi_ref) is 0 at step 0. The
policy's concentration is ``RLConfig.kappa`` (default: the starting separator's); it is saved
with the fine-tuned model.

The target of each mixture is one of its sources, drawn from a generator seeded by
(seed, step, rank) so that a resumed run draws the same targets; the masks come from another
seed of the same step (:func:`marsctl.train.loop.step_seed`). Checkpoints, exact resume, the
validation cadence, logging, DDP and the progress bar are the shared training loop's
(:mod:`marsctl.train.loop`). The run directory's artifact is the *latest* policy (written at
each checkpoint): RL optimizes the reward, so selecting by validation SI-SDRi (which is logged)
would quietly undo it.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from marsctl.config import to_mapping
from marsctl.errors import MarsctlError
from marsctl.models.encoder_base import QueryEncoder
from marsctl.models.separator import Separator, load_separator, save_separator
from marsctl.queries import QueryBuilder
from marsctl.rl.advantages import MovingAverageBaseline
from marsctl.rl.config import ESTIMATOR_SUMMARY, RESUME_KEYS, RLConfig, load_rl_config
from marsctl.rl.judge import FLAG_KEY, RLJudge, SiSdriWitness
from marsctl.rl.rewards import reward_functions
from marsctl.rl.rollout import RewardModel, validation_reward
from marsctl.rl.update import rl_update
from marsctl.train.distributed import DistributedContext, bf16_autocast
from marsctl.train.loop import Scores, require_dataset, run_training, step_seed
from marsctl.recorded_paths import portable_config
from marsctl.train.safety import check_finite_step
from marsctl.train.validation import mode_estimates, validation_si_sdri

__all__ = ["RLConfig", "RLResult", "load_rl_config", "train_rl"]


@dataclasses.dataclass
class RLResult:
    model: Separator
    run_dir: Path
    step: int
    history: list[dict[str, Any]]


class RLTask:
    """The RL step, validation and artifact for :func:`marsctl.train.loop.run_training`."""

    title = "train rl"
    resume_keys = RESUME_KEYS
    validate_at_start = True
    artifact = "latest"

    def __init__(self, config: RLConfig, model: Separator, reference: Separator, encoder: QueryEncoder, encoder_spec: str,
                 reward_model: RewardModel, dataset_dir: Path, ctx: DistributedContext, judge: RLJudge | None = None,
                 log: Callable[[str], None] | None = None, known_labels: Sequence[str] = ()):
        self.config, self.model, self.reference, self.ctx = config, model, reference, ctx
        self.known_labels = list(known_labels)  # the classes the saved policy knows (config.json "labels")
        self.judge, self.step = judge, 0  # the independent judge of validations (config.judge), the latest step
        self.si_sdri_witness = SiSdriWitness(judge.log if judge is not None else log)  # reward up, SI-SDRi down: warned
        self.encoder_spec, self.reward_model = encoder_spec, reward_model
        self.signal = model.config.signal
        #: the policy's Beta concentration (a policy setting: the loaded architecture is not edited)
        self.kappa = float(config.kappa) if config.kappa is not None else model.config.kappa
        self.queries = QueryBuilder(encoder, dataset_dir, self.signal.sample_rate, config.query_modalities, config.query_mixup)
        self.baseline = MovingAverageBaseline(config.baseline_beta) if config.baseline == "moving_average" else None
        self.use_bf16 = bf16_autocast(config.bf16, ctx.device)  # hardware bf16 only (logged by the loop)
        self.anchor_source: str | None = None

    def train_step(self, step: int, batch: dict[str, Any], train_model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   log: bool) -> dict[str, Any]:
        config, ctx = self.config, self.ctx
        started, self.step = time.perf_counter(), step
        generator = torch.Generator().manual_seed(step_seed(config.seed, step, ctx.rank, 0, ctx.world_size))
        mixture, query, target, labels = self.step_inputs(batch, generator)
        update = rl_update(
            self.model, train_model, self.reference, self.reward_model, optimizer, config, mixture, query,
            target, labels, sample_seed=step_seed(config.seed, step, ctx.rank, 1, ctx.world_size), device=ctx.device,
            use_bf16=self.use_bf16, baseline=self.baseline, all_reduce_mean=ctx.all_reduce_mean, kappa=self.kappa,
            diagnostics=log,  # the score-function's after-update forward pass, for logged steps only
        )
        samples, advantages, epoch_stats = update.samples, update.advantages, update.epoch_stats
        # a NaN/Inf loss gives a non-finite gradient norm (the same on every rank: DDP averaged the
        # gradients); the run stops here, before anything of this step is checkpointed or saved
        norms = torch.stack([torch.as_tensor(e["grad_norm"], dtype=torch.float32) for e in epoch_stats]).tolist()
        check_finite_step(step, {f"gradient norm (PPO epoch {k + 1})": value for k, value in enumerate(norms)})
        self.anchor_source = samples.anchor_source or self.anchor_source
        if not log:
            return {}
        rewards = samples.rewards
        values = {
            "reward_mean": rewards.mean(),
            "reward_std": rewards.std(),
            **{f"reward/{name}": value.mean() for name, value in samples.terms.items()},
            **{f"reward_std/{name}": value.std() for name, value in samples.terms.items()},
            # groups whose G rewards are all equal carry no signal under group-relative advantages
            "zero_spread_groups": (rewards.float().std(dim=0) == 0).float().mean(),
            "advantage_mean": advantages.mean(),
            "advantage_std": advantages.std(),
            "advantage_min": advantages.min(),
            "advantage_max": advantages.max(),
            # the first epoch's stats are at sampling time; the last epoch's, and the ratios after the
            # update (score_function), show how far the policy moved
            **epoch_stats[-1],
            **update.after_update,
            "entropy": epoch_stats[0]["entropy"],
        }
        # averaged over the ranks with one all-reduce of the stacked values (the advantages: this
        # rank's), copied to the host once
        local = ("advantage_mean", "advantage_std", "advantage_min", "advantage_max")
        means = ctx.mean_metrics({k: v for k, v in values.items() if k not in local}, {k: values[k] for k in local})
        record = {k: means[k] for k in values}
        record["reward_time_share"] = samples.reward_seconds / (time.perf_counter() - started)
        if self.baseline is not None:
            record["baseline"] = self.baseline.value
        return record

    def step_inputs(self, batch: dict[str, Any], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list[str]]:
        """x_b ``[B, T]``, q_b ``[B, D]``, the target ``[B, T]`` (None without references) and the labels of
        a step's B mixtures, drawing from ``generator`` (the step's stream 0)."""
        device = self.ctx.device
        all_queries = self.queries.batch(batch, generator)  # [B, S, D]
        num_items, num_sources = all_queries.shape[:2]
        target_index = torch.randint(num_sources, (num_items,), generator=generator)  # which source each mixture targets
        rows = torch.arange(num_items)
        query = all_queries[rows, target_index.to(all_queries.device)].to(device, non_blocking=True)  # q_b [B, D]
        target = batch["sources"][rows, target_index].to(device, non_blocking=True)  # [B, T], as in the mix
        labels = [item[i] for item, i in zip(batch["labels"], target_index.tolist())]  # CPU indices: no device sync
        return batch["mixture"].to(device, non_blocking=True), query, target, labels  # x_b [B, T]

    def validate(self, val_set: list) -> dict[str, float]:
        estimates = mode_estimates(self.model, val_set, self.queries, self.ctx.device)  # separated once, scored twice
        metrics = validation_si_sdri(self.model, val_set, self.queries, self.ctx.device, estimates)
        rewards = validation_reward(self.model, val_set, self.queries, self.reward_model, self.config.group_size, self.ctx.device,
                                    self.config.seed, kappa=self.kappa)
        out = {"val_si_sdri": metrics["si_sdri"], **{f"val_{k}": v for k, v in rewards.items()}}
        hacking = self.si_sdri_witness.validate(self.step, out)
        if self.judge is not None:  # val_judge_score beside val_reward, and the reward-hacking flag
            out.update(self.judge.validate(self.model, val_set, self.queries, self.ctx.device, self.step, out, estimates))
            hacking = hacking or out[FLAG_KEY] == 1.0
        out[FLAG_KEY] = 1.0 if hacking else 0.0
        return out

    def save_artifact(self, directory: Path, step: int, scores: Scores) -> None:
        config = portable_config(self.config, directory)  # paths relative to the artifact, Hub ids or ~/...
        extra = {
            # the policy setting kappa travels with the fine-tuned model
            "separator": {**to_mapping(self.model.config), "kappa": self.kappa},
            "training": {"stage": "rl", **to_mapping(config), "encoder": self.encoder_spec, "step": step, "last_val_si_sdri_db": scores.last},
            **({"labels": self.known_labels} if self.known_labels else {}),
        }
        save_separator(self.model, directory, encoder=self.encoder_spec, extra=extra, card=self.card(step, scores, config))

    def card(self, step: int, scores: Scores, config: RLConfig | None = None) -> str:
        """The model card (README.md) of the artifact at ``step`` (``config``: the settings as recorded, with
        portable paths; the run's own by default)."""
        return _model_card(config or self.config, step, scores.last, self.anchor_source)

    def state_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline.state_dict() if self.baseline is not None else None,
                "judge": self.judge.state_dict() if self.judge is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.baseline is not None and state.get("baseline") is not None:
            self.baseline.load_state_dict(state["baseline"])
        self.si_sdri_witness.load_history(state.get("history", []))
        if self.judge is not None:
            self.judge.load_state_dict(state.get("judge"), state.get("history", []))

    def status(self, record: dict[str, Any], scores: Scores) -> str | None:
        if "reward_mean" not in record:
            return None
        shown = (
            f"R {record['reward_mean']:+.3f}±{record['reward_std']:.3f}  H {record['entropy']:+.3f}  KLref {record['kl_ref']:.4f}  "
            f"{record['step_time_s']:.2f}s/step (reward {100 * record['reward_time_share']:.0f}%)"
        )
        return shown + (f"  val SI-SDRi {scores.last:.2f} dB" if scores.last is not None else "")


def _model_card(config: RLConfig, step: int, val: float | None, anchor_source: str | None) -> str:
    weights = ", ".join(f"{k} {v:g}" for k, v in config.rewards.weights.items())
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
    ctx = DistributedContext.from_env(device)
    say = (log or (lambda message: None)) if ctx.is_main else (lambda message: None)
    if config.queries:  # a plain folder of mixtures: reference-free reward terms only, checked before anything loads
        from marsctl.rl.folder_data import check_folder_config, folder_task

        check_folder_config(config)
    dataset_dir = Path(config.data) if config.queries else require_dataset(config.data)
    if not config.init_model:
        raise MarsctlError("train rl needs a starting separator: --init-model (a 'marsctl train sup' run directory)")
    start = load_separator(config.init_model, device=ctx.device)
    model = start.model
    reference = load_separator(config.init_model, device=ctx.device).model.eval().requires_grad_(False)  # pi_ref, frozen
    if not config.queries:
        from marsctl.data.manifest import CLIPS_MANIFEST

        if not (dataset_dir / CLIPS_MANIFEST).is_file():
            raise MarsctlError(f"{dataset_dir}: not a 'marsctl data build' dataset (no {CLIPS_MANIFEST}); "
                               "for a plain folder of mixtures, give --queries FILE")
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
    reward_model = RewardModel(reward_encoder, reward_functions(config.rewards), model.config.signal,
                               same_space_as_queries=reward_encoder is encoder, segments=config.rewards.segments, config=config.rewards)
    if getattr(reward_encoder, "anchor_fusion", None) is None and not config.queries:  # a folder has no semantic_anchor
        say("reward encoder has no anchor module (not aligned): semantic_anchor uses the query as z*")
    torch.manual_seed(config.seed + ctx.rank)
    model.eval()  # BatchNorm in inference mode: the optimized policy is the deployed one (see the docstring)
    # the judge scores validations, which rank 0 alone runs: the other ranks do not load it
    judge = RLJudge.load(config.judge, reward_encoder, model.config.signal.sample_rate, ctx.device, say) if config.judge and ctx.is_main else None
    known_labels = [str(label) for label in start.config.get("labels") or []]  # what the start was trained on
    if config.queries:  # reference-free RL on a folder refines known classes; it does not teach new ones (docs/results.md)
        task = folder_task(config, model, reference, encoder, encoder_spec, reward_encoder, ctx, say, known_labels)
    else:
        from marsctl.data.manifest import training_labels

        known_labels = sorted(set(known_labels) | set(training_labels(dataset_dir)))
        task = RLTask(config, model, reference, encoder, encoder_spec, reward_model, dataset_dir, ctx, judge=judge, log=say,
                      known_labels=known_labels)
    result = run_training(task, config, run_dir, ctx, resume=resume, progress=progress, on_step_end=on_step_end, log=say)
    return RLResult(model=model, run_dir=Path(run_dir), step=result.step, history=result.history)
