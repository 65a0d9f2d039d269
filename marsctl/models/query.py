"""Query fusion: one conditioning vector from text, audio and image query embeddings.

Every encoder returns unit vectors in one shared space (:class:`~marsctl.models.
encoder_base.QueryEncoder`). The separator is conditioned on

    q = normalize(sum_m w_m * e_m)                     over the given modalities m

In training, OmniSep's Query-Mixup draws the weights at random (uniform, normalised to
sum 1) for every example so that the separator learns to follow any mix of modalities.
At inference the weights are the user's (equal by default). A *composed* query
("piano" + "violin") is the normalised weighted sum of several embeddings of the same
kind, and a *negative* query pushes away from what to exclude:

    q' = normalize((1 + a) * q - a * q_neg)             (a = negative strength)
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

MODALITIES = ("text", "audio", "image")


def normalize(embedding: torch.Tensor) -> torch.Tensor:
    """L2-normalise along the last axis."""
    return F.normalize(embedding.float(), dim=-1, eps=1e-8)


def fuse(embeddings: Mapping[str, torch.Tensor], weights: Mapping[str, float | torch.Tensor] | None = None) -> torch.Tensor:
    """q = normalize(sum_m w_m e_m). ``embeddings[m]`` is ``[..., D]``; ``weights[m]`` a float or
    a tensor broadcastable to ``[...]`` (one weight per example). Missing weights are equal."""
    if not embeddings:
        raise ValueError("at least one query embedding is needed")
    unknown = set(embeddings) - set(MODALITIES)
    if unknown:
        raise ValueError(f"unknown query modality {sorted(unknown)}; expected {MODALITIES}")
    total = None
    for modality, embedding in embeddings.items():
        w = 1.0 / len(embeddings) if weights is None else weights.get(modality, 0.0)
        w = torch.as_tensor(w, dtype=torch.float32, device=embedding.device)
        term = w.unsqueeze(-1) * embedding.float() if w.ndim else w * embedding.float()
        total = term if total is None else total + term
    return normalize(total)


def query_mixup_weights(
    num_examples: int, modalities: Sequence[str], generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """Query-Mixup: for each example, random weights over ``modalities`` that sum to 1."""
    raw = torch.rand(num_examples, len(modalities), generator=generator)
    raw = raw / raw.sum(dim=1, keepdim=True)
    return {m: raw[:, i] for i, m in enumerate(modalities)}


def compose(embeddings: torch.Tensor, weights: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """A composed query from ``K`` embeddings ``[K, D]`` (equal weights by default) -> ``[D]``."""
    if embeddings.ndim != 2 or embeddings.shape[0] == 0:
        raise ValueError(f"expected [K, D] embeddings with K >= 1, got {tuple(embeddings.shape)}")
    w = (
        torch.full((embeddings.shape[0],), 1.0 / embeddings.shape[0])
        if weights is None
        else torch.as_tensor(weights, dtype=torch.float32)
    ).to(embeddings.device)
    return normalize((w.unsqueeze(-1) * embeddings.float()).sum(0))


def negative_query(query: torch.Tensor, negative: torch.Tensor, strength: float = 0.5) -> torch.Tensor:
    """q' = normalize((1 + a) q - a q_neg): steer the query away from ``negative``."""
    if strength < 0:
        raise ValueError(f"negative strength must be >= 0, got {strength}")
    return normalize((1.0 + strength) * query.float() - strength * negative.float())
