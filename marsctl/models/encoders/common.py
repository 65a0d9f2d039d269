"""Pieces shared by every encoder: waveform batching, projection heads, save/load plumbing.

An encoder here is *trunks* (feature extractors: pretrained and frozen, or small and
trained by ``marsctl align``) followed by one linear *projection head* per modality into
the shared space, then L2 normalization. :class:`ProjectedEncoder` implements the
:class:`~marsctl.models.encoder_base.QueryEncoder` methods once on top of three feature
methods, so each implementation only says how it turns text, audio and images into
features.
"""

from __future__ import annotations

import abc
import functools
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from marsctl.audio import resample
from marsctl.models.encoder_base import QueryEncoder

#: CLIP's initial temperature, 1/0.07, stored as a log like CLIP and CLAP do
INITIAL_LOGIT_SCALE = float(np.log(1 / 0.07))
#: CLIP clamps the learned logit scale at 100
MAX_LOGIT_SCALE = 100.0


def as_waveform_list(waveforms: torch.Tensor | np.ndarray | Sequence[Any]) -> list[torch.Tensor]:
    """Mono waveforms as a list of 1-D float32 tensors (``[N, T]``, ``[T]`` or a list of ``[T_i]``)."""
    if isinstance(waveforms, (torch.Tensor, np.ndarray)):
        tensor = torch.as_tensor(waveforms, dtype=torch.float32)
        if tensor.ndim == 1:
            tensor = tensor[None]
        if tensor.ndim != 2:
            raise ValueError(f"expected mono waveforms [N, T], got shape {tuple(tensor.shape)}")
        return list(tensor.unbind(0))
    out = []
    for wave in waveforms:
        wave = torch.as_tensor(wave, dtype=torch.float32)
        if wave.ndim != 1:
            raise ValueError(f"expected 1-D mono waveforms, got shape {tuple(wave.shape)}")
        out.append(wave)
    return out


def embed_grouped_by_length(
    waves: list[torch.Tensor], tower: Any, batch_size: int, device: torch.device
) -> torch.Tensor:
    """Run ``tower([B, T])`` over waveforms grouped by length, in the original order.

    Waveforms are never padded to each other's length, so a clip's features do not
    depend on what else is in the batch (the eval-mode determinism contract).
    """
    if not waves:
        raise ValueError("no waveforms to embed")
    by_length: dict[int, list[int]] = {}
    for index, wave in enumerate(waves):
        if wave.numel() == 0:
            raise ValueError(f"waveform {index} is empty")
        by_length.setdefault(wave.shape[-1], []).append(index)
    outputs: list[torch.Tensor | None] = [None] * len(waves)
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            batch = torch.stack([waves[i] for i in chunk]).to(device)
            features = tower(batch)
            for row, i in enumerate(chunk):
                outputs[i] = features[row]
    return torch.stack(outputs)  # type: ignore[arg-type]


def resample_grouped_by_length(waves: list[torch.Tensor], orig_sr: int, target_sr: int) -> list[torch.Tensor]:
    """Each waveform resampled from ``orig_sr`` to ``target_sr``, those of one length in one batched call
    (never padded to each other), in the original order."""
    if orig_sr == target_sr:
        return waves
    by_length: dict[int, list[int]] = {}
    for index, wave in enumerate(waves):
        by_length.setdefault(wave.shape[-1], []).append(index)
    outputs: list[torch.Tensor | None] = [None] * len(waves)
    for indices in by_length.values():
        resampled = resample(torch.stack([waves[i] for i in indices]), orig_sr, target_sr)
        for row, i in enumerate(indices):
            outputs[i] = resampled[row]
    return outputs  # type: ignore[return-value]


def identity_or_default_linear(in_dim: int, out_dim: int) -> nn.Linear:
    """A projection head; the identity when the sizes match, so a pretrained space is kept at start."""
    head = nn.Linear(in_dim, out_dim)
    if in_dim == out_dim:
        with torch.no_grad():
            head.weight.copy_(torch.eye(out_dim))
            head.bias.zero_()
    return head


