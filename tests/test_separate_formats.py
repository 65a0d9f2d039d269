"""Output formats of `marsctl separate` (issue 28, item 5): the rate of the files written (default: the
input's), wav/flac with their subtypes, channels averaged; left at 16 kHz mono float, the same samples
as the separator's own stream."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

from marsctl.audio import load_audio, open_audio_stream, resample
from marsctl.cli.main import app
from marsctl.errors import ConfigError
from marsctl.separate import InputFile, Query, SeparateOptions, Separator

SR = 44_100


def _stereo(seconds: float, sr: int) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    left = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sign(np.sin(2 * np.pi * 196 * t))
    right = 0.2 * np.sin(2 * np.pi * 660 * t) + 0.05 * np.random.default_rng(0).standard_normal(len(t))
    return np.stack([left, right], axis=1).astype(np.float32)


@pytest.fixture(scope="module")
def separator():
    return Separator.from_pretrained("default", device="cpu")


def _separate(separator, path, out, **formats):
    report = separator.separate_files([(InputFile(path, path.with_suffix("").relative_to(path.parent)), Query(texts=("violin",)))],
                                      out, residual=True, **formats)
    assert not report.failures, report.failures
    return report


def test_outputs_default_to_the_input_rate_and_the_residual_completes_the_mixture(separator, tmp_path):
    path = tmp_path / "song.wav"
    sf.write(path, _stereo(2.5, SR), SR, subtype="FLOAT")
    _separate(separator, path, tmp_path / "out")
    estimate, rate = sf.read(tmp_path / "out" / "song" / "violin.wav", dtype="float32")
    residual, _ = sf.read(tmp_path / "out" / "song" / "violin.residual.wav", dtype="float32")
    mixture = load_audio(path, None)  # channels averaged, at 44.1 kHz
    assert rate == SR and estimate.ndim == 1 and len(estimate) == len(residual) == len(mixture)
    np.testing.assert_allclose(estimate + residual, mixture, atol=1e-6)
    # the separator's 16 kHz estimate (the in-memory API on the same file), resampled back to the input's rate
    at_model_rate = separator.separate(path, query="violin")
    np.testing.assert_allclose(estimate, resample(at_model_rate, 16_000, SR).numpy()[: len(mixture)], atol=1e-5)


def test_left_at_16_khz_mono_float_the_files_hold_the_separators_samples_bit_for_bit(separator, tmp_path):
    for name, rate, given in (("mono16k.wav", 16_000, None), ("stereo44k.wav", SR, 16_000)):
        path = tmp_path / name
        wave = _stereo(2.0, rate)
        sf.write(path, wave[:, 0] if rate == 16_000 else wave, rate, subtype="FLOAT")
        _separate(separator, path, tmp_path / "out", sample_rate=given)
        expected = separator.separate(path, query="violin")  # the in-memory API: the file streamed at 16 kHz
        mixture = torch.cat(list(open_audio_stream(path, 16_000)))
        estimate, out_rate = sf.read(tmp_path / "out" / path.stem / "violin.wav", dtype="float32")
        residual, _ = sf.read(tmp_path / "out" / path.stem / "violin.residual.wav", dtype="float32")
        assert out_rate == 16_000 and sf.info(str(tmp_path / "out" / path.stem / "violin.wav")).subtype == "FLOAT"
        assert np.array_equal(estimate, expected.numpy()) and np.array_equal(residual, (mixture - expected).numpy())


@pytest.mark.parametrize(("fmt", "subtype", "step"), [("flac", None, 2.0 ** -23), ("flac", "PCM_16", 2.0 ** -15), ("wav", "PCM_24", 2.0 ** -23)])
def test_format_and_subtype_round_trip(separator, tmp_path, fmt, subtype, step):
    path = tmp_path / "clip.wav"
    sf.write(path, _stereo(1.5, 22_050), 22_050, subtype="FLOAT")
    _separate(separator, path, tmp_path / "float", sample_rate=32_000)
    _separate(separator, path, tmp_path / "coded", sample_rate=32_000, format=fmt, subtype=subtype)
    written = tmp_path / "coded" / "clip" / f"violin.{fmt}"
    info = sf.info(str(written))
    assert (info.format, info.subtype, info.samplerate, info.channels) == (fmt.upper(), subtype or "PCM_24", 32_000, 1)
    assert (tmp_path / "coded" / "clip" / f"violin.residual.{fmt}").is_file()
    reference, rate = sf.read(tmp_path / "float" / "clip" / "violin.wav", dtype="float32")
    coded = sf.read(written, dtype="float32")[0]
    assert rate == 32_000 and len(coded) == len(reference) == len(load_audio(path, 32_000))
    assert 0 < np.abs(coded - reference).max() <= step  # the same samples, up to the subtype's quantization


def test_bad_format_options_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="--subtype FLOAT: not available for --format flac"):
        SeparateOptions(format="flac", subtype="FLOAT")
    with pytest.raises(ConfigError, match="--format mp3: unknown output format"):
        SeparateOptions(format="mp3")
    wav = tmp_path / "x.wav"
    sf.write(wav, np.zeros(1600, dtype=np.float32), 16_000)
    result = CliRunner().invoke(app, ["separate", str(wav), "-q", "violin", "--sample-rate", "12", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--sample-rate 12: expected a rate in Hz" in result.output
