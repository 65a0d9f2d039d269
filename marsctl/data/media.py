"""ffmpeg (through ffmpeg-python) for the data stages: a clip's 16 kHz mono audio and its 1 fps frames.

Frames follow CLIPSep/OmniSep: ``fps`` frames per second, the short side scaled to ``size``
then a centre crop to ``size`` x ``size``, JPEG, named ``000.jpg``, ``001.jpg``, ...
Outputs appear atomically: audio through :func:`marsctl.audio.save_audio`, frames in a
temporary directory renamed into place when complete.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import ffmpeg
import numpy as np

from marsctl.audio import save_audio
from marsctl.errors import AudioError
from marsctl.files import make_temp_dir


def _reason(exc: ffmpeg.Error) -> str:
    lines = (exc.stderr or b"").decode("utf-8", "replace").strip().splitlines()
    return lines[-1] if lines else "ffmpeg failed"


def _source(path: str | Path) -> str:
    text = str(path)
    return text if "://" in text else f"file:{Path(text).resolve()}"


def probe_streams(path: str | Path) -> tuple[bool, bool, float]:
    """(has audio, has video, duration in seconds) of a media file."""
    try:
        info = ffmpeg.probe(_source(path))
    except ffmpeg.Error as exc:
        raise AudioError(path, f"not a readable media file ({_reason(exc)})") from exc
    kinds = {s.get("codec_type") for s in info.get("streams", [])}
    video = any(
        s.get("codec_type") == "video" and not (s.get("disposition") or {}).get("attached_pic") for s in info.get("streams", [])
    )
    duration = float(info.get("format", {}).get("duration") or 0.0)
    return "audio" in kinds, video, duration


def extract_audio(
    media: str | Path, out_path: Path, sample_rate: int, start_s: float = 0.0, duration_s: float | None = None
) -> int:
    """Decode ``[start, start+duration)`` of ``media`` to mono ``sample_rate`` audio at ``out_path``; returns samples."""
    kwargs = {"ss": start_s} if start_s > 0 else {}
    if duration_s is not None:
        kwargs["t"] = duration_s
    try:
        out, _ = (
            ffmpeg.input(_source(media), **kwargs)
            .output("pipe:", format="f32le", acodec="pcm_f32le", ac=1, ar=sample_rate, map="0:a:0")
            .global_args("-nostdin", "-v", "error")
            .run(capture_stdout=True, capture_stderr=True)
        )
    except ffmpeg.Error as exc:
        raise AudioError(media, f"ffmpeg could not extract the audio ({_reason(exc)})") from exc
    wave = np.frombuffer(out, dtype=np.float32).copy()
    if wave.size == 0:
        raise AudioError(media, "no audio samples in the requested segment")
    if not np.isfinite(wave).all():
        raise AudioError(media, "audio contains NaN or Inf samples")
    save_audio(out_path, wave, sample_rate)
    return int(wave.size)


def extract_frames(
    media: str | Path, frames_dir: Path, fps: float = 1.0, size: int = 224, start_s: float = 0.0, duration_s: float | None = None
) -> list[str]:
    """Write ``fps`` frames per second as ``size``-px square JPEGs into ``frames_dir``; returns the names."""
    frames_dir = Path(frames_dir)
    frames_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(frames_dir.parent, f".{frames_dir.name}.")  # the umask's mode, not 0700
    kwargs = {"ss": start_s} if start_s > 0 else {}
    if duration_s is not None:
        kwargs["t"] = duration_s
    try:
        stream = ffmpeg.input(_source(media), **kwargs).video
        stream = stream.filter("fps", fps=fps)
        # short side to `size` then a centre crop (CLIPSep/OmniSep frames)
        stream = stream.filter("scale", f"if(gt(iw,ih),-2,{size})", f"if(gt(iw,ih),{size},-2)")
        stream = stream.filter("crop", size, size)
        (
            ffmpeg.output(stream, str(tmp / "%03d.jpg"), start_number=0, **{"q:v": 3})
            .global_args("-nostdin", "-v", "error")
            .run(capture_stdout=True, capture_stderr=True)
        )
        names = sorted(p.name for p in tmp.glob("*.jpg"))
        if not names:
            raise AudioError(media, "no video frames in the requested segment")
        if frames_dir.exists():
            shutil.rmtree(frames_dir)
        tmp.rename(frames_dir)
        return names
    except ffmpeg.Error as exc:
        raise AudioError(media, f"ffmpeg could not extract frames ({_reason(exc)})") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