class ProjectedEncoder(QueryEncoder):
    """Trunks -> linear projection heads -> unit vectors, plus the learned temperature.

    Subclasses implement ``text_features``, ``audio_features`` (waveforms already at
    ``self.sample_rate``) and ``image_features``, and list the submodules that hold
    external pretrained weights in ``external_modules`` (frozen, kept in eval mode and
    not written into ``model.safetensors``: the config says where they come from).
    """

    #: name used in config.json's "encoder_type"
    encoder_type: ClassVar[str]
    #: attribute names of submodules holding external (pretrained, frozen) weights
    external_modules: ClassVar[tuple[str, ...]] = ()
    #: the rate ``audio_features`` expects
    sample_rate: int
    #: waveforms per forward pass of the audio trunk
    audio_batch_size: int = 16

    def __init__(self, embedding_dim: int) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.logit_scale = nn.Parameter(torch.tensor(INITIAL_LOGIT_SCALE))
        #: the reward anchor (:class:`~marsctl.models.encoders.anchor.AnchorFusion`); None until aligned
        self.anchor_fusion: nn.Module | None = None

    # -- what a subclass provides ------------------------------------------------------
    @abc.abstractmethod
    def text_features(self, texts: Sequence[str]) -> torch.Tensor: ...

    @abc.abstractmethod
    def audio_features(self, waveforms: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
        """``[B, T]`` at ``self.sample_rate`` (all the same length) -> ``[B, F]``.

        ``differentiable``: the caller wants gradients w.r.t. ``waveforms`` (grad mode is on);
        otherwise ``waveforms`` are detached and a frozen trunk may run without autograd.
        """

    @abc.abstractmethod
    def image_features(self, images: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def config_mapping(self) -> dict[str, Any]:
        """The config that rebuilds this encoder (written to config.json)."""

    # -- the QueryEncoder interface --------------------------------------------------
    def embed_text(self, texts: Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            raise TypeError("embed_text takes a list of strings, not one string")
        texts = list(texts)
        if not texts:
            raise ValueError("no texts to embed")
        return F.normalize(self.text_head(self.text_features(texts).to(self.device)), dim=-1)

    def embed_audio(self, waveforms: Any, sample_rate: int, *, differentiable: bool = False) -> torch.Tensor:
        waves = as_waveform_list(waveforms)
        if not differentiable:  # the waveforms are constants: no graph back to them
            return self._embed_audio([w.detach() for w in waves], sample_rate, differentiable=False)
        with torch.enable_grad():
            return self._embed_audio(waves, sample_rate, differentiable=True)

    def _embed_audio(self, waves: list[torch.Tensor], sample_rate: int, differentiable: bool) -> torch.Tensor:
        waves = resample_grouped_by_length(waves, sample_rate, self.sample_rate)
        tower = functools.partial(self.audio_features, differentiable=differentiable)
        features = embed_grouped_by_length(waves, tower, self.audio_batch_size, self.device)
        return F.normalize(self.audio_head(features), dim=-1)

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        images = torch.as_tensor(images, dtype=torch.float32)
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected RGB images [N, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
        return F.normalize(self.image_head(self.image_features(images.to(self.device))), dim=-1)

    # -- training helpers -------------------------------------------------------------
    def temperature_scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped like CLIP."""
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def freeze_external(self) -> None:
        for name in self.external_modules:
            module = getattr(self, name, None)
            if module is not None:
                module.requires_grad_(False)
                module.eval()

    def unfreeze_trainable(self) -> "ProjectedEncoder":
        """Make everything but the external pretrained trunks trainable again (``load_encoder``
        returns a fully frozen encoder for inference; alignment calls this)."""
        self.requires_grad_(True)
        self.freeze_external()
        return self

    def train(self, mode: bool = True) -> "ProjectedEncoder":
        super().train(mode)
        for name in self.external_modules:  # pretrained trunks stay in eval mode (no dropout)
            module = getattr(self, name, None)
            if module is not None:
                module.eval()
        return self

    def persistent_state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor except the external pretrained trunks: what model.safetensors holds."""
        skip = tuple(f"{name}." for name in self.external_modules)
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if not k.startswith(skip)}

    def load_persistent_state_dict(self, state: dict[str, torch.Tensor], where: str = "checkpoint") -> None:
        expected = set(self.persistent_state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            from marsctl.errors import MarsctlError

            raise MarsctlError(
                f"{where}: weights do not match the encoder config "
                f"(missing: {', '.join(missing[:5]) or 'none'}; unexpected: {', '.join(unexpected[:5]) or 'none'})"
            )
        self.load_state_dict(state, strict=False)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
