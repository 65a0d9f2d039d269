"""Reading long files block by block, so that memory does not grow with their length.

:func:`open_audio_stream` decodes wav/flac/ogg/... with soundfile in blocks and everything
else (mp3, m4a, video containers) through an ffmpeg pipe (``f32le`` mono on stdout, read a
block at a time), and resamples with :class:`StreamingResampler`, which gives exactly
:func:`marsctl.audio.resample`'s output (the same Kaiser-sinc kernel, applied with the
context it needs at each block edge). Concatenating the blocks of a stream gives
:func:`marsctl.audio.load_audio`'s array (up to float rounding in the resampler's
convolution); the same checks apply (missing, empty, corrupt, truncated, NaN/Inf, no
samples), raised as :class:`~marsctl.errors.AudioError` when the block that shows the
problem is read.

:func:`open_live_stream` opens the inputs of ``marsctl separate --stream``: standard input, a
file still being written, or a file paced as it plays; blocks come as the audio arrives.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import soundfile as sf
import torch
import torchaudio

from marsctl.audio.io import SOUNDFILE_SUFFIXES, _first_line, check_not_truncated, check_readable, probe_audio
from marsctl.audio.resample import _RESAMPLE_KW
from marsctl.errors import AudioError

#: seconds of the file decoded per block
BLOCK_SECONDS = 10.0


class StreamingResampler:
    """Resample a signal given in consecutive blocks; the blocks it returns concatenate to
    ``resample(whole_signal, orig_sr, target_sr)``.

    torchaudio's resampler is a strided convolution: output frame ``i`` (``new`` samples,
    rates reduced by their gcd) reads input ``[i*orig - width, i*orig + width + orig)`` of
    the signal zero-padded by ``width`` on the left and ``width + orig`` on the right. Here
    the padded signal is consumed as it arrives and every frame whose window is complete is
    computed; :meth:`finish` adds the right padding and trims to ``ceil(new * length / orig)``.
    """

    def __init__(self, orig_sr: int, target_sr: int):
        self.identity = orig_sr == target_sr
        gcd = math.gcd(orig_sr, target_sr)
        self.orig, self.new = orig_sr // gcd, target_sr // gcd
        if not self.identity:
            transform = torchaudio.transforms.Resample(orig_sr, target_sr, dtype=torch.float32, **_RESAMPLE_KW)
            self.kernel, self.width = transform.kernel, transform.width
            self.window = 2 * self.width + self.orig
            self.pending = torch.zeros(self.width)  # the left zero padding
        self.length = 0  # input samples seen
        self.emitted = 0  # output samples returned

    def push(self, block: torch.Tensor) -> torch.Tensor:
        """Feed input samples ``[n]``; returns the output samples that are now final."""
        self.length += block.shape[-1]
        if self.identity:
            self.emitted += block.shape[-1]
            return block
        self.pending = torch.cat([self.pending, block.float()])
        return self._frames()

    def finish(self) -> torch.Tensor:
        """The remaining output samples after the last block."""
        if self.identity:
            return torch.zeros(0)
        self.pending = torch.cat([self.pending, torch.zeros(self.width + self.orig)])
        target = math.ceil(self.new * self.length / self.orig)
        remaining = max(target - self.emitted, 0)
        return self._frames()[:remaining]

    def _frames(self) -> torch.Tensor:
        frames = (self.pending.shape[0] - self.window) // self.orig + 1 if self.pending.shape[0] >= self.window else 0
        if frames <= 0:
            return torch.zeros(0)
        used = (frames - 1) * self.orig + self.window
        out = torch.nn.functional.conv1d(self.pending[None, None, :used], self.kernel, stride=self.orig)
        self.pending = self.pending[frames * self.orig :]
        out = out[0].transpose(0, 1).reshape(-1)
        self.emitted += out.shape[0]
        return out


@dataclasses.dataclass
class AudioStream:
    """A file being read block by block: mono float32 tensors at ``sample_rate``."""

    path: Path
    native_rate: int
    sample_rate: int
    #: length in seconds as the header or container declares it (for progress; may be approximate)
    duration: float
    blocks: Iterator[torch.Tensor]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self.blocks


def open_audio_stream(path: str | Path, sample_rate: int | None = 16_000, block_seconds: float | None = None) -> AudioStream:
    """Open ``path`` for block-wise reading (see the module docstring). Problems visible from
    the header (missing, empty, permission denied, not audio) are raised here, the rest
    while iterating. ``block_seconds`` (default :data:`BLOCK_SECONDS`) of the file are
    decoded at a time."""
    path = Path(path)
    check_readable(path)
    block_seconds = BLOCK_SECONDS if block_seconds is None else block_seconds
    if path.suffix.lower() in SOUNDFILE_SUFFIXES:
        try:
            info = sf.info(str(path))
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
            raise AudioError(path, f"not a readable audio file ({_first_line(exc)})") from exc
        native, duration = int(info.samplerate), float(info.duration)
        raw = _soundfile_blocks(path, info, max(1, int(block_seconds * native)))
    else:
        native, duration = probe_audio(path)
        raw = _ffmpeg_blocks(path, max(1, int(block_seconds * native)))
    rate = native if sample_rate is None else sample_rate
    return AudioStream(path, native, rate, duration, _checked_and_resampled(path, raw, native, rate))


def _checked_and_resampled(path: Path, raw: Iterator[np.ndarray], native: int, rate: int) -> Iterator[torch.Tensor]:
    resampler = StreamingResampler(native, rate)
    for block in raw:
        if not np.isfinite(block).all():
            raise AudioError(path, "contains NaN or Inf samples")
        out = resampler.push(torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32)))
        if out.numel():
            yield out
    if resampler.length == 0:
        raise AudioError(path, "contains no audio samples (zero length)")
    tail = resampler.finish()
    if tail.numel():
        yield tail


def _soundfile_blocks(path: Path, info, block_frames: int) -> Iterator[np.ndarray]:
    read = 0
    try:
        with sf.SoundFile(str(path)) as handle:
            while True:
                data = handle.read(block_frames, dtype="float32", always_2d=True)
                if data.shape[0] == 0:
                    break
                read += data.shape[0]
                yield data.mean(axis=1)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise AudioError(path, f"not a readable audio file ({_first_line(exc)})") from exc
    check_not_truncated(path, info, read)


def _ffmpeg_blocks(path: Path, block_frames: int) -> Iterator[np.ndarray]:
    """Decode through ``ffmpeg ... -f f32le pipe:`` (the arguments of :func:`marsctl.audio.load_audio`)."""
    command = ["ffmpeg", "-nostdin", "-v", "error", "-i", f"file:{path.resolve()}", "-map", "0:a:0",
               "-f", "f32le", "-acodec", "pcm_f32le", "-ac", "1", "pipe:"]
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr)
        try:
            leftover = b""
            while True:
                data = process.stdout.read(block_frames * 4)
                if not data:
                    break
                data = leftover + data
                usable = len(data) - len(data) % 4
                leftover = data[usable:]
                yield np.frombuffer(data[:usable], dtype=np.float32).copy()
            if process.wait() != 0:
                stderr.seek(0)
                lines = stderr.read().decode("utf-8", "replace").strip().splitlines()
                raise AudioError(path, f"ffmpeg could not decode it ({lines[-1] if lines else 'unknown ffmpeg error'})")
        finally:
            if process.poll() is None:
                process.kill()
            process.stdout.close()
            process.wait()


# --- live inputs (``marsctl separate --stream``) ------------------------------------------------

#: seconds of audio read at a time from a live input (the delay reading adds, at most)
LIVE_BLOCK_SECONDS = 0.05
#: seconds a followed file may stay the same size before it is taken as finished
FOLLOW_IDLE_SECONDS = 5.0
#: how often a followed file is checked for new bytes
_FOLLOW_POLL_SECONDS = 0.05


def open_live_stream(source: str | Path, sample_rate: int, *, follow: bool = False, realtime: bool = False,
                     idle_seconds: float = FOLLOW_IDLE_SECONDS, block_seconds: float = LIVE_BLOCK_SECONDS) -> AudioStream:
    """Open a live input, mono float32 blocks at ``sample_rate`` as they arrive:

    * ``"-"``: standard input, a WAV (or Ogg) stream as ``ffmpeg -i IN -f wav -`` or ``sox ... -t wav -`` write it;
    * ``follow``: a file that is still being written (a recorder's WAV whose header does not
      have its length yet), read as it grows until it has not grown for ``idle_seconds``;
    * ``realtime``: a finished file, delivered at the pace it plays (for demos and tests);
    * otherwise a file read as fast as it decodes (:func:`open_audio_stream`).

    Standard input and followed files are read through libsndfile's pipe reader, which needs no
    seeking and no length in the header; blocks of ``block_seconds`` are handed on as soon as they
    are read, and resampled with :class:`StreamingResampler`.
    """
    if str(source) == "-":
        if follow or realtime:
            raise AudioError("stdin", "--follow and --realtime are for files; standard input is read as it arrives")
        try:
            stdin = sys.stdin.fileno()  # libsndfile's own pipe reader
        except (AttributeError, OSError, ValueError):  # not a real descriptor (an embedding program's stdin)
            stdin = sys.stdin.buffer
        return _pipe_stream(Path("stdin"), stdin, sample_rate, block_seconds, closefd=False)
    path = Path(source)
    if follow:
        if not path.exists():
            raise AudioError(path, "no such file (--follow reads a file that exists and grows)")
        read_end, write_end = os.pipe()
        threading.Thread(target=_copy_growing, args=(path, write_end, idle_seconds), daemon=True).start()
        return _pipe_stream(path, read_end, sample_rate, block_seconds, closefd=True)
    stream = open_audio_stream(path, sample_rate, block_seconds=block_seconds if realtime else None)
    if realtime:
        stream.blocks = _paced(stream.blocks, sample_rate)
    return stream


def _pipe_stream(name: Path, fd, sample_rate: int, block_seconds: float, closefd: bool) -> AudioStream:
    try:
        handle = sf.SoundFile(fd, closefd=closefd)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        if closefd and isinstance(fd, int):
            os.close(fd)
        raise AudioError(name, f"not a readable audio stream ({_first_line(exc)}); send WAV, e.g. ffmpeg -i IN -f wav -") from exc
    native = int(handle.samplerate)
    return AudioStream(name, native, sample_rate, math.inf, _checked_and_resampled(name, _handle_blocks(name, handle, max(1, int(block_seconds * native))), native, sample_rate))


def _handle_blocks(name: Path, handle: sf.SoundFile, block_frames: int) -> Iterator[np.ndarray]:
    with handle:
        while True:
            try:
                data = handle.read(block_frames, dtype="float32", always_2d=True)
            except (sf.LibsndfileError, RuntimeError) as exc:
                raise AudioError(name, f"the stream broke off ({_first_line(exc)})") from exc
            if data.shape[0] == 0:
                return
            yield data.mean(axis=1)


#: a WAV header longer than this is passed on as it is
_WAV_HEADER_LIMIT = 1 << 16


def _open_ended_wav_header(head: bytes) -> bytes | None:
    """``head`` with the RIFF and data chunk sizes of a WAV header set to 0xFFFFFFFF (unknown: read to
    the end of the stream), or None while the data chunk's header has not been seen."""
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return head if len(head) >= 12 else None
    at = 12
    while at + 8 <= len(head):
        size = int.from_bytes(head[at + 4 : at + 8], "little")
        if head[at : at + 4] == b"data":
            return head[:4] + b"\xff\xff\xff\xff" + head[8 : at + 4] + b"\xff\xff\xff\xff" + head[at + 8 :]
        at += 8 + size + (size & 1)
    return None


