"""An independent judge during RL validation, and the reward-hacking warning.

RL maximises the reward encoder's score, so a rising validation reward alone cannot tell
better separation from estimates that merely please that encoder. With ``judge`` set in the
RL config (any encoder spec; refused when it has the reward encoder's weights), every
validation also computes the judge's score of the deployed (mode-mask) estimates:
100 x cos(text embedding of each source's label, audio embedding of its estimate), the mean
over every source of the fixed validation mixtures, logged as ``val_judge_score`` next to
``val_reward``. :func:`reward_hacking_warning` compares the latest validation with the
previous one and with the first: when the reward rose by more than ``REWARD_TOLERANCE`` while
the judge's score fell by more than ``JUDGE_TOLERANCE``, the trainer logs a one-line warning
and sets ``val_reward_hacking`` to 1 in ``metrics.jsonl`` (0 otherwise).

On labelled data the references give a second witness that needs no judge: validation SI-SDRi
(:class:`SiSdriWitness`). A reward that rises while it falls by more than ``SI_SDRI_TOLERANCE``
dB is warned about the same way, judge or not: a judge aligned on the same data can share the reward
encoder's taste and rise with it.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import torch

from marsctl.errors import ConfigError
from marsctl.models.encoder_base import QueryEncoder
from marsctl.models.judge import TextAudioScorer, encoder_fingerprint
from marsctl.train.validation import finite_mean, mode_estimates

#: a rise of the validation reward (in reward units) larger than this counts as "rose"
REWARD_TOLERANCE = 0.01
#: a drop of the judge's score (100 x cosine, so points out of 100) larger than this counts as "fell"
JUDGE_TOLERANCE = 0.5
#: a drop of validation SI-SDRi (dB) larger than this counts as "fell"
SI_SDRI_TOLERANCE = 0.25
REWARD_KEY, JUDGE_KEY, FLAG_KEY = "val_reward", "val_judge_score", "val_reward_hacking"
SI_SDRI_KEY = "val_si_sdri"


def _finite(record: Mapping[str, Any], key: str) -> bool:
    value = record.get(key)
    return isinstance(value, (int, float)) and math.isfinite(value)


def reward_hacking_warning(history: Sequence[Mapping[str, Any]], reward_tolerance: float = REWARD_TOLERANCE,
                           judge_tolerance: float = JUDGE_TOLERANCE, witness_key: str = JUDGE_KEY,
                           witness: str = "the judge's score") -> str | None:
    """One line when, at the latest validation of ``history`` (records with ``val_reward`` and
    ``witness_key``, by default ``val_judge_score``; others are skipped), the reward rose by more
    than ``reward_tolerance`` while the witness fell by more than ``judge_tolerance``, since the
    previous validation or since the first one; None otherwise (also with fewer than two validations)."""
    validations = [h for h in history if _finite(h, REWARD_KEY) and _finite(h, witness_key)]
    if len(validations) < 2:
        return None
    last = validations[-1]
    references = [("the previous validation", validations[-2])]
    if len(validations) > 2:
        references.append(("the start", validations[0]))
    for name, before in references:
        reward_change = last[REWARD_KEY] - before[REWARD_KEY]
        judge_change = last[witness_key] - before[witness_key]
        if reward_change > reward_tolerance and judge_change < -judge_tolerance:
            where = f"step {before['step']}, " if before.get("step") is not None else ""
            at = f" at step {last['step']}" if last.get("step") is not None else ""
            return (f"possible reward hacking{at}: since {where}{name}, "
                    f"the validation reward rose {before[REWARD_KEY]:.3f} -> {last[REWARD_KEY]:.3f} while {witness} "
                    f"fell {before[witness_key]:.2f} -> {last[witness_key]:.2f}")
    return None


class HackingWitness:
    """One witness of reward hacking: the validations' ``val_reward`` against another validation
    metric (``key``) that should not fall while the reward rises; :func:`reward_hacking_warning`
    over the run's validations, kept across resumes through the loop's history."""

    def __init__(self, key: str, tolerance: float, description: str, log: Callable[[str], None] | None = None,
                 suffix: str = ""):
        self.key, self.tolerance, self.description, self.suffix = key, tolerance, description, suffix
        self.log = log or (lambda message: None)
        #: the validations so far: {"step", "val_reward", key}
        self.history: list[dict[str, Any]] = []

    def validate(self, step: int | None, metrics: Mapping[str, Any]) -> bool:
        """Record this validation (``val_reward`` and the witness's key in ``metrics``); True (and one
        logged line) when the reward rose while the witness fell beyond the tolerance."""
        if not (_finite(metrics, REWARD_KEY) and _finite(metrics, self.key)):
            return False
        self.history.append({"step": step, REWARD_KEY: metrics[REWARD_KEY], self.key: metrics[self.key]})
        warning = reward_hacking_warning(self.history, judge_tolerance=self.tolerance, witness_key=self.key,
                                         witness=self.description)
        if warning:
            self.log(f"warning: {warning}{self.suffix}")
        return warning is not None

    def load_history(self, history: Sequence[Mapping[str, Any]]) -> None:
        self.history = [{"step": h.get("step"), REWARD_KEY: h[REWARD_KEY], self.key: h[self.key]}
                        for h in history if _finite(h, REWARD_KEY) and _finite(h, self.key)]


class SiSdriWitness(HackingWitness):
    """The reference-based witness: validation SI-SDRi (dB), on labelled data, judge or not."""

    def __init__(self, log: Callable[[str], None] | None = None, tolerance: float = SI_SDRI_TOLERANCE):
        super().__init__(SI_SDRI_KEY, tolerance, "validation SI-SDRi (dB)", log)


@torch.no_grad()
def validation_judge_score(model, mixtures, queries, scorer: Callable, device: torch.device,
                           estimates: list[torch.Tensor] | None = None) -> float:
    """Mean judge score of the mode-mask estimates of every source of the fixed ``mixtures``
    (:func:`marsctl.train.validation.mode_estimates`, or ``estimates`` when the caller has them)."""
    if estimates is None:
        estimates = mode_estimates(model, mixtures, queries, device)
    return finite_mean([scorer(fixed.labels, estimate) for fixed, estimate in zip(mixtures, estimates)])[0]


class RLJudge:
    """The judge of an RL run: scores validations, keeps their history, warns (see the module docstring)."""

    def __init__(self, spec: str, encoder: QueryEncoder, sample_rate: int, log: Callable[[str], None] | None = None):
        self.spec, self.encoder = spec, encoder
        self.scorer = TextAudioScorer(encoder, sample_rate)
        self.fingerprint = encoder_fingerprint(encoder)
        self.log = log or (lambda message: None)
        self.witness = HackingWitness(JUDGE_KEY, JUDGE_TOLERANCE, "the judge's score", self.log, suffix=f" (judge {spec})")

    @property
    def history(self) -> list[dict[str, Any]]:
        """The validations so far: {"step", "val_reward", "val_judge_score"}."""
        return self.witness.history

    @history.setter
    def history(self, value: list[dict[str, Any]]) -> None:
        self.witness.history = value

    @classmethod
    def load(cls, spec: str, reward_encoder: QueryEncoder, sample_rate: int, device: str | torch.device,
             log: Callable[[str], None] | None = None) -> "RLJudge":
        """Load the judge ``spec``; refused when it has the reward encoder's weights."""
        from marsctl.models.encoders import load_encoder

        judge = cls(spec, load_encoder(spec, device=device), sample_rate, log)
        if judge.fingerprint == encoder_fingerprint(reward_encoder):
            raise ConfigError(f"judge {spec}: same weights as the reward encoder, so not an independent judge; "
                              "give another encoder or leave judge empty")
        return judge

    def validate(self, model, mixtures, queries, device: torch.device, step: int | None, metrics: Mapping[str, Any],
                 estimates: list[torch.Tensor] | None = None) -> dict[str, float]:
        """``val_judge_score`` and ``val_reward_hacking`` (1.0 when :func:`reward_hacking_warning`
        fires, which is logged) for this validation, whose other ``metrics`` hold ``val_reward``;
        ``estimates``: the validation's mode-mask estimates, when already separated."""
        score = validation_judge_score(model, mixtures, queries, self.scorer, device, estimates)
        warned = self.witness.validate(step, {REWARD_KEY: metrics.get(REWARD_KEY), JUDGE_KEY: score})
        return {JUDGE_KEY: score, FLAG_KEY: 1.0 if warned else 0.0}

    def state_dict(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint}

    def load_state_dict(self, state: Mapping[str, Any] | None, history: Sequence[Mapping[str, Any]]) -> None:
        """On resume: the checkpoint's validations count when they were judged by the same encoder."""
        if state and state.get("fingerprint") == self.fingerprint:
            self.witness.load_history(history)
        else:
            self.witness.load_history([])
            if any(JUDGE_KEY in h for h in history):
                self.log(f"judge {self.spec} differs from the checkpoint's: the reward-hacking check starts over")
