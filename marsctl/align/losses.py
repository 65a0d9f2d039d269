"""Alignment losses. Inputs are unit vectors; ``scale`` is the learned temperature exp(t).

With several clips of one class in a batch, "the" positive of InfoNCE is every item of
the same class (multi-positive / SupCon form), so that a same-class clip is never
pushed away as a negative.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def multi_positive_info_nce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """-mean_q mean_{k in P(q)} log softmax_k(logits[q])  (rows without positives are ignored)."""
    log_prob = logits.log_softmax(dim=-1)
    positives = positives.to(log_prob.dtype)
    counts = positives.sum(-1)
    rows = counts > 0
    per_row = -(log_prob * positives).sum(-1)[rows] / counts[rows]
    return per_row.mean()


def symmetric_info_nce(
    x: torch.Tensor, y: torch.Tensor, x_labels: torch.Tensor, y_labels: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE: L = 1/2 [CE(s * x y^T) + CE(s * y x^T)], positives = same label."""
    logits = scale * x @ y.T
    positives = x_labels[:, None] == y_labels[None, :]
    return 0.5 * (multi_positive_info_nce(logits, positives) + multi_positive_info_nce(logits.T, positives.T))


def triplet_loss(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    candidates: torch.Tensor,
    anchor_labels: torch.Tensor,
    candidate_labels: torch.Tensor,
    margin: float,
) -> torch.Tensor:
    """max(0, d(a, p) - d(a, n) + margin) with cosine distance and n the hardest other-class candidate."""
    d_pos = 1 - (anchor * positive).sum(-1)
    similarity = anchor @ candidates.T
    other = anchor_labels[:, None] != candidate_labels[None, :]
    hardest = similarity.masked_fill(~other, -2.0).amax(-1)
    valid = other.any(-1)
    loss = F.relu(d_pos - (1 - hardest) + margin)
    return loss[valid].mean() if valid.any() else anchor.sum() * 0


def consistency_loss(x: torch.Tensor, x_augmented: torch.Tensor) -> torch.Tensor:
    """1 - cos between a clip and an augmented view of the same clip."""
    return (1 - (x * x_augmented).sum(-1)).mean()


def anchor_loss(
    anchor: torch.Tensor,
    target: torch.Tensor,
    mixture: torch.Tensor,
    others: torch.Tensor,
    labels: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """InfoNCE of z* over {its target, the mixture holding that target, other-class clips}.

    The reward is cos(phi_a(y), z*): this term makes the target win against the mixture
    it sits in (the reward's discriminability) and against other classes.
    """
    positive = scale * (anchor * target).sum(-1, keepdim=True)
    against_mixture = scale * (anchor * mixture).sum(-1, keepdim=True)
    against_others = (scale * anchor @ others.T).masked_fill(labels[:, None] == labels[None, :], -float("inf"))
    logits = torch.cat([positive, against_mixture, against_others], dim=-1)
    return -logits.log_softmax(dim=-1)[:, 0].mean()
