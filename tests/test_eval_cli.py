"""`marsctl eval` on folders, end to end: through Typer's runner and a real subprocess."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import mir_eval
import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from marsctl.cli.main import app
from marsctl.eval import evaluate_folders

SR = 16_000
T = 12_000


def write(path: Path, wave: np.ndarray, sr: int = SR) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, wave.astype(np.float32), sr, subtype="FLOAT")


@pytest.fixture()
def folders(tmp_path):
    """Three two-source mixtures (one with its mixture elsewhere), one single-source mixture."""
    rng = np.random.default_rng(0)
    refs, ests, mixes = tmp_path / "refs", tmp_path / "ests", tmp_path / "mixes"
    truth = {}
    for i in range(3):
        a = np.convolve(rng.standard_normal(T), np.hanning(16), "same") * 0.1
        b = 0.2 * np.sin(2 * np.pi * (300 + 100 * i) * np.arange(T) / SR)
        mid = f"mix{i}"
        write(refs / mid / "dog.wav", a)
        write(refs / mid / "violin.wav", b)
        write(ests / mid / "dog.wav", a + 0.3 * b + 0.01 * rng.standard_normal(T))
        write(ests / mid / "violin.wav", b + 0.2 * a + 0.01 * rng.standard_normal(T))
        if i < 2:
            write(refs / mid / "mixture.wav", a + b)
        else:
            write(mixes / f"{mid}.wav", a + b)
        truth[mid] = (np.stack([a, b]), None)
    solo = 0.1 * rng.standard_normal(T)
    write(refs / "solo.wav", solo)
    write(ests / "solo.wav", solo + 0.05 * rng.standard_normal(T))
    write(mixes / "solo.wav", solo + 0.1 * rng.standard_normal(T))
    return refs, ests, mixes


def test_folder_scores_match_mir_eval_and_sources_are_scored_jointly(folders):
    refs, ests, mixes = folders
    report = evaluate_folders(ests, refs, mixes)
    assert report.failures == []
    rows = {(r.mixture, r.source): r for r in report.rows}
    assert set(rows) == {("mix0", "dog"), ("mix0", "violin"), ("mix1", "dog"), ("mix1", "violin"), ("mix2", "dog"), ("mix2", "violin"), ("solo", "solo")}
    for mid in ("mix0", "mix2"):
        ref = np.stack([sf.read(refs / mid / f"{s}.wav")[0] for s in ("dog", "violin")])
        est = np.stack([sf.read(ests / mid / f"{s}.wav")[0] for s in ("dog", "violin")])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sdr, sir, sar, _ = mir_eval.separation.bss_eval_sources(ref, est, compute_permutation=False)
        for j, s in enumerate(("dog", "violin")):
            assert rows[(mid, s)].sdr == pytest.approx(sdr[j], abs=0.01)
            assert rows[(mid, s)].sir == pytest.approx(sir[j], abs=0.01)
            assert rows[(mid, s)].sar == pytest.approx(sar[j], abs=0.01)
            assert rows[(mid, s)].si_sdri is not None and rows[(mid, s)].si_sdri > 0
    solo = rows[("solo", "solo")]
    assert solo.sir is None and "SIR undefined" in solo.note and solo.sdr is not None
    assert solo.si_sdri is not None and solo.si_sdri > 0
    # without --mixtures, mix2 and solo have no mixture: SI-SDRi is left undefined, not invented
    plain = {(r.mixture, r.source): r for r in evaluate_folders(ests, refs).rows}
    assert plain[("mix2", "dog")].si_sdri is None and plain[("mix0", "dog")].si_sdri is not None


def test_problems_are_reported_per_file_and_the_run_goes_on(folders, tmp_path):
    refs, ests, mixes = folders
    write(refs / "mix3" / "cat.wav", np.ones(T) * 0.1)  # no estimate
    write(ests / "mix3" / "extra.wav", np.ones(T) * 0.1)  # no reference
    write(ests / "mix0" / "violin.wav", np.zeros(T - 10) + 0.1)  # length mismatch
    (ests / "mix1" / "dog.wav").write_bytes(b"garbage, not a wav file" * 10)  # unreadable
    report = evaluate_folders(ests, refs, mixes)
    reasons = {Path(f.path).relative_to(tmp_path).as_posix(): f.reason for f in report.failures}
    assert "no estimate" in reasons["ests/mix3/cat.wav"]
    assert "no matching reference" in reasons["ests/mix3/extra.wav"]
    assert "length mismatch" in reasons["ests/mix0/violin.wav"]
    assert "not a readable audio file" in reasons["ests/mix1/dog.wav"]
    scored = {(r.mixture, r.source) for r in report.rows}
    assert ("mix0", "dog") in scored and ("mix0", "violin") not in scored
    assert ("mix2", "dog") in scored and ("mix2", "violin") in scored
    dog0 = next(r for r in report.rows if (r.mixture, r.source) == ("mix0", "dog"))
    assert "scored without violin" in dog0.note and dog0.sir is None


def test_cli_writes_reports_and_prints_summary(folders, tmp_path):
    refs, ests, mixes = folders
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["eval", "-e", str(ests), "-r", str(refs), "--mixtures", str(mixes), "-o", str(out), "--by-source"])
    assert result.exit_code == 0, result.output
    assert "SI-SDRi" in result.output and "±" in result.output and "violin" in result.output
    report = json.loads((out / "report.json").read_text())
    assert report["counts"] == {"mixtures": 4, "sources": 7, "failures": 0}
    assert report["summary"]["sir"]["count"] == 6  # the single-source SIR is undefined, not faked
    assert set(report["by"]["source"]) == {"dog", "violin", "solo"}
    with open(out / "scores.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 7 and rows[0]["mixture"] == "mix0"
    sdr_mean = np.mean([float(r["sdr"]) for r in rows])
    assert report["summary"]["sdr"]["mean"] == pytest.approx(sdr_mean, abs=1e-5)
    summary = list(csv.DictReader(open(out / "summary.csv")))
    assert {r["group"] for r in summary} == {"all", "source"}
    assert "| all |" in (out / "summary.md").read_text()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_cli_json_output_and_failure_exit_code(folders, tmp_path):
    refs, ests, mixes = folders
    (ests / "mix1" / "violin.wav").unlink()
    result = CliRunner().invoke(app, ["eval", "-e", str(ests), "-r", str(refs), "-o", str(tmp_path / "o"), "--json"])
    assert result.exit_code == 1
    payload = json.loads(result.stdout)
    assert payload["counts"]["failures"] == 1
    assert any("no estimate" in f["reason"] for f in payload["failures"])
    assert payload["outputs"]["json"].endswith("report.json")


def test_cli_bad_folder_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(app, ["eval", "-e", str(tmp_path / "nope"), "-r", str(tmp_path)])
    assert result.exit_code == 2
    assert "estimates directory does not exist" in result.output


def test_real_subprocess(folders, tmp_path):
    refs, ests, mixes = folders
    out = tmp_path / "sub"
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "marsctl", "eval", "--estimates", str(ests), "--references", str(refs), "--mixtures", str(mixes), "--out", str(out), "--json"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["counts"]["sources"] == 7
    assert (out / "summary.md").exists()
    help_text = subprocess.run([sys.executable, "-m", "marsctl", "eval", "--help"], capture_output=True, text=True, env=env).stdout
    assert "--estimates" in help_text and "SI-SDRi" in help_text


def test_cli_help_floor_is_the_scoring_floor_and_cli_import_stays_light():
    import subprocess
    import sys

    from marsctl.cli.eval import DB_FLOOR_IN_HELP
    from marsctl.eval.scoring import DB_FLOOR

    assert DB_FLOOR_IN_HELP == DB_FLOOR
    code = "import sys, marsctl.cli.main; print(sorted(m for m in ('numba', 'fast_bss_eval', 'marsctl.eval', 'marsctl.rl', 'marsctl.train') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]", f"importing the CLI loads {loaded}"
