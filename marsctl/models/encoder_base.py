"""The one interface every query/reward encoder implements.

Every method returns L2-normalized float32 vectors ``[N, embedding_dim]`` in one shared
space, so that text, audio and image queries can be compared and fused. In eval mode an
encoder is deterministic: the same input gives the same vector whatever the batch.
"""

from __future__ import annotations

import abc
from typing import Sequence

import numpy as np
import torch
from torch import nn


class QueryEncoder(nn.Module, abc.ABC):
    """Text, audio and image towers projecting into one shared embedding space."""

    #: size of the shared embedding space
    embedding_dim: int

    @abc.abstractmethod
    def embed_text(self, texts: Sequence[str]) -> torch.Tensor:
        """``N`` strings -> ``[N, D]`` unit vectors."""

    @abc.abstractmethod
    def embed_audio(
        self,
        waveforms: torch.Tensor | np.ndarray | Sequence[torch.Tensor],
        sample_rate: int,
        *,
        differentiable: bool = False,
    ) -> torch.Tensor:
        """Mono waveforms (``[N, T]``, or a list of ``[T_i]``) at ``sample_rate`` -> ``[N, D]`` unit vectors.

        The encoder resamples to its own rate; it must not crop at random.

        ``differentiable=True`` (a pathwise reward) keeps the autograd graph from the
        waveforms to the embedding, whatever the caller's grad mode: gradients flow back to
        the waveforms (non-differentiable steps such as quantization are straight-through,
        with the same forward value). By default the waveforms are constants: the output
        carries no graph back to them, only to the encoder's own parameters that require
        grad (what alignment trains; none in an encoder from ``load_encoder``).
        """

    @abc.abstractmethod
    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """RGB images ``[N, 3, H, W]``, float in [0, 1] -> ``[N, D]`` unit vectors."""

    def release_text_model(self) -> None:
        """Free the text model's memory once every text query has been embedded (those stay
        cached); later uncached texts are an error. Optional: encoders without a separable text
        model keep it (the default does nothing). ``marsctl separate`` calls it to keep memory low."""

    @property
    def device(self) -> torch.device:
        for tensor in list(self.parameters()) + list(self.buffers()):
            return tensor.device
        return torch.device("cpu")
