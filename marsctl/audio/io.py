"""Reading and writing audio files.

``load_audio`` reads wav/flac/ogg/aiff with soundfile, and everything else ffmpeg can
decode (mp3, m4a, mp4, webm, mkv and other video containers) through ffmpeg, always
returning mono float32 at the requested rate. Every failure is an :class:`AudioError`
whose message names the file and the problem.
"""

from __future__ import annotations

from pathlib import Path

import ffmpeg
import numpy as np
import soundfile as sf
import torch

from marsctl.audio.resample import resample
from marsctl.errors import AudioError
from marsctl.files import atomic_path

#: formats read by libsndfile directly
SOUNDFILE_SUFFIXES = frozenset({".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif", ".aifc", ".au", ".caf", ".w64"})
#: formats decoded through ffmpeg
FFMPEG_SUFFIXES = frozenset(
    {".mp3", ".m4a", ".aac", ".opus", ".wma", ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".3gp"}
)
AUDIO_SUFFIXES = SOUNDFILE_SUFFIXES | FFMPEG_SUFFIXES


def is_audio_path(path: str | Path) -> bool:
    """True when the file's suffix names a format ``load_audio`` reads."""
    return Path(path).suffix.lower() in AUDIO_SUFFIXES


def load_audio(path: str | Path, sample_rate: int | None = 16_000) -> np.ndarray:
    """Load ``path`` as mono float32 samples at ``sample_rate`` (``None`` keeps the file's rate).

    Channels are averaged. Raises :class:`AudioError` for a missing, empty, corrupt,
    truncated or non-audio file, a file with no samples, and samples that are NaN or Inf.
    """
    wave, file_sr = load_audio_native(path)
    if sample_rate is not None and file_sr != sample_rate:
        wave = resample(wave, file_sr, sample_rate).numpy()
    return np.ascontiguousarray(wave, dtype=np.float32)


def load_audio_native(path: str | Path, *, allow_nonfinite: bool = False) -> tuple[np.ndarray, int]:
    """Load ``path`` as mono float32 at its own sample rate: ``(samples, sample_rate)``.
    ``allow_nonfinite`` keeps NaN/Inf samples (``marsctl eval`` scores such an estimate at its floor)."""
    path = Path(path)
    check_readable(path)
    if path.suffix.lower() in SOUNDFILE_SUFFIXES:
        wave, sr = _read_soundfile(path)
    else:
        wave, sr = _read_ffmpeg(path)
    if wave.size == 0:
        raise AudioError(path, "contains no audio samples (zero length)")
    if not allow_nonfinite and not np.isfinite(wave).all():
        raise AudioError(path, "contains NaN or Inf samples")
    return wave, sr


def check_readable(path: Path) -> None:
    """Raise :class:`AudioError` for a missing, empty or unreadable file, a directory, a FIFO or a device."""
    if not path.exists():
        raise AudioError(path, "no such file")
    if path.is_dir():
        raise AudioError(path, "is a directory, not an audio file")
    if not path.is_file():  # reading a FIFO blocks, a device never ends
        raise AudioError(path, "not a regular file (a FIFO, socket or device)")
    try:
        with open(path, "rb") as handle:
            if not handle.read(1):
                raise AudioError(path, "file is empty (0 bytes)")
    except PermissionError:
        raise AudioError(path, "permission denied") from None
    except OSError as exc:
        raise AudioError(path, f"cannot be read ({exc.strerror or exc})") from None


def _read_soundfile(path: Path) -> tuple[np.ndarray, int]:
    try:
        info = sf.info(str(path))
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise AudioError(path, f"not a readable audio file ({_first_line(exc)})") from exc
    check_not_truncated(path, info, data.shape[0])
    return data.mean(axis=1), int(sr)


def check_not_truncated(path: Path, info, frames_read: int) -> None:
    """Raise :class:`AudioError` when fewer frames were read than the header (``sf.info``) or a
    WAV ``data`` chunk declares: libsndfile reads a cut-short file silently."""
    if info.frames > 0 and frames_read < info.frames:
        raise AudioError(path, f"truncated: header declares {info.frames} frames, {frames_read} readable")
    declared = _wav_declared_data_bytes(path)
    if declared is not None:
        frame_bytes = info.channels * _wav_sample_bytes(info.subtype)
        if frame_bytes and declared // frame_bytes > frames_read + 1:
            raise AudioError(path, f"truncated: header declares {declared // frame_bytes} frames, file holds {frames_read}")


