"""The reward anchor z*: low-rank bilinear pooling of a target's audio, text and image embeddings.

MARS-Sep rewards a separated estimate ``y`` with ``cos(phi_a(y), z*)``, where ``z*`` fuses
what is known about the target. The fusion is the low-rank (Hadamard-product) bilinear
pooling of Kim et al. (2017) / MFB, extended to three modalities and to missing ones::

    h   = prod_{m in given} tanh(U_m e_m + b_m)            # rank-R factors, Hadamard product
    z*  = normalize( normalize(sum_{m in given} e_m) + P h )

``P`` starts at zero, so an untrained fusion is the normalized mean of the given
embeddings (a sensible anchor from the first step); alignment then learns the
multiplicative interactions. A missing modality (an audio-only dataset has no frames)
simply drops out of the product and the mean.

``modalities`` lists what the fusion was trained with (alignment adds ``image`` when
stage 3 runs). Embeddings of other modalities are ignored, so a caller can always pass
everything it has: an image tower that was never aligned cannot spoil the anchor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MODALITIES = ("audio", "text", "image")


class AnchorFusion(nn.Module):
    """Fuse ``[N, D]`` unit embeddings of one or more modalities into ``[N, D]`` unit anchors z*."""

    def __init__(self, embedding_dim: int, rank: int = 64, modalities: tuple[str, ...] | list[str] = ("audio", "text")):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        unknown = set(modalities) - set(MODALITIES)
        if unknown or not modalities:
            raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {list(modalities)}")
        self.embedding_dim, self.rank = embedding_dim, rank
        self.modalities = tuple(m for m in MODALITIES if m in modalities)
        self.factors = nn.ModuleDict({m: nn.Linear(embedding_dim, rank) for m in MODALITIES})
        self.output = nn.Linear(rank, embedding_dim, bias=False)
        nn.init.zeros_(self.output.weight)

    def forward(
        self,
        audio: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        given = {m: e for m, e in zip(MODALITIES, (audio, text, image)) if e is not None and m in self.modalities}
        if not given:
            raise ValueError(f"AnchorFusion needs at least one of {', '.join(self.modalities)}")
        sizes = {e.shape for e in given.values()}
        if len(sizes) != 1:
            raise ValueError(f"embeddings must share one shape [N, D], got {sorted(map(tuple, sizes))}")
        mean = F.normalize(torch.stack(list(given.values())).sum(0), dim=-1)
        product = None
        for modality, embedding in given.items():
            factor = torch.tanh(self.factors[modality](embedding))
            product = factor if product is None else product * factor
        return F.normalize(mean + self.output(product), dim=-1)

    def config_mapping(self) -> dict[str, object]:
        return {"embedding_dim": self.embedding_dim, "rank": self.rank, "modalities": list(self.modalities)}
