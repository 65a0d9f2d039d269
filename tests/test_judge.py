"""An independent judge: ``marsctl eval --model M --judge SPEC`` and RL validation's
``val_judge_score`` with the reward-hacking warning (marsctl.models.judge, marsctl.rl.judge)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from marsctl.errors import ConfigError, MarsctlError
from marsctl.eval.model import check_judge, evaluate_model_on_dataset, load_test_mixtures
from marsctl.models.encoders import BuiltinEncoder, BuiltinEncoderConfig, load_encoder, save_encoder
from marsctl.models.judge import TextAudioScorer, encoder_fingerprint
from marsctl.rl.judge import JUDGE_TOLERANCE, REWARD_TOLERANCE, SI_SDRI_TOLERANCE, RLJudge, SiSdriWitness, reward_hacking_warning
from marsctl.separate import load_model_and_encoder
from marsctl.train.supervised import train_supervised
from test_separator_fixtures import make_tone_dataset
from test_train_sup_worker import small_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A briefly trained separator whose query encoder is 'builtin', and two saved encoders: the
    same weights as 'builtin' in another folder, and a builtin encoder with another init_seed."""
    root = tmp_path_factory.mktemp("judge")
    data = make_tone_dataset(root / "data", mixtures_per_split=3)
    config = small_config(str(data), max_steps=10, encoder="builtin", query_modalities=("text",), val_every=10, checkpoint_every=10)
    train_supervised(config, root / "model", encoder=load_encoder("builtin"), device="cpu", progress=False)
    save_encoder(load_encoder("builtin"), root / "same-as-builtin")
    save_encoder(BuiltinEncoder(BuiltinEncoderConfig(init_seed=7)), root / "other-judge")
    return root


def test_fingerprint_is_the_weights_not_the_spec(trained):
    builtin = load_encoder("builtin")
    assert encoder_fingerprint(load_encoder(trained / "same-as-builtin")) == encoder_fingerprint(builtin)
    assert encoder_fingerprint(load_encoder(trained / "other-judge")) != encoder_fingerprint(builtin)
    changed = load_encoder("builtin")
    with torch.no_grad():
        changed.audio_head.bias[0] += 1e-3  # same type and config, one weight differs
    assert encoder_fingerprint(changed) != encoder_fingerprint(builtin)


def test_eval_with_a_judge_scores_with_that_encoder(trained, tmp_path):
    judge_dir = trained / "other-judge"
    rows, paths = evaluate_model_on_dataset(trained / "model", trained / "data", tmp_path / "r", ("text",), limit=2,
                                            judge=str(judge_dir), device="cpu")
    assert len(rows) == 3 * 2 * 2 and all(math.isfinite(r["judge_score"]) and math.isfinite(r["reward_encoder_score"]) for r in rows)
    # the two encoders disagree: different audio towers
    assert max(abs(r["judge_score"] - r["reward_encoder_score"]) for r in rows) > 1.0
    # the judge column is the judge encoder's score: recompute it for the mixture system (estimate = the mixture)
    mix = load_test_mixtures(trained / "data", limit=1)[0]
    expected = TextAudioScorer(load_encoder(judge_dir), 16_000)(mix.labels, torch.from_numpy(mix.mixture).expand(len(mix.labels), -1))
    own = TextAudioScorer(load_encoder("builtin"), 16_000)(mix.labels, torch.from_numpy(mix.mixture).expand(len(mix.labels), -1))
    got = [r for r in rows if r["system"] == "mixture" and r["mixture_id"] == mix.mixture_id]
    assert [r["judge_score"] for r in got] == pytest.approx(expected.tolist(), abs=1e-3)
    assert [r["reward_encoder_score"] for r in got] == pytest.approx(own.tolist(), abs=1e-3)
    meta = json.loads(paths["model_summary_json"].read_text())["meta"]
    assert meta["judge"] == str(judge_dir) and meta["judge_fingerprint"] != meta["reward_encoder_fingerprint"]
    assert "judge_note" not in meta
    header = paths["scores_csv"].read_text().splitlines()[0].split(",")
    assert "judge_score" in header and "reward_encoder_score" in header and "clap_score" not in header
    overall = json.loads(paths["model_summary_json"].read_text())["overall"]
    assert all("judge_score_mean" in e and "reward_encoder_score_mean" in e for e in overall)
    text = paths["model_summary_md"].read_text()
    assert "| Judge | Reward enc. |" in text and f"independent judge encoder `{judge_dir}`" in text and "not an independent measure" in text
    assert "Reward-encoder score (not independent)" in paths["markdown"].read_text()


