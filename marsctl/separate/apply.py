"""The chunked apply step: one function, :func:`apply_separator`, as demucs' ``apply_model``.

A waveform of any length (a tensor, or the blocks of a file being read) is cut into chunks of
the model's training window that overlap by ``overlap``; ``batch_size`` chunks go through the
separator at a time, all queries of a file sharing one U-Net pass; each chunk is decoded
(``mode``, ``mean``, ``sample`` or ``best-of-N``, :mod:`marsctl.separate.decode`) and the
chunks are cross-faded back (:class:`marsctl.audio.StreamingOverlapAdd`). Estimates come
out block by block as soon as they are final, so memory does not grow with the length, and
the concatenated blocks do not depend on how the input was cut into blocks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path
from typing import Iterable, Iterator

import torch

from marsctl.audio import StreamingOverlapAdd
from marsctl.errors import ConfigError
from marsctl.models.encoder_base import QueryEncoder
from marsctl.models.separator import Separator as SeparatorModel
from marsctl.separate.decode import best_of_n_separate, check_decode, parse_best_of


@dataclasses.dataclass(frozen=True)
class SeparateOptions:
    out_dir: Path = Path("separated")
    decode: str = "mode"
    residual: bool = False
    overwrite: bool = False
    #: chunk length in samples (default: the model's training window)
    chunk_samples: int | None = None
    overlap: float = 0.25
    batch_size: int = 8
    seed: int = 0
    #: rate of the files written (None: each input's own rate; the estimate is resampled back to it)
    sample_rate: int | None = None
    #: container of the files written, ``wav`` or ``flac`` (:data:`OUTPUT_FORMATS`)
    format: str = "wav"
    #: sample format (soundfile subtype); None: the format's default (FLOAT for wav, PCM_24 for flac)
    subtype: str | None = None
    #: separate each mixture at the level the model was trained at and give the estimates the mixture's
    #: own level back (:func:`mixture_level_gain`)
    normalize_level: bool = True

    def __post_init__(self) -> None:
        check_decode(self.decode)
        check_output_format(self.format, self.subtype, self.sample_rate)

    @property
    def output_subtype(self) -> str:
        return self.subtype.upper() if self.subtype else OUTPUT_FORMATS[self.format][0]


#: output container -> the subtypes it is written in (the first is the default)
OUTPUT_FORMATS = {
    "wav": ("FLOAT", "PCM_16", "PCM_24", "PCM_32", "DOUBLE"),
    "flac": ("PCM_24", "PCM_16"),
}


def check_output_format(format: str, subtype: str | None, sample_rate: int | None) -> None:
    """One line for an output format, subtype or rate the writer cannot produce."""
    if format not in OUTPUT_FORMATS:
        raise ConfigError(f"--format {format}: unknown output format; use one of {', '.join(OUTPUT_FORMATS)}")
    if subtype is not None and subtype.upper() not in OUTPUT_FORMATS[format]:
        raise ConfigError(f"--subtype {subtype}: not available for --format {format}; use one of {', '.join(OUTPUT_FORMATS[format])}")
    if sample_rate is not None and not (1_000 <= sample_rate <= 384_000):
        raise ConfigError(f"--sample-rate {sample_rate}: expected a rate in Hz between 1000 and 384000 (e.g. 44100)")


class _PrivateRNG:
    """A random stream seeded once and used only inside :meth:`active`, so that sampled decodes
    are reproducible whatever the caller draws between two blocks."""

    def __init__(self, seed: int, device: torch.device):
        self.devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=self.devices):
            torch.manual_seed(seed)
            self._save()

    def _save(self) -> None:
        self.cpu_state = torch.get_rng_state()
        self.cuda_states = [torch.cuda.get_rng_state(d) for d in self.devices]

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu_state)
            for device, state in zip(self.devices, self.cuda_states):
                torch.cuda.set_rng_state(state, device)
            yield
            self._save()


@torch.no_grad()
def mixture_level_gain(model: SeparatorModel, blocks: Iterable[torch.Tensor]) -> float:
    """The gain that brings a whole mixture (its consecutive blocks at the model's rate) to the level the
    model was trained at; :func:`apply_separator` multiplies the input by it and divides the estimates.

    As demucs' ``apply`` normalises a whole track by its standard deviation and undoes it on the
    output, but with the model's own reference: the gain moves the mixture's mean log-magnitude (the
    separator's input feature, where a level change is a pure shift) to the running mean its input
    BatchNorm learned in training. One gain for the whole file (per-chunk gains follow the content:
    on the shipped model's examples they separated 1.7 dB worse at the input's own level); the mask is computed at that level and applied to the mixture as it is
    (a masked STFT is linear in the input), so the output keeps the input's level. The mean is taken
    over fixed chunks of the training window, each divided by its peak first, so it does not depend on
    how the input was cut into blocks and a finite input near the float32 limit never overflows the
    STFT. A silent mixture, or a model without an input BatchNorm, gets 1.
    """
    norm = getattr(getattr(model, "unet", None), "input_norm", None)
    running_mean = getattr(norm, "running_mean", None)
    if running_mean is None:
        return 1.0
    device = next(model.parameters()).device
    window = model.config.signal.segment_samples
    total, frames = 0.0, 0

    def add(chunk: torch.Tensor) -> None:
        nonlocal total, frames
        peak = float(chunk.abs().max())
        if peak > 0 and math.isfinite(peak):
            _, _, log_mag = model.analyze((chunk / peak)[None].to(device))
            count = log_mag.shape[-1]
            total += (float(log_mag.mean()) + math.log(peak)) * count
            frames += count

    pending = torch.zeros(0)
    for block in blocks:
        pending = torch.cat([pending, block.detach().float().cpu()])
        while pending.shape[-1] >= window:
            add(pending[:window])
            pending = pending[window:]
    n_fft = model.config.signal.n_fft
    if pending.numel() >= n_fft or (pending.numel() and not frames):  # a tail shorter than one STFT frame is left out
        add(torch.nn.functional.pad(pending, (0, max(0, n_fft - pending.numel()))))
    if not frames:
        return 1.0
    return math.exp(max(-100.0, min(100.0, float(running_mean.float().mean()) - total / frames)))


@torch.no_grad()
def apply_separator(
    model: SeparatorModel,
    mixture: torch.Tensor | Iterable[torch.Tensor],
    queries: torch.Tensor,
    *,
    decode: str = "mode",
    chunk_samples: int | None = None,
    overlap: float = 0.25,
    batch_size: int = 8,
    seed: int = 0,
    encoder: QueryEncoder | None = None,
    level_gain: float | None = None,
) -> Iterator[torch.Tensor]:
    """Separate a mono mixture at the model's rate with ``K`` query vectors ``[K, D]``.

    ``mixture`` is a waveform ``[T]`` or an iterable of consecutive blocks ``[n]`` (of any
    sizes). Yields estimate blocks ``[K, m]`` on the CPU; together they are ``[K, T]``.
    ``chunk_samples`` defaults to the model's training window; ``decode='sample'`` and
    ``best-of-N`` draw from a generator seeded with ``seed``; ``best-of-N`` scores its samples
    with ``encoder`` (the query encoder). ``level_gain`` (:func:`mixture_level_gain`) multiplies the
    input and divides the estimates: the mixture is separated at the model's training level and keeps
    its own (None: as it is).
    """
    check_decode(decode)
    best_of = parse_best_of(decode)
    if best_of is not None and encoder is None:
        raise ConfigError(f"--decode {decode} needs the query encoder to score the samples")
    device = next(model.parameters()).device
    queries = queries.to(device)
    rng = _PrivateRNG(seed, device)

    def separate_chunks(chunks: torch.Tensor) -> torch.Tensor:  # [N, chunk] -> [N, K, chunk]
        q = queries.unsqueeze(0).expand(chunks.shape[0], -1, -1)
        with rng.active():
            if best_of is not None:  # N samples re-ranked by the encoder (marsctl.separate.decode)
                return best_of_n_separate(model, chunks, q, best_of, encoder)
            return model.separate(chunks, q, decode=decode)

    def process(chunks: torch.Tensor) -> torch.Tensor:
        if level_gain is None or level_gain == 1.0:
            return separate_chunks(chunks)
        # in float64: a gain far from 1 (an input near the float32 limit) neither underflows nor overflows here
        scaled = separate_chunks((chunks.double() * level_gain).float())
        return (scaled.double() / level_gain).float()

    stream = StreamingOverlapAdd(process, chunk_samples or model.config.signal.segment_samples, overlap, batch_size)
    for block in [mixture] if isinstance(mixture, torch.Tensor) else mixture:
        done = stream.push(block.to(device))
        if done.numel():
            yield done.cpu()
    yield stream.finish().cpu()


def separate_waveform(
    model: SeparatorModel, waveform: torch.Tensor | Iterable[torch.Tensor], queries: torch.Tensor, options: SeparateOptions,
    seed: int | None = None, encoder: QueryEncoder | None = None, level_gain: float | None = None,
) -> torch.Tensor:
    """One mono waveform ``[T]`` (or its consecutive blocks) and ``K`` query vectors ``[K, D]`` ->
    ``[K, T]`` estimates: :func:`apply_separator` with the options of ``options``, joined. With
    ``options.normalize_level`` a tensor is normalised here; blocks need their ``level_gain``."""
    if level_gain is None and options.normalize_level and isinstance(waveform, torch.Tensor):
        level_gain = mixture_level_gain(model, [waveform])
    return torch.cat(list(apply_with_options(model, waveform, queries, options, seed, encoder, level_gain)), dim=-1)


def apply_with_options(
    model: SeparatorModel, mixture: torch.Tensor | Iterable[torch.Tensor], queries: torch.Tensor, options: SeparateOptions,
    seed: int | None = None, encoder: QueryEncoder | None = None, level_gain: float | None = None,
) -> Iterator[torch.Tensor]:
    """:func:`apply_separator` with the decode, chunk, overlap, batch and seed of ``options``
    (``seed`` overrides ``options.seed``) and ``level_gain`` when ``options.normalize_level``; yields
    the estimate blocks."""
    return apply_separator(
        model, mixture, queries, decode=options.decode, chunk_samples=options.chunk_samples, overlap=options.overlap,
        batch_size=options.batch_size, seed=options.seed if seed is None else seed, encoder=encoder,
        level_gain=level_gain if options.normalize_level else None,
    )
