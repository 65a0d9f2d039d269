"""The one scoring path of `marsctl eval` (marsctl.eval): floors, n per metric, per-system
summaries, resampled estimates, the public `score` API, flags, progress and 80-column output."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from rich.console import Console
from typer.testing import CliRunner

from marsctl.audio.resample import resample
from marsctl.cli.main import app
from marsctl.eval import DB_FLOOR, evaluate_folders, score
from marsctl.eval import model as model_eval
from marsctl.eval.model import ClapScorer, score_mixture, summarize, write_evaluation
from marsctl.eval.tables import RICH_SCORE_METRICS, summary_rich_table
from marsctl.metrics import bss_eval_sources, si_sdr
from marsctl.progress import stage_progress, track

SR = 16_000


def write(path: Path, wave: np.ndarray, sr: int = SR) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.asarray(wave, dtype=np.float32), sr, subtype="FLOAT")


def two_sources(rng: np.random.Generator, length: int, f0: float = 300.0) -> np.ndarray:
    a = np.convolve(rng.standard_normal(length), np.hanning(16), "same") * 0.1
    b = 0.2 * np.sin(2 * np.pi * f0 * np.arange(length) / SR)
    return np.stack([a, b])


def test_silent_estimate_is_scored_at_the_floor_and_counted_in_the_mean(tmp_path):
    """A silent estimate used to be NaN, left out of the means: silence scored better than the mixture."""
    rng = np.random.default_rng(0)
    refs, ests, as_mixture = tmp_path / "refs", tmp_path / "ests", tmp_path / "ests_mix"
    for i in range(2):
        sources = two_sources(rng, 8000, 300 + 100 * i)
        for name, ref in zip(("dog", "violin"), sources):
            write(refs / f"m{i}" / f"{name}.wav", ref)
            write(ests / f"m{i}" / f"{name}.wav", ref + 0.2 * sources.sum(0) + 0.01 * rng.standard_normal(8000))
            write(as_mixture / f"m{i}" / f"{name}.wav", ref + 0.2 * sources.sum(0) + 0.01 * rng.standard_normal(8000))
        write(refs / f"m{i}" / "mixture.wav", sources.sum(0))
    write(ests / "m1" / "violin.wav", np.zeros(8000))
    write(as_mixture / "m1" / "violin.wav", sf.read(refs / "m1" / "mixture.wav")[0])
    report = evaluate_folders(ests, refs)
    silent_row = next(r for r in report.rows if (r.mixture, r.source) == ("m1", "violin"))
    assert silent_row.sdr == DB_FLOOR and silent_row.sar == DB_FLOOR and silent_row.si_sdr == DB_FLOOR
    assert "floor" in silent_row.note
    summary = report.summary()
    assert all(summary[m].count == 4 for m in ("sdr", "sar", "si_sdr", "si_sdri", "stft_distance"))
    with_mixture = evaluate_folders(as_mixture, refs).summary()
    assert summary["si_sdr"].mean < with_mixture["si_sdr"].mean
    # the other source of the mixture keeps its real scores
    dog = next(r for r in report.rows if (r.mixture, r.source) == ("m1", "dog"))
    assert dog.sdr is not None and dog.sdr > 5


def test_cells_show_n_when_a_metric_has_fewer_values(tmp_path):
    rng = np.random.default_rng(1)
    refs, ests = tmp_path / "refs", tmp_path / "ests"
    sources = two_sources(rng, 6000)
    for name, ref in zip(("a", "b"), sources):
        write(refs / "pair" / f"{name}.wav", ref)
        write(ests / "pair" / f"{name}.wav", ref + 0.1 * sources.sum(0))
    write(refs / "solo.wav", sources[0])
    write(ests / "solo.wav", sources[0] + 0.05 * rng.standard_normal(6000))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["eval", "-e", str(ests), "-r", str(refs), "-o", str(out)])
    assert result.exit_code == 0, result.output
    markdown = (out / "summary.md").read_text()
    assert "(n=2)" in markdown  # SIR: the single source has none
    summary = {(r["group"], r["metric"]): r for r in csv.DictReader(open(out / "summary.csv"))}
    assert summary[("all", "sir")]["n"] == "2" and summary[("all", "sdr")]["n"] == "3"


def test_public_score_api_on_tensors_and_files(tmp_path):
    rng = np.random.default_rng(2)
    refs = torch.from_numpy(two_sources(rng, 9000))
    ests = refs + 0.2 * refs.flip(0) + 0.01 * torch.from_numpy(rng.standard_normal(refs.shape))
    mixture = refs.sum(0)
    got = score(ests, refs, mixture, sample_rate=SR)
    expected = bss_eval_sources(refs, ests)
    torch.testing.assert_close(got["sdr"], expected.sdr)
    torch.testing.assert_close(got["sir"], expected.sir)
    torch.testing.assert_close(got["si_sdr"], si_sdr(refs, ests))
    torch.testing.assert_close(got["si_sdri"], si_sdr(refs, ests) - si_sdr(refs, mixture.expand_as(refs)))
    assert set(got) == {"sdr", "sir", "sar", "si_sdr", "si_sdri", "stft_distance"}
    import marsctl

    assert marsctl.score is score
    one = score(ests[0], refs[0])
    assert torch.isnan(one["sir"]).all() and torch.isnan(one["si_sdri"]).all() and torch.isfinite(one["sdr"]).all()
    silent = score(torch.zeros_like(ests), refs, mixture)
    assert (silent["si_sdr"] == DB_FLOOR).all() and (silent["sdr"] == DB_FLOOR).all()
    nan = score(torch.full_like(ests, math.nan), refs)
    assert (nan["sdr"] == DB_FLOOR).all() and torch.isfinite(nan["stft_distance"]).all()
    # the same from files (float32 on disk)
    for name, wave in (("ref_a", refs[0]), ("ref_b", refs[1]), ("est_a", ests[0]), ("est_b", ests[1]), ("mix", mixture)):
        write(tmp_path / f"{name}.wav", wave.numpy())
    from_files = score([tmp_path / "est_a.wav", tmp_path / "est_b.wav"], [tmp_path / "ref_a.wav", tmp_path / "ref_b.wav"], tmp_path / "mix.wav")
    np.testing.assert_allclose(from_files["sdr"].numpy(), got["sdr"].numpy(), atol=0.01)


@pytest.mark.parametrize("estimate_rate", [8_000, 44_100])
def test_estimates_at_another_rate_against_an_odd_length_reference(tmp_path, estimate_rate):
    """Resampling back to 16 kHz adds or loses one sample: trimmed or padded, not a length mismatch."""
    rng = np.random.default_rng(3)
    length = 16_001  # odd
    sources = two_sources(rng, length)
    refs, ests = tmp_path / "refs", tmp_path / "ests"
    for name, ref in zip(("a", "b"), sources):
        write(refs / "m" / f"{name}.wav", ref)
        estimate = ref + 0.1 * sources.sum(0)
        write(ests / "m" / f"{name}.wav", resample(torch.from_numpy(estimate).float(), SR, estimate_rate).numpy(), estimate_rate)
    write(refs / "m" / "mixture.wav", resample(torch.from_numpy(sources.sum(0)).float(), SR, estimate_rate).numpy(), estimate_rate)
    report = evaluate_folders(ests, refs)
    assert report.failures == []
    assert len(report.rows) == 2 and all(r.si_sdri is not None and r.sdr > 5 for r in report.rows)
    assert all(f"estimate resampled {estimate_rate}->{SR} Hz" in r.note for r in report.rows)
    api = score([ests / "m" / "a.wav", ests / "m" / "b.wav"], [refs / "m" / "a.wav", refs / "m" / "b.wav"])
    np.testing.assert_allclose(api["sdr"].numpy(), [r.sdr for r in report.rows], atol=1e-6)


def model_rows(silent_model: bool):
    rng = np.random.default_rng(4)
    sources = two_sources(rng, 16_000).astype(np.float32)
    mix = model_eval.TestMixture("mix0", sources.sum(0), sources, ["dog", "violin"], ["c0", "c1"], [[], []])
    mixture = torch.from_numpy(mix.mixture)
    model_estimates = torch.from_numpy(sources + 0.1 * sources[::-1].copy())
    if silent_model:
        model_estimates[1] = 0.0
    from marsctl.config import SignalConfig
    from marsctl.models.encoders import load_encoder

    systems = [("mixture", "-", mixture.expand(2, -1)), ("model", "text", model_estimates), ("oracle-irm", "-", torch.from_numpy(sources))]
    return score_mixture(mix, systems, ClapScorer(load_encoder("builtin"), SR), SignalConfig())


def test_model_evaluation_floors_silent_estimates_and_reports_per_system_only(tmp_path):
    rows = model_rows(silent_model=True)
    model = [r for r in rows if r["system"] == "model"]
    assert model[1]["si_sdr"] == DB_FLOOR and model[1]["sdr"] == DB_FLOOR and "floor" in model[1]["note"]
    assert math.isfinite(model[0]["sdr"]) and model[0]["sdr"] > 5  # the other source keeps its score
    entry = next(e for e in summarize(rows) if e["system"] == "model")
    assert entry["si_sdr_n"] == 2 and entry["sdr_n"] == 2 and entry["n"] == 2
    paths = write_evaluation(rows, tmp_path / "report", {"model": "m", "data": "d"})
    assert "| all |" not in paths["markdown"].read_text()
    assert {r["group"] for r in csv.DictReader(open(paths["summary_csv"]))} == {"system", "class"}
    standard = json.loads(paths["json"].read_text())
    assert "summary" not in standard and set(standard["by"]["system"]) == {"mixture", "model (text query)", "oracle-irm"}
    overall = json.loads(paths["model_summary_json"].read_text())["overall"]
    assert [e["system"] for e in overall] == ["mixture", "model", "oracle-irm"]


def test_short_flags_and_mixtures_with_data(tmp_path):
    import typer.main

    eval_command = typer.main.get_command(app).commands["eval"]
    separate_command = typer.main.get_command(app).commands["separate"]
    short = lambda command, flag: next(p.name for p in command.params if flag in p.opts)  # noqa: E731
    assert short(eval_command, "-m") == short(separate_command, "-m") == "model"
    mixtures = next(p for p in eval_command.params if p.name == "mixtures")
    assert mixtures.opts == ["--mixtures"]
    result = CliRunner().invoke(app, ["eval", "--data", str(tmp_path), "--mixtures", str(tmp_path)])
    assert result.exit_code == 2
    assert "--mixtures" in result.output and "cannot be combined" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_progress_prints_plain_counted_lines_when_not_a_terminal():
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=False, width=120)
    assert list(track(range(20), 20, "Scoring mixtures", console)) == list(range(20))
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 10 and lines[0].startswith("Scoring mixtures: 2/20 (10%)") and "20/20 (100%)" in lines[-1]
    buffer = io.StringIO()
    with stage_progress("Separating", None, console=Console(file=buffer, force_terminal=False)) as advance:
        for _ in range(25):
            advance()
    assert buffer.getvalue().splitlines()[-1].startswith("Separating: 25")
    buffer = io.StringIO()
    assert list(track(range(3), 3, "quiet", Console(file=buffer, force_terminal=False), show=False)) == [0, 1, 2]
    assert buffer.getvalue() == ""


def test_help_and_tables_are_readable_at_80_columns():
    env = {**os.environ, "COLUMNS": "80", "TERM": "xterm"}
    help_text = subprocess.run([sys.executable, "-m", "marsctl", "eval", "--help"], capture_output=True, text=True, env=env).stdout
    assert "--mixtures" in help_text and "…" not in help_text and "list[" not in help_text
    assert all(len(line) <= 80 for line in help_text.splitlines())
    entries = [
        {"system": system, "query_modality": "-", "label": "acoustic guitar", "n": 100,
         **{f"{m}_{k}": v for m in ("sdr", "sir", "sar", "si_sdri", "judge_score", "reward_encoder_score") for k, v in (("mean", -12.345), ("se", 10.5), ("n", 100))}}
        for system in ("mixture", "oracle-irm")
    ]
    buffer = io.StringIO()
    Console(file=buffer, width=80, force_terminal=False).print(summary_rich_table(entries))
    text = buffer.getvalue()
    assert "…" not in text and "oracle-" in text and "acoustic" in text and "-12.35" in text
    assert "Judge" not in text  # the separation metrics; the text-audio scores are a second table
    buffer = io.StringIO()
    Console(file=buffer, width=80, force_terminal=False).print(summary_rich_table(entries, metrics=RICH_SCORE_METRICS))
    scores = buffer.getvalue()
    assert "…" not in scores and "Judge" in scores and "Reward" in scores and "-12.35" in scores and "SDR" not in scores