def test_a_judge_with_the_models_encoder_weights_is_refused(trained, tmp_path):
    for spec in ("builtin", str(trained / "same-as-builtin")):  # the same spec, or the same weights elsewhere
        with pytest.raises(MarsctlError, match="same weights as the model's query/reward encoder"):
            evaluate_model_on_dataset(trained / "model", trained / "data", tmp_path / "r", ("text",), limit=1, judge=spec, device="cpu")
    assert not (tmp_path / "r" / "report.json").exists()  # refused before anything was written
    # the reward encoder an RL run recorded counts too (compared by weights when it is a local folder)
    model, encoder = load_model_and_encoder(trained / "model")
    judge_dir = trained / "other-judge"
    rl_like = dataclasses.replace(model, config={**model.config, "training": {"stage": "rl", "reward_encoder": str(judge_dir)}})
    with pytest.raises(MarsctlError, match="same weights"):
        check_judge(str(judge_dir), load_encoder(judge_dir), rl_like, encoder)
    assert check_judge(str(judge_dir), load_encoder(judge_dir), model, encoder)["judge_compared_with"] == ["query encoder builtin"]
    # a run that recorded the spec 'default' (the shipped encoder): a judge with its weights under a path is refused
    from marsctl.pretrained import DEFAULT_SEPARATOR_DIR

    shipped = DEFAULT_SEPARATOR_DIR / "encoder"
    rl_default = dataclasses.replace(model, config={**model.config, "training": {"stage": "rl", "reward_encoder": "default"}})
    with pytest.raises(MarsctlError, match="same weights"):
        check_judge(str(shipped), load_encoder(shipped), rl_default, encoder)


def test_eval_cli_judge_flag(trained, tmp_path):
    import typer
    from typer.testing import CliRunner

    from marsctl.cli import eval as eval_cli

    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """test app"""

    eval_cli.register(app)
    runner = CliRunner()
    base = ["eval", "--model", str(trained / "model"), "--data", str(trained / "data"), "--limit", "1"]
    same = runner.invoke(app, [*base, "--judge", "builtin", "--out", str(tmp_path / "a")])
    assert same.exit_code == 2 and "not an independent judge" in same.output
    old_name = runner.invoke(app, [*base, "--clap-encoder", "builtin", "--out", str(tmp_path / "b")])
    assert old_name.exit_code == 2 and "now --judge" in old_name.output and "not an independent judge" in old_name.output
    folders = runner.invoke(app, ["eval", "-e", str(tmp_path), "-r", str(tmp_path), "--judge", "builtin"])
    assert folders.exit_code != 0 and "--judge applies to --model/--data" in folders.output
    ok = runner.invoke(app, [*base, "--judge", str(trained / "other-judge"), "--out", str(tmp_path / "c")])
    assert ok.exit_code == 0, ok.output
    shown = " ".join(ok.stdout.split())  # lines are wrapped at the terminal width
    assert "Judge" in shown and "Reward enc." in shown and "independent of the model" in shown and "not independent" in shown
    no_judge = runner.invoke(app, [*base, "--out", str(tmp_path / "d")])
    assert no_judge.exit_code == 0 and "no independent judge given" in no_judge.stderr and "Judge" not in no_judge.stdout


def _history(pairs):
    return [{"step": 10 * i, "val_reward": r, "val_judge_score": j} for i, (r, j) in enumerate(pairs)]


def test_reward_hacking_warning_fires_only_on_rising_reward_and_falling_judge():
    up, down = 10 * REWARD_TOLERANCE, 10 * JUDGE_TOLERANCE
    warning = reward_hacking_warning(_history([(0.5, 20.0), (0.5 + up, 20.0 - down)]))
    assert warning is not None and "\n" not in warning and "step 10" in warning and "previous validation" in warning
    assert reward_hacking_warning(_history([(0.5, 20.0), (0.5 + up, 20.0 + down)])) is None  # both rose
    assert reward_hacking_warning(_history([(0.5, 20.0), (0.5 - up, 20.0 - down)])) is None  # both fell
    assert reward_hacking_warning(_history([(0.5, 20.0), (0.5, 20.0 - down)])) is None  # reward flat
    assert reward_hacking_warning(_history([(0.5, 20.0), (0.5 + up, 20.0 - JUDGE_TOLERANCE / 2)])) is None  # within tolerance
    assert reward_hacking_warning(_history([(0.5, 20.0)])) is None and reward_hacking_warning([]) is None
    # a slow drift: each step within the tolerances, but since the start beyond them
    drift = [(0.5 + k * 0.6 * REWARD_TOLERANCE, 20.0 - k * 0.6 * JUDGE_TOLERANCE) for k in range(4)]
    assert reward_hacking_warning(_history(drift[:2])) is None
    assert "since step 0, the start" in reward_hacking_warning(_history(drift))
    # training records without the validation keys are skipped
    mixed = [{"step": 1, "reward_mean": 0.1}, *_history([(0.5, 20.0), (0.5 + up, 20.0 - down)]), {"step": 99, "lr": 1e-4}]
    assert reward_hacking_warning(mixed) is not None


