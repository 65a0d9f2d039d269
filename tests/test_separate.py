"""``marsctl separate`` end to end: a folder with a long file, a corrupt file and a non-audio file;
mapping files; decode modes; existing outputs; bad checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
import typer
from typer.testing import CliRunner

from marsctl.cli import separate as separate_cli
from marsctl.cli import train as train_cli
from marsctl.metrics.separation import si_sdr_improvement
from marsctl.models.encoders import load_encoder
from marsctl.separate import Query, SeparateOptions, read_query_mapping, separate_waveform
from marsctl.models.separator import load_separator
from test_separator_fixtures import SR, make_tone_dataset, synth
from test_train_sup_worker import small_config
from marsctl.train.supervised import train_supervised

runner = CliRunner()
#: the shipped default reaches more than this mean SI-SDRi on its two example mixtures (see its model card)
DEFAULT_MODEL_MIN_SI_SDRI = 2.0


def make_app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """test app"""

    separate_cli.register(app)
    train_cli.register(app)
    return app


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small separator trained for real on the tone dataset with the built-in encoder."""
    root = tmp_path_factory.mktemp("sep")
    data = make_tone_dataset(root / "data")
    config = small_config(str(data), max_steps=40, encoder="builtin", query_modalities=("text",), val_every=40, checkpoint_every=40)
    train_supervised(config, root / "model", encoder=load_encoder("builtin"), device="cpu", progress=False)
    return root


def _mixture(seconds: float, seed: int):
    rng = np.random.default_rng(seed)
    hum, whistle = synth("low hum", seconds, rng) * 0.5, synth("high whistle", seconds, rng) * 0.5
    return hum, whistle, hum + whistle


