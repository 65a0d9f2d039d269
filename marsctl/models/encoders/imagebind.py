"""ImageBind (Girdhar et al., 2023) as a :class:`QueryEncoder`: the encoder MARS-Sep aligns and rewards with.

Its text, audio and vision towers, written here from the reference repository
(facebookresearch/ImageBind, ``imagebind/models``) with the same module names, so that the
official checkpoint loads strictly into them; the depth, thermal and IMU towers of the
checkpoint are not built and their weights are skipped. What follows the reference exactly:

- **checkpoint**: ``imagebind:huge`` is ``imagebind_huge.pth`` (a plain state dict of tensors,
  read with ``torch.load(weights_only=True, mmap=True)``), downloaded once into
  ``$XDG_CACHE_HOME/marsctl/imagebind/`` (``~/.cache/...``); a local ``.pth``/``.safetensors``
  path or another URL works too. The model is built on the meta device and the checkpoint's
  tensors are assigned to it, so the 4.8 GB file is never copied into a second model in memory.
- **text**: CLIP's byte-level BPE (``bpe_simple_vocab_16e6.txt.gz``, the file ImageBind's
  ``SimpleTokenizer`` reads; downloaded and checked against its SHA-256), the reference's
  cleaning (ftfy, HTML unescaping, whitespace, lower case), 77 tokens: start, at most 75 text
  tokens, end, zeros after it. The BPE merges run in the ``tokenizers`` library. The text
  embedding is read at the end token (the highest id, as the reference's ``argmax``).
- **audio**: 16 kHz (resampled with torchaudio's default sinc, as the reference's data code);
  three 2 s clips at the starts pytorchvideo's ``ConstantClipsPerVideoSampler(2, 3)`` gives
  (0, 1/3 and 2/3 of ``duration - 2`` s; a clip shorter than 2 s is the whole clip); each clip
  less its mean, a Kaldi fbank (128 mel bins, 25 ms Hann ("hanning") window, 10 ms hop,
  pre-emphasis 0.97, per-frame DC removal, power spectrum, log), cut or zero-padded to 204
  frames, normalized with mean -4.268 and std 9.138. The clip embeddings are averaged.
  The fbank is computed here for a whole batch at once (:func:`kaldi_fbank`; checked against
  ``torchaudio.compliance.kaldi.fbank`` in the tests) and is differentiable.
- **vision**: shorter side resized to 224 (bicubic, antialiased), center crop 224, CLIP's
  mean and std; the image repeated as two frames for the 2x14x14 patch convolution.

Differences, on purpose: the reference's data code subtracts each clip's mean *in place* from
the whole waveform (its clips are views), so overlapping clips of a clip shorter than 6 s see
each other's offsets; here each clip is centred on its own. Dropout and drop-path (training
only) are left out: the towers are frozen and always in eval mode. The embeddings are
returned as unit vectors; the checkpoint's logit scales are kept (for the strict load) but
not applied, as they do not change a direction.

``embed_audio(..., differentiable=True)`` keeps the graph from the waveforms through the
fbank and the frozen audio tower (pathwise RL rewards); by default it runs under ``no_grad``.
The text, audio and image outputs go through identity-initialized linear heads (trained by
``marsctl align``), so an unaligned ``ImageBindEncoder`` is exactly ImageBind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import html
import os
import pickle
import re
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn

from marsctl.config import from_mapping, to_mapping
from marsctl.errors import MarsctlError
from marsctl.models.encoders.common import ProjectedEncoder, identity_or_default_linear
from marsctl.models.encoders.towers import CLIP_MEAN, CLIP_STD

#: named checkpoints: name -> URL of the official release
IMAGEBIND_CHECKPOINTS = {"huge": "https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth"}
#: the CLIP BPE merges ImageBind's tokenizer reads (the file in its repository) and its SHA-256
BPE_URL = "https://raw.githubusercontent.com/facebookresearch/ImageBind/main/imagebind/bpe/bpe_simple_vocab_16e6.txt.gz"
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
#: towers of the checkpoint that are not built here (their weights are skipped when loading)
SKIPPED_MODALITIES = ("depth", "thermal", "imu")
MODALITIES = ("vision", "text", "audio")

IMAGEBIND_SAMPLE_RATE = 16_000
CLIP_SECONDS = 2
CLIPS_PER_AUDIO = 3
NUM_MEL_BINS = 128
TARGET_FRAMES = 204
FBANK_MEAN, FBANK_STD = -4.268, 9.138
FRAME_LENGTH, FRAME_SHIFT, FFT_SIZE = 400, 160, 512  # 25 ms, 10 ms at 16 kHz; next power of two
PREEMPHASIS = 0.97
IMAGE_SIZE, PATCH_SIZE, VIDEO_FRAMES = 224, 14, 2
AUDIO_KERNEL, AUDIO_STRIDE = 16, 10
START_TOKEN, END_TOKEN = "<|startoftext|>", "<|endoftext|>"
#: the reference tokenizer's number of merges (``merges[1 : 49152 - 256 - 2 + 1]``)
MAX_MERGES = 49152 - 256 - 2
#: CLIP's split of cleaned text into words, digits and punctuation runs
WORD_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


@dataclasses.dataclass(frozen=True)
class ImageBindArch:
    """Tower sizes; the defaults are ``imagebind_huge``'s (1.07 B parameters in these three towers)."""

    out_embed_dim: int = 1024
    vision_embed_dim: int = 1280
    vision_num_blocks: int = 32
    vision_num_heads: int = 16
    text_embed_dim: int = 1024
    text_num_blocks: int = 24
    text_num_heads: int = 16
    audio_embed_dim: int = 768
    audio_num_blocks: int = 12
    audio_num_heads: int = 12
    vocab_size: int = 49408
    context_length: int = 77