def test_si_sdri_witness_warns_without_a_judge_and_keeps_its_history_over_a_resume():
    """What the union experiments showed (BENCHMARKS 7.4): the reward rose, the judge rose too, and only
    validation SI-SDRi saw the damage (anchor reward, 500 steps: 0.637 -> 0.656 while 5.07 -> 4.55 dB)."""
    said = []
    witness = SiSdriWitness(said.append)
    assert witness.validate(0, {"val_reward": 0.637, "val_si_sdri": 5.07}) is False
    assert witness.validate(100, {"val_reward": 0.656, "val_si_sdri": 4.55}) is True
    assert len(said) == 1 and "validation SI-SDRi" in said[0] and "5.07 -> 4.55" in said[0] and "step 100" in said[0]
    assert witness.validate(200, {"val_reward": 0.650, "val_si_sdri": 4.60}) is True  # still below the start
    assert SiSdriWitness().validate(0, {"val_reward": 0.5}) is False  # no references (a folder): nothing to compare
    calm = SiSdriWitness()
    assert calm.validate(0, {"val_reward": 0.5, "val_si_sdri": 5.0}) is False
    assert calm.validate(1, {"val_reward": 0.6, "val_si_sdri": 5.0 - SI_SDRI_TOLERANCE / 2}) is False  # within tolerance
    resumed = SiSdriWitness()
    resumed.load_history([{"step": 0, "val_reward": 0.637, "val_si_sdri": 5.07}, {"step": 50, "loss": 1.0}])
    assert resumed.validate(100, {"val_reward": 0.656, "val_si_sdri": 4.55}) is True


def test_rl_judge_with_the_reward_encoders_weights_is_refused():
    with pytest.raises(ConfigError, match="same weights as the reward encoder"):
        RLJudge.load("builtin", load_encoder("builtin"), 16_000, "cpu")


def test_tiny_rl_run_logs_the_judge_score(trained, tmp_path):
    from marsctl.rl.rewards import RewardConfig
    from marsctl.rl.trainer import train_rl
    from test_rl_worker import rl_config

    rewards = RewardConfig(weights={"semantic_anchor": 1.0, "si_sdr": 0.0, "energy_guard": 0.0})
    config = rl_config(trained / "data", trained / "model", max_steps=2, encoder="", reward_encoder="", val_every=1,
                       checkpoint_every=2, val_mixtures=2, batch_size=2, group_size=2, rewards=rewards,
                       judge=str(trained / "other-judge"))
    messages = []
    result = train_rl(config, tmp_path / "rl", device="cpu", progress=False, log=messages.append)
    lines = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    val = [h for h in lines if "val_reward" in h]
    assert [h["step"] for h in val] == [0, 1, 2]
    assert all(math.isfinite(h["val_judge_score"]) and -100 <= h["val_judge_score"] <= 100 for h in val)
    # the flag follows the warning function over the validations so far, and each warning was logged
    flags = [bool(reward_hacking_warning(val[: i + 1]))
             or bool(reward_hacking_warning(val[: i + 1], judge_tolerance=SI_SDRI_TOLERANCE, witness_key="val_si_sdri"))
             for i in range(len(val))]
    assert [h["val_reward_hacking"] == 1.0 for h in val] == flags
    assert sum("possible reward hacking" in m for m in messages) == sum(flags)
    assert result.history[-1]["val_judge_score"] == val[-1]["val_judge_score"]
    # the judge is not the reward encoder (here the model's query encoder, builtin): one with its weights is refused
    same = dataclasses.replace(config, judge="builtin")
    with pytest.raises(ConfigError, match="same weights as the reward encoder"):
        train_rl(same, tmp_path / "rl-same", device="cpu", progress=False)