def _wav_sample_bytes(subtype: str) -> int:
    return {"PCM_U8": 1, "PCM_S8": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4, "FLOAT": 4, "DOUBLE": 8}.get(subtype, 0)


def _wav_declared_data_bytes(path: Path) -> int | None:
    """Size of a RIFF/WAVE file's ``data`` chunk as its header declares it (None if not plain WAV).

    libsndfile silently reads what is there when a WAV was cut short; comparing the
    declared size with what was read catches truncated downloads.
    """
    with open(path, "rb") as fh:
        head = fh.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        while True:
            chunk = fh.read(8)
            if len(chunk) < 8:
                return None
            cid, size = chunk[:4], int.from_bytes(chunk[4:], "little")
            if cid == b"data":
                # 0 and 0xFFFFFFFF are used by streaming writers for "unknown"
                return None if size in (0, 0xFFFFFFFF) else size
            fh.seek(size + (size & 1), 1)


def probe_audio(path: Path) -> tuple[int, float]:
    """(sample rate, duration in seconds, 0 when unknown) of the first audio stream, by ffprobe."""
    try:
        probe = ffmpeg.probe(f"file:{path.resolve()}")  # 'file:' stops ffmpeg from reading the name as a URL or option
    except ffmpeg.Error as exc:
        raise AudioError(path, f"not a readable audio or video file ({_ffmpeg_reason(exc)})") from exc
    except FileNotFoundError as exc:
        raise AudioError(path, "ffmpeg is not installed; install it to read this format (e.g. apt-get install ffmpeg)") from exc
    streams = [s for s in probe.get("streams", []) if s.get("codec_type") == "audio"]
    if not streams:
        raise AudioError(path, "has no audio stream")
    rate = int(streams[0].get("sample_rate") or 0)
    if rate <= 0:
        raise AudioError(path, "audio stream has no sample rate")
    duration = streams[0].get("duration") or probe.get("format", {}).get("duration") or 0
    return rate, float(duration)


def _read_ffmpeg(path: Path) -> tuple[np.ndarray, int]:
    source = f"file:{path.resolve()}"  # 'file:' stops ffmpeg from reading the name as a URL or option
    sr, _ = probe_audio(path)
    try:
        out, _ = (
            ffmpeg.input(source)
            .output("pipe:", format="f32le", acodec="pcm_f32le", ac=1, map="0:a:0")
            .global_args("-nostdin", "-v", "error")
            .run(capture_stdout=True, capture_stderr=True)
        )
    except ffmpeg.Error as exc:
        raise AudioError(path, f"ffmpeg could not decode it ({_ffmpeg_reason(exc)})") from exc
    return np.frombuffer(out, dtype=np.float32).copy(), sr


def _ffmpeg_reason(exc: ffmpeg.Error) -> str:
    text = (exc.stderr or b"").decode("utf-8", "replace").strip().splitlines()
    return text[-1] if text else "unknown ffmpeg error"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def save_audio(path: str | Path, waveform: np.ndarray | torch.Tensor, sample_rate: int) -> Path:
    """Write a mono (``[T]``) or multichannel (``[C, T]``) signal atomically.

    WAV files are written as 32-bit float, so evaluation sees exactly what the model
    produced; FLAC as 24-bit PCM.
    """
    path = Path(path)
    data = torch.as_tensor(waveform).detach().cpu().numpy().astype(np.float32)
    if data.ndim == 2:
        data = data.T
    elif data.ndim != 1:
        raise ValueError(f"expected [T] or [C, T] samples, got shape {data.shape}")
    suffix = path.suffix.lower()
    subtype = {".wav": "FLOAT", ".flac": "PCM_24"}.get(suffix)
    if subtype is None and suffix not in SOUNDFILE_SUFFIXES:
        raise AudioError(path, f"cannot write '{suffix}' files; use .wav or .flac")
    with atomic_path(path) as tmp:
        sf.write(str(tmp), data, sample_rate, subtype=subtype, format=suffix.lstrip(".").upper())
    return path