def test_folder_with_long_corrupt_and_non_audio_files(trained, tmp_path):
    inputs = tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    hum, _, long_mix = _mixture(12.0, 1)  # 12 s: 24 chunks of the 0.5 s training window
    sf.write(inputs / "sub" / "long.wav", long_mix, SR, subtype="FLOAT")
    sf.write(inputs / "short.flac", _mixture(0.3, 2)[2], SR)  # shorter than one chunk
    (inputs / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    (inputs / "notes.txt").write_text("not audio")
    out = tmp_path / "out"
    result = runner.invoke(make_app(), ["separate", str(inputs), "--query", "low hum", "--model", str(trained / "model"),
                                        "--out", str(out), "--residual", "--batch-size", "3"])
    assert result.exit_code == 1, result.output
    assert "1 file(s) failed" in result.output and "broken.wav" in result.output
    assert "skipped 1 non-audio file" in result.output
    long_out, _ = sf.read(out / "sub" / "long" / "low-hum.wav")
    residual, _ = sf.read(out / "sub" / "long" / "low-hum.residual.wav")
    assert len(long_out) == len(long_mix)
    np.testing.assert_allclose(long_out + residual, long_mix, atol=1e-5)
    assert sf.info(out / "short" / "low-hum.wav").frames == int(0.3 * SR)
    assert not (out / "broken").exists() and not (out / "notes").exists()
    # the trained model really extracts the hum from the long file, chunk after chunk
    improvement = si_sdr_improvement(torch.from_numpy(hum)[None], torch.from_numpy(long_out)[None], torch.from_numpy(long_mix))
    assert improvement.item() > 3.0
    first = [si_sdr_improvement(torch.from_numpy(hum[s:s + SR])[None], torch.from_numpy(long_out[s:s + SR])[None],
                                torch.from_numpy(long_mix[s:s + SR])).item() for s in range(0, 11 * SR, SR)]
    assert min(first) > 0, first  # no bad seams: every second of the file improves

    # a second run keeps existing outputs; --overwrite replaces them
    stamp = (out / "short" / "low-hum.wav").stat().st_mtime_ns
    again = runner.invoke(make_app(), ["separate", str(inputs / "short.flac"), "-q", "low hum", "-m", str(trained / "model"), "-o", str(out)])
    assert again.exit_code == 0 and "kept 1 existing" in again.output
    assert (out / "short" / "low-hum.wav").stat().st_mtime_ns == stamp
    forced = runner.invoke(make_app(), ["separate", str(inputs / "short.flac"), "-q", "low hum", "-m", str(trained / "model"), "-o", str(out), "--overwrite"])
    assert forced.exit_code == 0 and (out / "short" / "low-hum.wav").stat().st_mtime_ns != stamp


def test_mapping_files_and_explicit_bad_inputs(trained, tmp_path):
    hum, whistle, mix = _mixture(1.0, 3)
    sf.write(tmp_path / "a.wav", mix, SR)
    sf.write(tmp_path / "hum_example.wav", synth("low hum", 1.0, np.random.default_rng(9)), SR)
    (tmp_path / "map.csv").write_text("path,query,query_audio\na.wav,high whistle,\na.wav,low hum|noise hiss,\na.wav,,hum_example.wav\n")
    (tmp_path / "map.json").write_text(json.dumps({"a.wav": "high whistle", "missing.wav": "low hum"}))
    jobs = read_query_mapping(tmp_path / "map.csv")
    assert [q.slug() for _, q in jobs] == ["high-whistle", "low-hum+noise-hiss", "audio-hum-example"]
    out = tmp_path / "out"
    ok = runner.invoke(make_app(), ["separate", "--queries", str(tmp_path / "map.csv"), "-m", str(trained / "model"), "-o", str(out)])
    assert ok.exit_code == 0, ok.output
    assert sorted(p.name for p in (out / "a").iterdir()) == ["audio-hum-example.wav", "high-whistle.wav", "low-hum+noise-hiss.wav"]
    whistle_est, _ = sf.read(out / "a" / "high-whistle.wav")
    assert si_sdr_improvement(torch.from_numpy(whistle)[None], torch.from_numpy(whistle_est)[None], torch.from_numpy(mix)).item() > 3.0
    missing = runner.invoke(make_app(), ["separate", "--queries", str(tmp_path / "map.json"), "-m", str(trained / "model"), "-o", str(tmp_path / "o2")])
    assert missing.exit_code == 1 and "missing.wav: no such file" in missing.output
    assert (tmp_path / "o2" / "a" / "high-whistle.wav").is_file()
    (tmp_path / "notes.txt").write_text("hello")
    named = runner.invoke(make_app(), ["separate", str(tmp_path / "notes.txt"), "-q", "x", "-m", str(trained / "model"), "-o", str(tmp_path / "o3")])
    assert named.exit_code == 1 and "notes.txt: not an audio file" in named.output
    noquery = runner.invoke(make_app(), ["separate", str(tmp_path / "a.wav"), "-m", str(trained / "model")])
    assert noquery.exit_code != 0 and "--query" in noquery.output


def test_decode_modes(trained):
    loaded = load_separator(trained / "model")
    _, _, mix = _mixture(2.0, 4)
    wave = torch.from_numpy(mix)
    q = torch.nn.functional.normalize(torch.randn(2, 384), dim=-1)
    outs = {d: separate_waveform(loaded.model, wave, q, SeparateOptions(decode=d)) for d in ("mode", "mean", "sample")}
    assert all(o.shape == (2, len(mix)) for o in outs.values())
    assert not torch.allclose(outs["mode"], outs["mean"]) and not torch.allclose(outs["mode"], outs["sample"])
    again = separate_waveform(loaded.model, wave, q, SeparateOptions(decode="sample"))
    torch.testing.assert_close(again, outs["sample"])  # seeded
    other = separate_waveform(loaded.model, wave, q, SeparateOptions(decode="sample", seed=1))
    assert not torch.allclose(other, outs["sample"])


def test_bad_checkpoints_give_one_clear_line(trained, tmp_path):
    sf.write(tmp_path / "a.wav", _mixture(0.5, 5)[2], SR)
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("config.json", "README.md"):
        (bad / name).write_bytes((trained / "model" / name).read_bytes())
    (bad / "model.safetensors").write_bytes(b"\x00" * 100)
    result = runner.invoke(make_app(), ["separate", str(tmp_path / "a.wav"), "-q", "x", "-m", str(bad)])
    assert result.exit_code == 2 and "corrupt weights" in result.output
    nothing = runner.invoke(make_app(), ["separate", str(tmp_path / "a.wav"), "-q", "x", "-m", str(tmp_path / "nope")])
    assert nothing.exit_code == 2 and "nope" in nothing.output


def test_query_slugs():
    assert Query(texts=("Dog barking!",)).slug() == "dog-barking"
    assert Query(texts=("piano", "violin"), negative=("drums",)).slug() == "piano+violin-not-drums"
    assert len(Query(texts=("x" * 300,)).slug()) <= 80
    with pytest.raises(Exception):
        Query()


def test_default_model_separates_the_shipped_examples(tmp_path):
    """The README demo: no --model (the embedded default), the shipped mapping file, scored by `eval`."""
    from marsctl.eval import evaluate_folders
    from marsctl.pretrained import EXAMPLE_REFERENCES_DIR, EXAMPLES_DIR

    examples = json.loads((EXAMPLES_DIR / "examples.json").read_text())
    assert len(examples) >= 2
    result = runner.invoke(make_app(), ["separate", "--queries", str(EXAMPLES_DIR / "queries.csv"), "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "default model" in result.output
    report = evaluate_folders(tmp_path, EXAMPLE_REFERENCES_DIR)
    assert not report.failures and len(report.rows) == 2 * len(examples)
    improvements = [row.si_sdri for row in report.rows]
    assert sum(improvements) / len(improvements) > DEFAULT_MODEL_MIN_SI_SDRI, improvements
    # a real everyday-sound mixture (held-out recording groups) is among the examples, and it is separated
    everyday = [e["file"].removesuffix(".flac") for e in examples if e.get("pair_kind") == "everyday"]
    assert everyday, examples
    everyday_rows = [row.si_sdri for row in report.rows if row.mixture in everyday]
    assert len(everyday_rows) == 2 and sum(everyday_rows) / 2 > 0.0, everyday_rows
