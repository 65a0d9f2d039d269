"""Group-relative advantages (GRPO) with MARS-Sep's optional moving-average baseline.

Rewards come as ``[G, B]``: ``G`` masks sampled from one policy forward pass for each of ``B``
mixtures (a *group* is one column). Without a baseline (the default)::

    A_{g,b} = (R_{g,b} - mean_g R_{:,b}) / (std_g R_{:,b} + eps)                      (GRPO)

With the moving-average baseline (the paper's option, beta = 0.92) the group mean is
replaced by a running mean of past rewards *before* the normalization by the group's
spread::

    A_{g,b} = (R_{g,b} - b_{t-1}) / (std_g R_{:,b} + eps)
    b_t     = beta * b_{t-1} + (1 - beta) * mean(R)          (b_0 = mean of the first batch)

(Centering by the group mean after subtracting a constant baseline would cancel the
baseline, so with the option the baseline *is* the centering.) ``std`` is the unbiased
sample standard deviation, as in TRL's GRPO trainer.
"""

from __future__ import annotations

import dataclasses

import torch

DEFAULT_EPS = 1e-4
DEFAULT_BASELINE_BETA = 0.92


def group_relative_advantages(rewards: torch.Tensor, eps: float = DEFAULT_EPS, baseline: float | torch.Tensor | None = None) -> torch.Tensor:
    """``[G, B]`` rewards -> ``[G, B]`` advantages, normalized within each group (column).

    Segment rewards ``[G, B, K]`` are normalized within each (mixture, segment) over the group."""
    if rewards.ndim < 2 or rewards.shape[0] < 2:
        raise ValueError(f"rewards must be [G, B] or [G, B, K] with a group size G >= 2, got {tuple(rewards.shape)}")
    rewards = rewards.float()
    std_g = rewards.std(dim=0, keepdim=True)  # std_g R_{:,b} (unbiased)
    center = rewards.mean(dim=0, keepdim=True) if baseline is None else torch.as_tensor(baseline, dtype=rewards.dtype, device=rewards.device)
    return (rewards - center) / (std_g + eps)  # A = (R - mean_g or b) / (std_g + eps)


@dataclasses.dataclass
class MovingAverageBaseline:
    """b_t = beta b_{t-1} + (1 - beta) mean(R); ``value`` is None before the first update."""

    beta: float = DEFAULT_BASELINE_BETA
    value: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"baseline beta must be in [0, 1), got {self.beta}")

    def advantages(self, rewards: torch.Tensor, eps: float = DEFAULT_EPS, mean_reward: float | None = None) -> torch.Tensor:
        """Advantages against the baseline *before* this batch, then the baseline update.

        ``mean_reward`` overrides ``rewards.mean()`` (e.g. the mean over all processes under
        DDP, so every rank keeps the same baseline)."""
        mean = float(rewards.float().mean()) if mean_reward is None else float(mean_reward)
        if self.value is None:
            self.value = mean  # b_0
        advantages = group_relative_advantages(rewards, eps, baseline=self.value)
        self.value = self.beta * self.value + (1.0 - self.beta) * mean  # b_t
        return advantages

    def state_dict(self) -> dict[str, float | None]:
        return {"beta": self.beta, "value": self.value}

    def load_state_dict(self, state: dict[str, float | None]) -> None:
        self.beta = float(state["beta"])  # type: ignore[arg-type]
        self.value = None if state["value"] is None else float(state["value"])  # type: ignore[arg-type]
