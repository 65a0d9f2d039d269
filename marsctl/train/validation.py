"""Validation shared by the trainers: SI-SDRi of the mode mask on fixed mixtures."""

from __future__ import annotations

import torch

from marsctl.metrics.separation import bounded_si_sdr_improvement
from marsctl.models.separator import Separator
from marsctl.queries import QueryBuilder


@torch.no_grad()
def mode_estimates(model: Separator, mixtures, queries: QueryBuilder, device: torch.device) -> list[torch.Tensor]:
    """The mode-mask estimates ``[S, T]`` (on the CPU) of every fixed mixture, each source separated
    with its own text query. The model is left in eval mode."""
    model.eval()
    estimates = []
    for fixed in mixtures:
        mix = torch.from_numpy(fixed.mixture).to(device)[None]
        text = queries.text(fixed.labels).to(device)[None]  # [1, S, D]
        estimates.append(model.separate(mix, text)[0].cpu())  # [S, T]
    return estimates


def finite_mean(values: list[torch.Tensor]) -> tuple[float, int]:
    """Mean and count of the finite entries of the concatenated ``values`` (NaN, 0 when none)."""
    flat = torch.cat(values) if values else torch.zeros(0)
    flat = flat[torch.isfinite(flat)]
    return (float(flat.mean()) if len(flat) else float("nan")), int(len(flat))


@torch.no_grad()
def validation_si_sdri(model: Separator, mixtures, queries: QueryBuilder, device: torch.device,
                       estimates: list[torch.Tensor] | None = None) -> dict[str, float]:
    """Mean SI-SDRi (dB) over every source of the fixed mixtures, each separated with its own text
    query (mode mask; ``estimates`` when the caller has them from :func:`mode_estimates`), with the
    floor and ceiling of ``marsctl eval``. The model is left in eval mode."""
    if estimates is None:
        estimates = mode_estimates(model, mixtures, queries, device)
    # silent or failed (NaN) estimates score eval's floor and perfect ones its ceiling: none leaves the mean
    improvements = [bounded_si_sdr_improvement(torch.from_numpy(fixed.sources), estimate, torch.from_numpy(fixed.mixture))
                    for fixed, estimate in zip(mixtures, estimates)]
    mean, count = finite_mean(improvements)
    return {"si_sdri": mean, "num_sources": count}
