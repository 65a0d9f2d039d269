"""Group-relative advantages (GRPO) with MARS-Sep's optional moving-average baseline.

Rewards come as ``[G, B]``: ``G`` masks sampled from one policy forward pass for each of ``B``
mixtures (a *group* is one column). Without a baseline (the default)::

    A_{g,b} = (R_{g,b} - mean_g R_{:,b}) / (std_g R_{:,b} + eps)                      (GRPO)

With the moving-average baseline (the paper's option, beta = 0.92) the group mean is
replaced by a running mean of past rewards, and the scale is the spread of the whole batch::

    A_{g,b} = (R_{g,b} - b_{t-1}) / (std_{g,b} R + eps)
    b_t     = beta * b_{t-1} + (1 - beta) * mean(R)          (b_0 = mean of the first batch)

(Centering by the group mean after subtracting a constant baseline would cancel the
baseline, so with the option the baseline *is* the centering.) Dividing by the *group's*
spread instead would blow up the advantages of an easy group, whose G rewards are nearly
equal but far from the global baseline (about 1650 was seen). ``std`` is the unbiased
sample standard deviation, as in TRL's GRPO trainer.
"""

from __future__ import annotations

import dataclasses

import torch

DEFAULT_EPS = 1e-4
DEFAULT_BASELINE_BETA = 0.92


def group_relative_advantages(rewards: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """``[G, B]`` rewards -> ``[G, B]`` advantages, normalized within each group (column).

    Segment rewards ``[G, B, K]`` are normalized within each (mixture, segment) over the group."""
    if rewards.ndim < 2 or rewards.shape[0] < 2:
        raise ValueError(f"rewards must be [G, B] or [G, B, K] with a group size G >= 2, got {tuple(rewards.shape)}")
    rewards = rewards.float()
    std_g = rewards.std(dim=0, keepdim=True)  # std_g R_{:,b} (unbiased)
    return (rewards - rewards.mean(dim=0, keepdim=True)) / (std_g + eps)  # A = (R - mean_g R) / (std_g R + eps)


def zero_spread_fraction(rewards: torch.Tensor) -> float:
    """The fraction of groups (columns of ``[G, B]``, or (mixture, segment) of ``[G, B, K]``) whose G
    rewards are all equal: they carry no learning signal under group-relative advantages."""
    return float((rewards.float().std(dim=0) == 0).float().mean())


@dataclasses.dataclass
class MovingAverageBaseline:
    """b_t = beta b_{t-1} + (1 - beta) mean(R); ``value`` is None before the first update."""

    beta: float = DEFAULT_BASELINE_BETA
    value: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"baseline beta must be in [0, 1), got {self.beta}")

    def advantages(self, rewards: torch.Tensor, eps: float = DEFAULT_EPS, mean_reward: float | None = None) -> torch.Tensor:
        """Advantages against the baseline *before* this batch, scaled by the batch's spread, then
        the baseline update.

        ``mean_reward`` overrides ``rewards.mean()`` (e.g. the mean over all processes under
        DDP, so every rank keeps the same baseline)."""
        rewards = rewards.float()
        mean = float(rewards.mean()) if mean_reward is None else float(mean_reward)
        if self.value is None:
            self.value = mean  # b_0
        advantages = (rewards - self.value) / (rewards.std() + eps)  # A = (R - b_{t-1}) / (std_{g,b} R + eps)
        self.value = self.beta * self.value + (1.0 - self.beta) * mean  # b_t = beta b_{t-1} + (1 - beta) mean(R)
        return advantages

    def state_dict(self) -> dict[str, float | None]:
        return {"beta": self.beta, "value": self.value}

    def load_state_dict(self, state: dict[str, float | None]) -> None:
        self.beta = float(state["beta"])  # type: ignore[arg-type]
        self.value = None if state["value"] is None else float(state["value"])  # type: ignore[arg-type]