def test_rl_judge_flags_and_logs_a_fall_and_keeps_its_history_on_resume(trained):
    """The validation plumbing: a history whose reward was far lower and judge score far higher
    (100, the maximum) than now makes this validation's flag 1 and logs the warning."""
    from marsctl.queries import QueryBuilder
    from marsctl.train.data import fixed_mixtures

    model, encoder = load_model_and_encoder(trained / "model")
    signal = model.model.config.signal
    val_set = fixed_mixtures(trained / "data", "val", signal, 2)
    queries = QueryBuilder(encoder, trained / "data", signal.sample_rate)
    messages = []
    judge = RLJudge(str(trained / "other-judge"), load_encoder(trained / "other-judge"), signal.sample_rate, messages.append)
    calm = judge.validate(model.model, val_set, queries, torch.device("cpu"), 0, {"val_reward": 0.2})
    assert calm["val_reward_hacking"] == 0.0 and messages == [] and -100 <= calm["val_judge_score"] <= 100
    judge.history = [{"step": 0, "val_reward": -1.0, "val_judge_score": 100.0}]
    flagged = judge.validate(model.model, val_set, queries, torch.device("cpu"), 5, {"val_reward": 0.2})
    assert flagged["val_reward_hacking"] == 1.0 and flagged["val_judge_score"] == pytest.approx(calm["val_judge_score"], abs=1e-4)
    assert len(messages) == 1 and "possible reward hacking at step 5" in messages[0]
    # resume: the checkpoint's validations count only when the same judge scored them
    history = [{"step": 0, "val_reward": 0.1, "val_judge_score": 3.0}, {"step": 1, "reward_mean": 0.0}]
    judge.load_state_dict(judge.state_dict(), history)
    assert judge.history == [{"step": 0, "val_reward": 0.1, "val_judge_score": 3.0}]
    judge.load_state_dict({"fingerprint": "another judge"}, history)
    assert judge.history == [] and "starts over" in messages[-1]


def test_eval_scores_the_reward_encoder_an_rl_run_recorded(trained, tmp_path):
    """'Reward enc.' is the score of the encoder RL optimised: a real tiny RL run against another encoder
    than its query encoder is scored with that encoder (named in the report); a recorded reward encoder
    that does not load here (not a local folder) falls back to the query encoder and says so."""
    from marsctl.rl.rewards import RewardConfig
    from marsctl.rl.trainer import train_rl
    from test_rl_worker import rl_config

    reward_dir = tmp_path / "reward-encoder"
    save_encoder(BuiltinEncoder(BuiltinEncoderConfig(init_seed=5)), reward_dir)
    rewards = RewardConfig(weights={"query_similarity": 1.0, "semantic_anchor": 0.0, "si_sdr": 0.0, "energy_guard": 0.0})
    config = rl_config(trained / "data", trained / "model", max_steps=1, encoder="", reward_encoder=str(reward_dir), val_every=1,
                       checkpoint_every=1, val_mixtures=1, batch_size=2, group_size=2, rewards=rewards, estimator="pathwise")
    train_rl(config, tmp_path / "rl", device="cpu", progress=False)
    # the RL model records the classes its start was trained on (and those of its RL data: the same here)
    assert json.loads((tmp_path / "rl" / "config.json").read_text())["labels"] == json.loads((trained / "model" / "config.json").read_text())["labels"] != []
    rows, paths = evaluate_model_on_dataset(tmp_path / "rl", trained / "data", tmp_path / "r", ("text",), limit=1,
                                            judge=str(trained / "other-judge"), device="cpu")
    mix = load_test_mixtures(trained / "data", limit=1)[0]
    mixture = torch.from_numpy(mix.mixture).expand(len(mix.labels), -1)
    by_reward = TextAudioScorer(load_encoder(reward_dir), 16_000)(mix.labels, mixture)
    by_query = TextAudioScorer(load_encoder("builtin"), 16_000)(mix.labels, mixture)
    assert float((by_reward - by_query).abs().max()) > 1.0  # the two encoders differ, so the test can tell them apart
    got = [r["reward_encoder_score"] for r in rows if r["system"] == "mixture"]
    assert got == pytest.approx(by_reward.tolist(), abs=1e-3)
    meta = json.loads(paths["model_summary_json"].read_text())["meta"]
    assert meta["reward_encoder"] == str(reward_dir) and meta["reward_encoder_role"] == "the reward encoder its RL run optimised"
    # the recorded fingerprints are each encoder's own (the reward encoder's was the query encoder's before)
    assert meta["reward_encoder_fingerprint"] == encoder_fingerprint(load_encoder(reward_dir))
    assert meta["query_encoder_fingerprint"] == encoder_fingerprint(load_encoder("builtin")) != meta["reward_encoder_fingerprint"]
    assert f"reward encoder `{reward_dir}`" in paths["model_summary_md"].read_text()
    # the same run recording a reward encoder that is not a folder here (a Hub id): the query encoder, said so
    config_path = tmp_path / "rl" / "config.json"
    recorded = json.loads(config_path.read_text())
    recorded["training"]["reward_encoder"] = "someone/some-encoder"
    config_path.write_text(json.dumps(recorded))
    rows, paths = evaluate_model_on_dataset(tmp_path / "rl", trained / "data", tmp_path / "r2", ("text",), limit=1, device="cpu")
    assert [r["reward_encoder_score"] for r in rows if r["system"] == "mixture"] == pytest.approx(by_query.tolist(), abs=1e-3)
    meta = json.loads(paths["model_summary_json"].read_text())["meta"]
    assert meta["reward_encoder"] == "builtin" and "someone/some-encoder is not a local folder here" in meta["reward_encoder_role"]
