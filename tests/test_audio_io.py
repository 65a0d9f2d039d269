"""load_audio / save_audio on real files of every supported kind, and on broken ones."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import soundfile as sf
import torch

from marsctl.audio import load_audio, resample, save_audio
from marsctl.audio.io import load_audio_native
from marsctl.errors import AudioError

SR = 16_000


def tone(seconds=0.5, freq=440.0, sr=SR, channels=1):
    t = np.arange(int(seconds * sr)) / sr
    wave = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return np.stack([wave] * channels, axis=1) if channels > 1 else wave


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], check=True)


@pytest.mark.parametrize("suffix,subtype", [(".wav", "PCM_16"), (".wav", "FLOAT"), (".flac", "PCM_16"), (".ogg", "VORBIS")])
def test_soundfile_formats_load_mono_float32(tmp_path, suffix, subtype):
    path = tmp_path / f"x{suffix}"
    sf.write(path, tone(channels=2), SR, subtype=subtype)
    wave = load_audio(path, SR)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert len(wave) == int(0.5 * SR)
    tol = 0.05 if subtype == "VORBIS" else 1e-3
    assert np.abs(wave - tone()).max() < tol


@pytest.mark.parametrize("suffix", [".mp3", ".m4a", ".mp4"])
def test_ffmpeg_formats(tmp_path, suffix):
    src = tmp_path / "src.wav"
    sf.write(src, tone(seconds=1.0, sr=44_100), 44_100)
    out = tmp_path / f"x{suffix}"
    if suffix == ".mp4":  # a real video container with an audio track
        ffmpeg("-f", "lavfi", "-i", "color=c=blue:s=64x64:d=1", "-i", str(src), "-shortest", "-c:v", "libx264", "-c:a", "aac", str(out))
    else:
        ffmpeg("-i", str(src), str(out))
    wave = load_audio(out, SR)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) - SR) < 0.1 * SR  # encoder padding is allowed
    # the decoded signal is still a 440 Hz tone
    spectrum = np.abs(np.fft.rfft(wave))
    assert abs(np.argmax(spectrum) * SR / len(wave) - 440) < 5


def test_resamples_to_requested_rate(tmp_path):
    path = tmp_path / "x.wav"
    sf.write(path, tone(seconds=1.0, sr=44_100), 44_100)
    wave = load_audio(path, SR)
    assert len(wave) == SR
    native, rate = load_audio_native(path)
    assert rate == 44_100 and len(native) == 44_100
    assert len(load_audio(path, None)) == 44_100


def test_resample_keeps_a_tone_in_band():
    wave = torch.from_numpy(tone(seconds=1.0, freq=1000, sr=48_000))
    out = resample(wave, 48_000, SR)
    assert out.shape == (SR,)
    spectrum = torch.fft.rfft(out).abs()
    assert abs(int(spectrum.argmax()) - 1000) <= 1
    assert torch.allclose(resample(wave, 48_000, 48_000), wave)


def test_errors_name_the_file_and_the_problem(tmp_path):
    cases: dict[str, str] = {}
    cases["missing.wav"] = "no such file"
    (tmp_path / "empty.wav").write_bytes(b"")
    cases["empty.wav"] = "empty"
    (tmp_path / "text.wav").write_text("this is not audio at all\n" * 20)
    cases["text.wav"] = "not a readable audio file"
    (tmp_path / "text.mp3").write_text("not an mp3 either\n" * 20)
    cases["text.mp3"] = "not a readable audio"
    sf.write(tmp_path / "zero.wav", np.zeros(0, dtype=np.float32), SR)
    cases["zero.wav"] = "no audio samples"
    bad = tone()
    bad[100] = np.nan
    sf.write(tmp_path / "nan.wav", bad, SR, subtype="FLOAT")
    cases["nan.wav"] = "NaN or Inf"
    inf = tone()
    inf[5] = np.inf
    sf.write(tmp_path / "inf.wav", inf, SR, subtype="FLOAT")
    cases["inf.wav"] = "NaN or Inf"
    sf.write(tmp_path / "full.wav", tone(seconds=1.0), SR, subtype="PCM_16")
    data = (tmp_path / "full.wav").read_bytes()
    (tmp_path / "truncated.wav").write_bytes(data[: len(data) // 2])
    cases["truncated.wav"] = "truncated"
    sf.write(tmp_path / "full.flac", tone(seconds=1.0), SR)
    data = (tmp_path / "full.flac").read_bytes()
    (tmp_path / "truncated.flac").write_bytes(data[: len(data) // 2])
    cases["truncated.flac"] = ""  # libsndfile's own words differ by version; the file must still be named
    (tmp_path / "dir.wav").mkdir()
    cases["dir.wav"] = "directory"
    for name, problem in cases.items():
        with pytest.raises(AudioError) as info:
            load_audio(tmp_path / name, SR)
        message = str(info.value)
        assert str(tmp_path / name) in message, message
        assert problem in message, message
        assert "\n" not in message


def test_save_audio_round_trip_and_atomicity(tmp_path):
    wave = tone()
    path = save_audio(tmp_path / "sub" / "out.wav", wave, SR)
    assert np.array_equal(load_audio(path, SR), wave)  # float wav: bit exact
    flac = save_audio(tmp_path / "out.flac", wave, SR)
    assert np.abs(load_audio(flac, SR) - wave).max() < 1e-5
    stereo = save_audio(tmp_path / "st.wav", np.stack([wave, -wave]), SR)
    assert sf.info(stereo).channels == 2
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["out.flac", "out.wav", "st.wav"]
    with pytest.raises(AudioError, match="cannot write"):
        save_audio(tmp_path / "x.mp3", wave, SR)
    assert not list(tmp_path.glob("*.mp3")) and not list(tmp_path.glob(".*"))