@dataclasses.dataclass(frozen=True)
class ImageBindEncoderConfig:
    """Which ImageBind checkpoint, of which size, which BPE file, where downloads are cached."""

    #: a name of :data:`IMAGEBIND_CHECKPOINTS`, a local .pth/.safetensors path, or an http(s) URL
    checkpoint: str = "huge"
    arch: ImageBindArch = ImageBindArch()
    #: CLIP BPE merges (.txt.gz): empty = ImageBind's file (downloaded, SHA-256 checked), else a local path or URL
    bpe: str = ""
    #: download cache; empty = $XDG_CACHE_HOME/marsctl/imagebind (~/.cache/marsctl/imagebind)
    cache_dir: str = ""
    init_seed: int = 0


# ----------------------------------------------------------------------------- downloads


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "marsctl" / "imagebind"


def is_url(spec: str) -> bool:
    return urlparse(spec).scheme in ("http", "https")


def cached_download(url: str, cache_dir: Path, filename: str = "", sha256: str | None = None) -> Path:
    """``url`` downloaded once into ``cache_dir`` (atomically: torch.hub writes a temporary file, then renames it).

    A file already there is used as is (put it there by hand when offline). Named checkpoints keep
    their own file name; any other URL goes under a folder named after a hash of the URL.
    """
    if not filename:
        filename = str(Path(hashlib.sha256(url.encode()).hexdigest()[:16]) / (Path(urlparse(url).path).name or "download"))
    target = cache_dir / filename
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading {url} to {target}", file=sys.stderr)
    try:
        torch.hub.download_url_to_file(url, str(target), hash_prefix=sha256, progress=sys.stderr.isatty())
    except Exception as exc:  # offline, HTTP error, disk full, wrong hash: one line for the user
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MarsctlError(
            f"{url}: cannot download it ({message}); download it by hand to {target} or give a local path"
        ) from exc
    return target


def resolve_checkpoint(checkpoint: str, cache_dir: Path) -> Path:
    if checkpoint in IMAGEBIND_CHECKPOINTS:
        url = IMAGEBIND_CHECKPOINTS[checkpoint]
        return cached_download(url, cache_dir, filename=Path(urlparse(url).path).name)
    if is_url(checkpoint):
        return cached_download(checkpoint, cache_dir)
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise MarsctlError(
            f"{checkpoint}: not an ImageBind checkpoint name ({', '.join(IMAGEBIND_CHECKPOINTS)}), URL nor an existing file"
        )
    return path.resolve()