def _copy_growing(path: Path, write_end: int, idle_seconds: float) -> None:
    """Copy ``path``'s bytes into a pipe as they are written; close it once the file has not grown for ``idle_seconds``.

    A WAV writer may keep the sizes in its header up to date (marsctl's own live outputs do), and
    the pipe reader would stop at the size it saw first: the sizes are passed on as unknown."""
    with os.fdopen(write_end, "wb", buffering=0) as sink, contextlib.suppress(OSError):  # OSError: the reader stopped, or the file went away
        with open(path, "rb") as source:
            quiet_since = time.monotonic()
            head: bytes | None = b""  # the file's first bytes until the header is complete; None after
            while True:
                data = source.read(1 << 16)
                if data:
                    quiet_since = time.monotonic()
                    if head is not None:
                        head += data
                        fixed = _open_ended_wav_header(head) if len(head) < _WAV_HEADER_LIMIT else head
                        if fixed is None:
                            continue
                        data, head = fixed, None
                    sink.write(data)
                elif time.monotonic() - quiet_since >= idle_seconds:
                    if head:  # a header never completed: let the reader say what is wrong with it
                        sink.write(head)
                    return
                else:
                    time.sleep(_FOLLOW_POLL_SECONDS)


def _paced(blocks: Iterator[torch.Tensor], sample_rate: int) -> Iterator[torch.Tensor]:
    """Hand each block on when it would have finished playing, counted from the first."""
    start, delivered = time.monotonic(), 0
    for block in blocks:
        delivered += block.shape[-1]
        wait = start + delivered / sample_rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        yield block
