"""Learning-rate schedules shared by the trainers."""

from __future__ import annotations

import math
from typing import Callable


def warmup_cosine(warmup_steps: int, max_steps: int, final_lr_fraction: float) -> Callable[[int], float]:
    """LR multiplier for ``LambdaLR``: linear warmup to 1, then cosine decay to ``final_lr_fraction``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, max_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return final_lr_fraction + (1 - final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