def resolve_bpe(bpe: str, cache_dir: Path) -> Path:
    if not bpe:
        return cached_download(BPE_URL, cache_dir, filename="bpe_simple_vocab_16e6.txt.gz", sha256=BPE_SHA256)
    if is_url(bpe):
        return cached_download(bpe, cache_dir)
    path = Path(bpe).expanduser()
    if not path.is_file():
        raise MarsctlError(f"{bpe}: no such BPE merges file")
    return path.resolve()


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an ImageBind checkpoint, without unpickling anything but tensors."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise MarsctlError(f"{path}: cannot read safetensors ({str(exc).splitlines()[0]})") from exc
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise MarsctlError(
            f"{path}: cannot be read as a weights-only checkpoint ({str(exc).splitlines()[0]}); "
            "a partial download? delete it to download again"
        ) from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MarsctlError(f"{path}: not a state dict of tensors")
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}


def skipped_key(key: str) -> bool:
    """A weight of a tower that is not built here (depth, thermal, IMU)."""
    parts = key.split(".")
    return len(parts) > 1 and parts[0].startswith("modality_") and parts[1] in SKIPPED_MODALITIES


# ----------------------------------------------------------------------------- text


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's table from bytes to printable characters (the alphabet of byte-level BPE)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def _import_extra(name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise MarsctlError(f"the ImageBind encoder needs the {name} package: pip install 'marsctl[imagebind]'") from exc


def clean_text(text: str) -> str:
    """The reference's ``whitespace_clean(basic_clean(text)).lower()``."""
    ftfy = _import_extra("ftfy")
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


