"""Evaluating a trained separator on fixed test mixtures (marsctl.eval.model)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from marsctl.errors import MarsctlError
from marsctl.eval.model import evaluate_separator, oracle_irm, summarize, write_evaluation
from marsctl.audio import Spectrogram
from marsctl.separate import load_model_and_encoder
from marsctl.train.supervised import train_supervised
from marsctl.models.encoders import load_encoder
from test_separator_fixtures import make_tone_dataset
from test_train_sup_worker import small_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = make_tone_dataset(root / "data", mixtures_per_split=4, frames=True)
    config = small_config(str(data), max_steps=40, encoder="builtin", query_modalities=("text",), val_every=40, checkpoint_every=40)
    train_supervised(config, root / "model", encoder=load_encoder("builtin"), device="cpu", progress=False)
    return root


def test_oracle_irm_is_exact_for_one_source():
    spec = Spectrogram().double()
    source = torch.randn(1, 8000, dtype=torch.float64)
    torch.testing.assert_close(oracle_irm(source[0], source, spec), source, atol=1e-6, rtol=1e-6)


def test_evaluate_rows_references_and_report(trained, tmp_path):
    model, encoder = load_model_and_encoder(trained / "model")
    rows = evaluate_separator(model, encoder, trained / "data", query_modalities=("text", "audio", "omni"))
    systems = {(r["system"], r["query_modality"]) for r in rows}
    assert systems == {("mixture", "-"), ("oracle-irm", "-"), ("model", "text"), ("model", "audio"), ("model", "omni")}
    assert len(rows) == 5 * 4 * 2  # 5 systems x 4 test mixtures x 2 sources
    summary = {(e["system"], e["query_modality"]): e for e in summarize(rows)}
    assert summary[("mixture", "-")]["si_sdri_mean"] == pytest.approx(0.0, abs=1e-9)
    mixture_sdr = summary[("mixture", "-")]["sdr_mean"]
    model_text = summary[("model", "text")]
    oracle = summary[("oracle-irm", "-")]
    assert model_text["si_sdri_mean"] > 2.0 and model_text["sdr_mean"] > mixture_sdr
    assert oracle["sdr_mean"] > model_text["sdr_mean"]
    # the model's own encoder's text-audio score; no judge given, so no judge column
    assert all(math.isfinite(r["reward_encoder_score"]) and -100 <= r["reward_encoder_score"] <= 100 for r in rows)
    assert not any("judge_score" in r for r in rows)
    per_class = summarize(rows, by_label=True)
    assert {e["label"] for e in per_class} <= {"low hum", "high whistle", "noise hiss"}
    paths = write_evaluation(rows, tmp_path / "report", {"model": "m", "data": "d"})
    report = paths["model_summary_md"].read_text()
    assert "oracle-irm" in report and "SI-SDRi" in report and "## Per class" in report
    data = json.loads(paths["model_summary_json"].read_text())
    assert data["overall"][0]["system"] == "mixture"
    standard = json.loads(paths["json"].read_text())
    assert standard["counts"]["sources"] == len(rows)
    assert set(standard["by"]["system"]) == {"mixture", "oracle-irm", "model (text query)", "model (audio query)", "model (omni query)"}
    assert standard["by"]["system"]["model (text query)"]["si_sdri"]["mean"] == pytest.approx(model_text["si_sdri_mean"])
    assert paths["scores_csv"].read_text().count("\n") == len(rows) + 1


def test_image_queries_and_datasets_without_frames(trained, tmp_path):
    model, encoder = load_model_and_encoder(trained / "model")
    rows = evaluate_separator(model, encoder, trained / "data", query_modalities=("image",), references=False, limit=2)
    assert {(r["system"], r["query_modality"]) for r in rows} == {("model", "image")}
    assert len(rows) == 4 and all(math.isfinite(r["sdr"]) and math.isfinite(r["reward_encoder_score"]) for r in rows)
    no_frames = make_tone_dataset(tmp_path / "plain", mixtures_per_split=1)
    with pytest.raises(MarsctlError, match="no image query .*no video frames"):
        evaluate_separator(model, encoder, no_frames, query_modalities=("image",), references=False)
    with pytest.raises(MarsctlError, match="unknown query modality"):
        evaluate_separator(model, encoder, trained / "data", query_modalities=("smell",))


def test_evaluate_model_on_dataset_writes_the_reports(trained, tmp_path):
    from marsctl.eval.model import evaluate_model_on_dataset

    seen = []
    rows, paths = evaluate_model_on_dataset(trained / "model", trained / "data", tmp_path / "out", ("text",), limit=2, device="cpu", on_mixture=seen.append)
    assert len(seen) == 2 and len(rows) == 3 * 2 * 2
    assert all(p.is_file() for p in paths.values())
    meta = json.loads(paths["model_summary_json"].read_text())["meta"]
    assert meta["encoder"] == "builtin" and meta["split"] == "test"
    # no --judge: the report says so, and labels the own-encoder score as not independent
    assert meta["judge"] is None and "no independent judge" in meta["judge_note"]
    assert "No independent judge was given" in paths["model_summary_md"].read_text()
    assert "not an independent measure" in paths["model_summary_md"].read_text()


def test_eval_cli_with_model_and_data(trained, tmp_path):
    import typer
    from typer.testing import CliRunner

    from marsctl.cli import eval as eval_cli

    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """test app"""

    eval_cli.register(app)
    runner = CliRunner()
    result = runner.invoke(app, ["eval", "--model", str(trained / "model"), "--data", str(trained / "data"), "--limit", "2",
                                 "--query-modality", "text", "--query-modality", "audio", "--out", str(tmp_path / "r"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)["summary"]
    assert {(e["system"], e["query_modality"]) for e in summary} == {("mixture", "-"), ("oracle-irm", "-"), ("model", "text"), ("model", "audio")}
    assert (tmp_path / "r" / "model_summary.md").is_file() and (tmp_path / "r" / "summary.md").is_file()
    # not a terminal: a counted progress line instead of a silent spinner
    assert "Separating and scoring mixtures: 2/2 (100%)" in result.stderr
    missing = runner.invoke(app, ["eval", "--model", str(trained / "model")])
    assert missing.exit_code != 0 and "--data" in missing.output
    neither = runner.invoke(app, ["eval", "--estimates", str(tmp_path)])
    assert neither.exit_code != 0 and "--references" in neither.output
