"""Validation shared by the trainers: SI-SDRi of the mode mask on fixed mixtures."""

from __future__ import annotations

import torch

from marsctl.metrics.separation import si_sdr_improvement
from marsctl.models.separator import Separator
from marsctl.queries import QueryBuilder


@torch.no_grad()
def validation_si_sdri(model: Separator, mixtures, queries: QueryBuilder, device: torch.device) -> dict[str, float]:
    """Mean SI-SDRi (dB) over every source of the fixed mixtures, each separated with its own text
    query (mode mask). The model is left in eval mode."""
    model.eval()
    improvements = []
    for fixed in mixtures:
        mix = torch.from_numpy(fixed.mixture).to(device)[None]
        text = queries.text(fixed.labels).to(device)[None]  # [1, S, D]
        estimates = model.separate(mix, text)[0].cpu()  # [S, T]
        improvements.append(si_sdr_improvement(torch.from_numpy(fixed.sources), estimates, torch.from_numpy(fixed.mixture)))
    values = torch.cat(improvements)
    values = values[torch.isfinite(values)]
    return {"si_sdri": float(values.mean()) if len(values) else float("nan"), "num_sources": int(len(values))}