class ClipBpeTokenizer:
    """CLIP's tokenizer as ImageBind builds it from the BPE merges file: ids ``[N, context_length]``.

    The vocabulary is the reference's: the 256 byte characters, the same with ``</w>``, one
    token per merge (in the file's order), then ``<|startoftext|>`` and ``<|endoftext|>``.
    """

    def __init__(self, bpe_path: Path, context_length: int = 77):
        _import_extra("tokenizers")  # a one-line error without it
        from tokenizers import Regex, Tokenizer, pre_tokenizers
        from tokenizers.models import BPE

        try:
            lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
        except (OSError, UnicodeDecodeError, EOFError) as exc:
            raise MarsctlError(f"{bpe_path}: not a gzipped BPE merges file ({exc})") from exc
        merges = [tuple(line.split()) for line in lines[1 : MAX_MERGES + 1]]
        merges = [m for m in merges if len(m) == 2]
        if not merges:
            raise MarsctlError(f"{bpe_path}: no BPE merges in this file")
        alphabet = list(bytes_to_unicode().values())
        tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + [START_TOKEN, END_TOKEN]
        vocab = {token: i for i, token in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise MarsctlError(f"{bpe_path}: merges that repeat a token; not a CLIP BPE file")
        tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", continuing_subword_prefix=""))
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tokenizer.add_special_tokens([START_TOKEN, END_TOKEN])
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.vocab_size = len(vocab)
        self.start_id, self.end_id = vocab[START_TOKEN], vocab[END_TOKEN]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(clean_text(text), add_special_tokens=False).ids

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = ([self.start_id] + self.encode(text))[: self.context_length - 1] + [self.end_id]
            out[row, : len(ids)] = torch.tensor(ids)
        return out


# ----------------------------------------------------------------------------- audio front end


def clip_bounds(num_samples: int, sample_rate: int = IMAGEBIND_SAMPLE_RATE) -> list[tuple[int, int]]:
    """Sample ranges of the three 2 s clips, with the reference's arithmetic (a float duration,
    pytorchvideo's ``ConstantClipsPerVideoSampler`` in fractions, ``int`` of the seconds x rate)."""
    clip = Fraction(CLIP_SECONDS)
    duration = num_samples / sample_rate
    max_start = Fraction(max(duration - clip, 0))
    step = max_start / CLIPS_PER_AUDIO
    bounds = []
    for index in range(CLIPS_PER_AUDIO):
        start = step * index
        bounds.append((int(start * sample_rate), min(int((start + clip) * sample_rate), num_samples)))
    return bounds


def mel_banks(device: torch.device | str = "cpu") -> torch.Tensor:
    """Kaldi's triangular mel filters ``[FFT_SIZE // 2 + 1, 128]`` (20 Hz to Nyquist), as fbank builds them."""
    from torchaudio.compliance.kaldi import get_mel_banks

    banks, _ = get_mel_banks(NUM_MEL_BINS, FFT_SIZE, float(IMAGEBIND_SAMPLE_RATE), 20.0, 0.0, 100.0, -500.0, 1.0)
    return F.pad(banks, (0, 1)).T.contiguous().to(device)  # the Nyquist bin gets no weight, as in kaldi.fbank


def kaldi_fbank(waves: torch.Tensor, banks: torch.Tensor) -> torch.Tensor:
    """``torchaudio.compliance.kaldi.fbank`` of each row of ``[B, N]`` at 16 kHz with ImageBind's settings
    (htk_compat, no energy, Hann window, dither 0, 25 ms / 10 ms) -> ``[B, frames, 128]``; batched and differentiable."""
    if waves.shape[-1] < FRAME_LENGTH:
        return waves.new_zeros(waves.shape[0], 0, NUM_MEL_BINS)
    frames = waves.unfold(-1, FRAME_LENGTH, FRAME_SHIFT)  # snip_edges: whole frames only
    frames = frames - frames.mean(-1, keepdim=True)  # remove_dc_offset
    previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)  # Kaldi's pre-emphasis repeats the first sample
    frames = frames - PREEMPHASIS * previous
    window = torch.hann_window(FRAME_LENGTH, periodic=False, device=waves.device, dtype=waves.dtype)
    spectrum = torch.fft.rfft(frames * window, n=FFT_SIZE)
    power = spectrum.real.square() + spectrum.imag.square()  # |X|^2 with a gradient at 0
    mel = power @ banks.to(power.dtype)
    return mel.clamp_min(torch.finfo(mel.dtype).eps).log()


def audio_input(waves: torch.Tensor, banks: torch.Tensor) -> torch.Tensor:
    """16 kHz waveforms ``[B, N]`` -> the audio tower's input ``[B, 3, 1, 128, 204]`` (see the module docstring).
    In float32 even under autocast: bf16 power spectra would lose the quiet bins before the log."""
    with torch.autocast(device_type=waves.device.type, enabled=False):
        return _audio_input(waves.float(), banks)


def _audio_input(waves: torch.Tensor, banks: torch.Tensor) -> torch.Tensor:
    clips = []
    for start, end in clip_bounds(waves.shape[-1]):
        clip = waves[:, start:end]
        clip = clip - clip.mean(-1, keepdim=True)
        fbank = kaldi_fbank(clip, banks).transpose(1, 2)  # [B, 128, frames]
        frames = fbank.shape[-1]
        fbank = F.pad(fbank, (0, TARGET_FRAMES - frames)) if frames < TARGET_FRAMES else fbank[..., :TARGET_FRAMES]
        clips.append((fbank - FBANK_MEAN) / FBANK_STD)
    return torch.stack(clips, dim=1).unsqueeze(2)


def vision_input(images: torch.Tensor) -> torch.Tensor:
    """RGB ``[N, 3, H, W]`` in [0, 1] -> ``[N, 3, 224, 224]``: torchvision's ``Resize(224)`` (bicubic) and
    ``CenterCrop(224)`` sizes, CLIP's mean and std."""
    h, w = images.shape[-2:]
    if (h, w) != (IMAGE_SIZE, IMAGE_SIZE):
        short, long = (h, w) if h <= w else (w, h)
        new_long = int(IMAGE_SIZE * long / short)
        size = (IMAGE_SIZE, new_long) if h <= w else (new_long, IMAGE_SIZE)
        images = F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        h, w = images.shape[-2:]
        top, left = int(round((h - IMAGE_SIZE) / 2.0)), int(round((w - IMAGE_SIZE) / 2.0))
        images = images[..., top : top + IMAGE_SIZE, left : left + IMAGE_SIZE]
    mean = torch.tensor(CLIP_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


# ----------------------------------------------------------------------------- the towers
# Module and attribute names are the reference's, so that state_dict keys are the checkpoint's.


class RepeatAsVideo(nn.Module):
    """An image ``[B, C, H, W]`` as a video of ``frames`` identical frames ``[B, C, T, H, W]``."""

    def __init__(self, frames: int = VIDEO_FRAMES):
        super().__init__()
        self.frames = frames

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(2).expand(-1, -1, self.frames, -1, -1)


class PatchStem(nn.Module):
    """A patch convolution, flattened to tokens ``[B, L, D]``, optionally layer-normed."""

    def __init__(self, proj: nn.Module, norm_layer: nn.Module | None = None):
        super().__init__()
        self.proj = proj
        self.norm_layer = norm_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(x).flatten(2).transpose(1, 2)
        return self.norm_layer(tokens) if self.norm_layer is not None else tokens


def _normal(shape: tuple[int, ...], std: float) -> torch.Tensor:
    """A normal random tensor; left uninitialized on the meta device (sampling there is slow, and a
    checkpoint replaces it anyway)."""
    tensor = torch.empty(shape)
    if tensor.device.type != "meta":
        nn.init.normal_(tensor, std=std)
    return tensor


class PositionTable(nn.Module):
    def __init__(self, tokens: int, dim: int):
        super().__init__()
        self.pos_embed = nn.Parameter(_normal((1, tokens, dim), dim**-0.5))


class PatchTokens(nn.Module):
    """Vision / audio preprocessor: patch tokens after a class token, plus learned positions."""

    def __init__(self, stem: PatchStem, num_patches: int, dim: int):
        super().__init__()
        self.rgbt_stem = stem
        self.cls_token = nn.Parameter(_normal((1, 1, dim), dim**-0.5))
        self.pos_embedding_helper = PositionTable(num_patches + 1, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.rgbt_stem(x)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return tokens + self.pos_embedding_helper.pos_embed


class TextTokens(nn.Module):
    """Token embeddings plus learned positions; the causal mask of the text trunk."""

    def __init__(self, vocab_size: int, context_length: int, dim: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, dim, _weight=_normal((vocab_size, dim), 0.02))
        self.pos_embed = nn.Parameter(_normal((1, context_length, dim), 0.01))
        # made on the CPU even while building on the meta device (filling there is slow); a checkpoint replaces it
        self.register_buffer("mask", torch.full((context_length, context_length), float("-inf"), device="cpu").triu(1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(tokens) + self.pos_embed


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (LayerNorm eps 1e-6, MLP ratio 4)."""

    def __init__(self, dim: int, heads: int, add_bias_kv: bool):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, bias=True, add_bias_kv=add_bias_kv, batch_first=True)
        self.norm_1 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.norm_2 = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        y = self.norm_1(x)
        x = x + self.attn(y, y, y, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.norm_2(x))


class Trunk(nn.Module):
    def __init__(self, dim: int, blocks: int, heads: int, pre_norm: bool, add_bias_kv: bool):
        super().__init__()
        self.pre_transformer_layer = nn.Sequential(nn.LayerNorm(dim, eps=1e-6) if pre_norm else nn.Identity())
        self.blocks = nn.ModuleList(Block(dim, heads, add_bias_kv) for _ in range(blocks))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.pre_transformer_layer(x)
        for block in self.blocks:
            x = block(x, mask)
        return x


class SelectFirst(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


class TextHead(nn.Module):
    """OpenCLIP's text pooling: the features at the end token, then norm and projection."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, out_dim, bias=False))

    def forward(self, x: torch.Tensor, end_index: torch.Tensor) -> torch.Tensor:
        return self.proj(x[torch.arange(x.shape[0], device=x.device), end_index])


class LogitScale(nn.Module):
    """The checkpoint's log logit scale of a modality (a parameter for text, a buffer for audio)."""

    def __init__(self, init: float, learnable: bool):
        super().__init__()
        value = torch.tensor(init).log()
        if learnable:
            self.log_logit_scale = nn.Parameter(value)
        else:
            self.register_buffer("log_logit_scale", value)


class ImageBindModel(nn.Module):
    """ImageBind's text, audio and vision towers; ``embed(modality, inputs)`` gives unit vectors."""

    def __init__(self, arch: ImageBindArch = ImageBindArch()):
        super().__init__()
        a = arch
        vision_stem = PatchStem(nn.Sequential(
            RepeatAsVideo(), nn.Conv3d(3, a.vision_embed_dim, (VIDEO_FRAMES, PATCH_SIZE, PATCH_SIZE), (VIDEO_FRAMES, PATCH_SIZE, PATCH_SIZE), bias=False),
        ))
        audio_stem = PatchStem(
            nn.Conv2d(1, a.audio_embed_dim, AUDIO_KERNEL, AUDIO_STRIDE, bias=False), nn.LayerNorm(a.audio_embed_dim)
        )
        audio_patches = ((NUM_MEL_BINS - AUDIO_KERNEL) // AUDIO_STRIDE + 1) * ((TARGET_FRAMES - AUDIO_KERNEL) // AUDIO_STRIDE + 1)
        self.modality_preprocessors = nn.ModuleDict({
            "vision": PatchTokens(vision_stem, (IMAGE_SIZE // PATCH_SIZE) ** 2, a.vision_embed_dim),
            "text": TextTokens(a.vocab_size, a.context_length, a.text_embed_dim),
            "audio": PatchTokens(audio_stem, audio_patches, a.audio_embed_dim),
        })
        self.modality_trunks = nn.ModuleDict({
            "vision": Trunk(a.vision_embed_dim, a.vision_num_blocks, a.vision_num_heads, pre_norm=True, add_bias_kv=False),
            "text": Trunk(a.text_embed_dim, a.text_num_blocks, a.text_num_heads, pre_norm=False, add_bias_kv=False),
            "audio": Trunk(a.audio_embed_dim, a.audio_num_blocks, a.audio_num_heads, pre_norm=False, add_bias_kv=True),
        })

        def token_head(dim: int) -> nn.Module:
            return nn.Sequential(nn.LayerNorm(dim, eps=1e-6), SelectFirst(), nn.Linear(dim, a.out_embed_dim, bias=False))

        self.modality_heads = nn.ModuleDict({
            "vision": token_head(a.vision_embed_dim),
            "text": TextHead(a.text_embed_dim, a.out_embed_dim),
            "audio": token_head(a.audio_embed_dim),
        })
        self.modality_postprocessors = nn.ModuleDict({
            "vision": nn.Identity(),
            "text": nn.Sequential(nn.Identity(), LogitScale(1 / 0.07, learnable=True)),
            "audio": nn.Sequential(nn.Identity(), LogitScale(20.0, learnable=False)),
        })

    def embed(self, modality: str, inputs: torch.Tensor) -> torch.Tensor:
        """Text ids ``[N, 77]``, audio fbanks ``[N, 1, 128, 204]`` or images ``[N, 3, 224, 224]`` -> ``[N, out]`` unit vectors."""
        tokens = self.modality_preprocessors[modality](inputs)
        if modality == "text":
            features = self.modality_trunks["text"](tokens, self.modality_preprocessors["text"].mask)
            out = self.modality_heads["text"](features, inputs.argmax(dim=-1))  # the end token has the highest id
        else:
            out = self.modality_heads[modality](self.modality_trunks[modality](tokens))
        return F.normalize(out, dim=-1)


def build_on_meta(arch: ImageBindArch) -> ImageBindModel:
    """The model with no memory behind its tensors (for a checkpoint to be assigned, or to list its keys)."""
    with torch.device("meta"):
        return ImageBindModel(arch)


def load_imagebind_weights(model: ImageBindModel, state: dict[str, torch.Tensor], where: str) -> None:
    """Assign the checkpoint's tensors of the three towers to ``model`` (strictly: every key and shape)."""
    state = {k: v for k, v in state.items() if not skipped_key(k)}
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        shapes = "; ".join(f"{k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong[:3])
        raise MarsctlError(
            f"{where}: weights do not fit this ImageBind architecture (missing: {', '.join(missing[:4]) or 'none'}; "
            f"unexpected: {', '.join(unexpected[:4]) or 'none'}; shapes: {shapes or 'ok'}); is the checkpoint's arch right?"
        )
    model.load_state_dict(state, strict=True, assign=True)


# ----------------------------------------------------------------------------- the encoder


class ImageBindEncoder(ProjectedEncoder):
    encoder_type = "imagebind"
    external_modules = ("imagebind",)
    sample_rate = IMAGEBIND_SAMPLE_RATE
    audio_batch_size = 8

    def __init__(self, config: ImageBindEncoderConfig = ImageBindEncoderConfig()):
        if config.checkpoint in IMAGEBIND_CHECKPOINTS and config.arch != ImageBindArch():
            raise MarsctlError(f"imagebind:{config.checkpoint} is the huge architecture; give a checkpoint path for another arch")
        cache_dir = Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir()
        tokenizer = ClipBpeTokenizer(resolve_bpe(config.bpe, cache_dir), config.arch.context_length)
        if tokenizer.vocab_size != config.arch.vocab_size:
            raise MarsctlError(
                f"{config.bpe or BPE_URL}: a vocabulary of {tokenizer.vocab_size} tokens, the text tower has {config.arch.vocab_size}"
            )
        checkpoint_path = resolve_checkpoint(config.checkpoint, cache_dir)
        state = read_checkpoint(checkpoint_path)
        model = build_on_meta(config.arch)
        load_imagebind_weights(model, state, str(checkpoint_path))
        dim = config.arch.out_embed_dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.init_seed)
            super().__init__(dim)
            self.imagebind = model
            self.text_head = identity_or_default_linear(dim, dim)
            self.audio_head = identity_or_default_linear(dim, dim)
            self.image_head = identity_or_default_linear(dim, dim)
        self.register_buffer("mel_banks", mel_banks(), persistent=False)
        self.tokenizer = tokenizer
        self.config = config
        self.freeze_external()

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        return self.imagebind.embed("text", self.tokenizer(list(texts)).to(self.device))

    def _embed_audio(self, waves: list[torch.Tensor], sample_rate: int, differentiable: bool) -> torch.Tensor:
        # the reference resamples with torchaudio's default sinc (marsctl's resampler cuts lower: 0.85 of Nyquist)
        if sample_rate != self.sample_rate:
            import torchaudio.functional as AF

            waves = [AF.resample(w, sample_rate, self.sample_rate) for w in waves]
        return super()._embed_audio(waves, self.sample_rate, differentiable)

    def audio_features(self, waveforms: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
        with contextlib.nullcontext() if differentiable else torch.no_grad():
            mel = audio_input(waveforms, self.mel_banks)  # [B, 3, 1, 128, 204]
            clips = self.imagebind.embed("audio", mel.flatten(0, 1))
            return F.normalize(clips.view(mel.shape[0], mel.shape[1], -1).mean(1), dim=-1)

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.imagebind.embed("vision", vision_input(images))

    def config_mapping(self) -> dict[str, Any]:
        return to_mapping(self.config)

    @classmethod
    def from_config_mapping(cls, mapping: dict[str, Any], where: str = "config") -> "ImageBindEncoder":
        return cls(from_mapping(ImageBindEncoderConfig, mapping, where))
