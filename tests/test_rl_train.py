"""`marsctl train rl`: a short real RL run, exact resume after SIGKILL, the gloo 2-process run, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from marsctl.errors import ConfigError, MarsctlError
from marsctl.models.separator import load_separator
from marsctl.rl.trainer import load_rl_config, train_rl
from marsctl.train.checkpoint import list_checkpoints
from test_rl_worker import pretrain, rl_config, make_test_encoders
from test_separator_fixtures import make_tone_dataset

WORKER = Path(__file__).with_name("test_rl_worker.py")


@pytest.fixture(scope="module")
def tone_data(tmp_path_factory):
    return make_tone_dataset(tmp_path_factory.mktemp("rl-tones") / "data")


@pytest.fixture(scope="module")
def supervised(tone_data, tmp_path_factory):
    """A briefly supervised-trained small separator: the RL starting point and reference policy."""
    return pretrain(tone_data, tmp_path_factory.mktemp("rl-sup") / "sup")


def _env(**extra):
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]), **extra)


def test_recipe_loading(tmp_path):
    recipe = tmp_path / "rl.yaml"
    recipe.write_text("estimator: score_function\ngroup_size: 6\nppo_epochs: 2\nbaseline: moving_average\nrewards: {weights: {si_sdr: 0.5}, si_sdr_cap_db: 20}\n")
    config = load_rl_config(recipe, {"max_steps": 9, "data": None})
    assert (config.group_size, config.ppo_epochs, config.max_steps, config.baseline) == (6, 2, 9, "moving_average")
    assert config.rewards.weights["si_sdr"] == 0.5 and config.rewards.weights["semantic_anchor"] == 1.0
    assert config.rewards.si_sdr_cap_db == 20
    recipe.write_text("rewards: {weights: {clap: 1.0}}\n")
    with pytest.raises(ConfigError, match="clap"):
        load_rl_config(recipe)
    with pytest.raises(ConfigError, match="group_size"):
        load_rl_config(None, {"group_size": 1})
    for shipped in sorted((Path(__file__).parents[1] / "recipes" / "train").glob("rl*.yaml")):
        load_rl_config(shipped)


def test_short_rl_run_raises_reward_without_collapsing_entropy(tone_data, supervised, tmp_path):
    """25 real RL steps (8 mixtures x 16 samples each) from the supervised start raise the reward
    on held-out fixed mixtures. SI-SDR weighs 1 here because the test encoder's 16-band
    audio embedding is a coarse semantic reward; lambda_H = 0 because on this toy even 0.01
    visibly slowed the rise (the entropy term's direction is checked in test_rl_math.py)."""
    from marsctl.rl.rewards import RewardConfig

    query_encoder, reward_encoder = make_test_encoders()
    config = rl_config(
        tone_data, supervised, max_steps=25, batch_size=8, group_size=16, learning_rate=3e-4, entropy_coef=0.0,
        rewards=RewardConfig(weights={"si_sdr": 1.0}), val_every=25, checkpoint_every=25,
    )
    messages = []
    result = train_rl(config, tmp_path / "rl", encoder=query_encoder, reward_encoder=reward_encoder, device="cpu", progress=False, log=messages.append)
    history = result.history
    val = [h for h in history if "val_reward" in h]
    assert [h["step"] for h in val] == [0, 25]
    # the RL objective on held-out fixed mixtures (seeded samples) rises from the supervised start
    assert val[-1]["val_reward"] > val[0]["val_reward"] + 0.01, [h["val_reward"] for h in val]
    assert val[-1]["val_si_sdri"] > val[0]["val_si_sdri"], [h["val_si_sdri"] for h in val]
    train = [h for h in history if "reward_mean" in h]
    assert len(train) == 25
    # the Beta entropy per bin did not collapse
    assert train[-1]["entropy"] > train[0]["entropy"] - 0.1
    # weight-0 terms (query_similarity) are computed for validation only
    assert "val_reward/query_similarity" in val[-1] and not any("reward/query_similarity" in h for h in train)
    for key in ("reward_std", "reward/semantic_anchor", "reward/si_sdr", "reward/energy_guard",
                "advantage_mean", "advantage_std", "clip_fraction", "kl_old_new_k3", "kl_old_new", "kl_ref", "ratio_min", "ratio_max",
                "step_time_s", "reward_time_share", "grad_norm", "lr"):
        assert all(key in h for h in train), key
    assert train[0]["kl_ref"] == pytest.approx(0.0, abs=1e-6)  # pi_theta = pi_ref at step 1
    assert 0 < train[-1]["kl_ref"] < 1.0  # it moved, and stayed near the reference
    assert abs(train[0]["advantage_mean"]) < 1e-5 and 0 < train[0]["reward_time_share"] < 1
    assert not any("no anchor module" in m for m in messages)  # the reward encoder has an anchor module
    # the run directory is a loadable separator (latest policy) with a card and TensorBoard scalars
    loaded = load_separator(tmp_path / "rl")
    assert loaded.config["training"]["stage"] == "rl" and loaded.config["training"]["step"] == 25
    assert "RL fine-tuned" in (tmp_path / "rl" / "README.md").read_text()
    assert list((tmp_path / "rl" / "tensorboard").glob("events.out.tfevents.*"))
    assert list_checkpoints(tmp_path / "rl") == [25]
    assert len((tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()) == 26  # step 0 (validation) + 25 steps



def test_pathwise_rl_run_raises_reward_and_si_sdri(tone_data, supervised, tmp_path):
    """estimator 'pathwise' (masks drawn reparameterized, gradient through the reward): 15 real
    steps raise the validation reward and SI-SDRi (a term without a gradient is refused: test_rl_rewards.py)."""
    from marsctl.rl.rewards import RewardConfig

    query_encoder, reward_encoder = make_test_encoders()
    signal_only = RewardConfig(weights={"semantic_anchor": 0.0, "si_sdr": 1.0, "energy_guard": 1.0})
    config = rl_config(tone_data, supervised, max_steps=15, batch_size=8, group_size=4, learning_rate=3e-4, entropy_coef=0.0,
                       estimator="pathwise", rewards=signal_only, val_every=15, checkpoint_every=15)
    result = train_rl(config, tmp_path / "rl", encoder=query_encoder, reward_encoder=reward_encoder, device="cpu", progress=False)
    val = [h for h in result.history if "val_reward" in h]
    assert [h["step"] for h in val] == [0, 15]
    assert val[-1]["val_reward"] > val[0]["val_reward"] + 0.01, [h["val_reward"] for h in val]
    assert val[-1]["val_si_sdri"] > val[0]["val_si_sdri"], [h["val_si_sdri"] for h in val]
    train = [h for h in result.history if "reward_mean" in h]
    assert len(train) == 15 and not any("clip_fraction" in h for h in train) and train[-1]["kl_ref"] > 0  # no ratio, nothing clipped
    with pytest.raises(ConfigError, match="estimator"):
        load_rl_config(None, {"estimator": "reinforce"})
    with pytest.raises(ConfigError, match="moving_average"):
        load_rl_config(None, {"estimator": "pathwise", "baseline": "moving_average"})

def test_fallback_to_query_anchor_is_logged(tone_data, supervised, tmp_path):
    query_encoder, _ = make_test_encoders()
    messages = []
    config = rl_config(tone_data, supervised, max_steps=2, checkpoint_every=2, val_every=2, reward_encoder="")
    result = train_rl(config, tmp_path / "rl", encoder=query_encoder, device="cpu", progress=False, log=messages.append)
    assert any("no anchor module" in m for m in messages)
    assert "query (no anchor module)" in (tmp_path / "rl" / "README.md").read_text()
    # reward encoder = query encoder: the anchor is the query, so both cosines agree (validation
    # computes every term; training steps only the weighted ones)
    record = [h for h in result.history if "val_reward/query_similarity" in h][-1]
    assert record["val_reward/semantic_anchor"] == pytest.approx(record["val_reward/query_similarity"], abs=1e-6)


def _run_worker(*args, env, check=True):
    proc = subprocess.run([sys.executable, str(WORKER), *map(str, args)], env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr[-3000:])
    return proc


def test_exact_resume_after_kill(tone_data, supervised, tmp_path):
    """K = 2 PPO epochs and the moving-average baseline, so their state is covered by the resume."""
    env = _env(TEST_CHECKPOINT_EVERY="4", TEST_PPO_EPOCHS="2", TEST_BASELINE="moving_average")
    _run_worker(tone_data, supervised, tmp_path / "straight", 8, env=env)
    killed = _run_worker(tone_data, supervised, tmp_path / "killed", 8, 6, env=env, check=False)
    assert killed.returncode == -9  # SIGKILL after step 6; the last checkpoint is step 4
    assert list_checkpoints(tmp_path / "killed") == [4]
    _run_worker(tone_data, supervised, tmp_path / "killed", 8, env=env)
    a = load_file(str(tmp_path / "straight" / "checkpoints" / "step-00000008" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "checkpoints" / "step-00000008" / "model.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    start = load_file(str(tmp_path / "killed" / "checkpoints" / "step-00000004" / "model.safetensors"))
    assert any(not torch.equal(a[k], start[k]) for k in a)
    sa = torch.load(tmp_path / "straight" / "checkpoints" / "step-00000008" / "training_state.pt", weights_only=True)
    sb = torch.load(tmp_path / "killed" / "checkpoints" / "step-00000008" / "training_state.pt", weights_only=True)
    assert sa["baseline"] == sb["baseline"] and sa["baseline"]["value"] is not None
    ha = [h["reward_mean"] for h in sa["history"] if "reward_mean" in h]
    hb = [h["reward_mean"] for h in sb["history"] if "reward_mean" in h]
    assert ha == hb and len(ha) == 8


@pytest.mark.parametrize("estimator", ["score_function", "pathwise"])
def test_gloo_two_processes_end_identical(tone_data, supervised, tmp_path, estimator):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER),
           str(tone_data), str(supervised), str(tmp_path / "ddp"), "4"]
    proc = subprocess.run(cmd, env=_env(TEST_CHECKPOINT_EVERY="4", TEST_ESTIMATOR=estimator), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = load_file(str(tmp_path / "ddp" / "rank0.safetensors"))
    r1 = load_file(str(tmp_path / "ddp" / "rank1.safetensors"))
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key
    initial = load_separator(supervised).model.state_dict()
    assert not torch.equal(initial["query_projection.weight"], r0["query_projection.weight"])  # it trained
    saved = load_file(str(tmp_path / "ddp" / "checkpoints" / "step-00000004" / "model.safetensors"))
    assert torch.equal(saved["query_projection.weight"], r0["query_projection.weight"])


def test_cli_help_and_bad_input(tmp_path):
    from typer.testing import CliRunner

    from marsctl.cli.main import app

    runner = CliRunner()
    result = runner.invoke(app, ["train", "rl", "--help"])
    assert result.exit_code == 0 and "--group-size" in result.output and "--ppo-epochs" in result.output and "--estimator" in result.output
    result = runner.invoke(app, ["train", "rl", "--init-model", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                                 "--estimator", "reinforce"])
    assert result.exit_code != 0 and "estimator must be one of" in result.output
    result = runner.invoke(app, ["train", "rl", "--init-model", str(tmp_path / "nope"), "--data", str(tmp_path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "nope" in result.output
    result = runner.invoke(app, ["train", "rl", "--data", str(tmp_path), "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "--init-model" in result.output


def test_cli_procs_two_relaunches_under_torchrun(tone_data, tmp_path):
    """`marsctl train rl --procs 2 --estimator pathwise` re-launches itself under torch.distributed.run
    (gloo), passing its options on, loading the starting model's own encoder (the offline built-in one,
    differentiable, so the semantic reward works with the pathwise gradient) by its spec, and trains."""
    from marsctl.train.supervised import ArchitectureConfig, SupervisedConfig, train_supervised
    from marsctl.config import SignalConfig

    sup_config = SupervisedConfig(
        data=str(tone_data), encoder="builtin", signal=SignalConfig(segment_samples=8191),
        architecture=ArchitectureConfig(num_levels=5, base_channels=8, max_channel_multiplier=4),
        batch_size=2, max_steps=2, warmup_steps=1, val_every=2, checkpoint_every=2, log_every=1, num_workers=0,
    )
    train_supervised(sup_config, tmp_path / "sup", device="cpu", progress=False)
    recipe = tmp_path / "rl.yaml"
    recipe.write_text("batch_size: 2\ngroup_size: 2\nmax_steps: 2\nwarmup_steps: 1\nval_every: 2\nval_mixtures: 1\ncheckpoint_every: 2\nnum_workers: 0\n")
    cmd = [sys.executable, "-m", "marsctl", "train", "rl", "--recipe", str(recipe), "--init-model", str(tmp_path / "sup"),
           "--data", str(tone_data), "--out", str(tmp_path / "rl"), "--procs", "2", "--estimator", "pathwise"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "launching 2 process(es)" in proc.stdout
    assert "no anchor module" in proc.stdout  # the untrained built-in encoder: z* falls back to the query
    assert list_checkpoints(tmp_path / "rl") == [2]
    loaded = load_separator(tmp_path / "rl")
    assert loaded.config["training"]["stage"] == "rl" and loaded.config["training"]["step"] == 2
    assert loaded.config["training"]["estimator"] == "pathwise"
    assert loaded.encoder == "builtin"


def test_resume_refuses_a_changed_estimator_or_coefficient(tone_data, supervised, tmp_path):
    query_encoder, reward_encoder = make_test_encoders()
    config = rl_config(tone_data, supervised, max_steps=1, checkpoint_every=1, val_every=1, val_mixtures=1)
    train_rl(config, tmp_path / "rl", encoder=query_encoder, reward_encoder=reward_encoder, device="cpu", progress=False)
    for change in ({"estimator": "pathwise"}, {"kl_coef": 0.5}, {"entropy_coef": 0.0}, {"clip_eps": 0.1}):
        changed = rl_config(tone_data, supervised, max_steps=2, checkpoint_every=1, val_every=1, val_mixtures=1, **change)
        with pytest.raises(MarsctlError, match=f"cannot resume, '{next(iter(change))}' differs"):
            train_rl(changed, tmp_path / "rl", encoder=query_encoder, reward_encoder=reward_encoder, device="cpu", progress=False)


def test_kappa_is_a_policy_setting_saved_with_the_model(tone_data, supervised, tmp_path):
    """kappa: 30 shapes the RL policy and is saved with the fine-tuned model; the loaded starting
    separator's architecture config is not edited."""
    query_encoder, reward_encoder = make_test_encoders()
    start_kappa = load_separator(supervised).model.config.kappa
    config = rl_config(tone_data, supervised, max_steps=1, checkpoint_every=1, val_every=1, val_mixtures=1, kappa=30.0)
    result = train_rl(config, tmp_path / "rl", encoder=query_encoder, reward_encoder=reward_encoder, device="cpu", progress=False)
    assert result.model.config.kappa == start_kappa != 30.0
    assert load_separator(tmp_path / "rl").model.config.kappa == 30.0
    train = [h for h in result.history if "reward_mean" in h]
    assert train[0]["kl_ref"] == pytest.approx(0.0, abs=1e-6)  # pi_ref has the same kappa


def test_a_reward_term_registered_here_is_used_by_a_short_run(tone_data, supervised, tmp_path):
    """One function and one registration line: the term is weighted into R and logged (mean and
    std), beside the fraction of groups with no reward spread."""
    from marsctl.rl.rewards import REWARD_TERMS, RewardConfig, reward

    @reward("test_quietness", needs=("estimates", "mixtures"))
    def quietness(batch):
        return -batch.estimates.square().mean(-1) / batch.mixtures.square().mean(-1).clamp_min(1e-8)

    try:
        query_encoder, reward_encoder = make_test_encoders()
        rewards = RewardConfig.from_recipe({"test_quietness": 0.5, "si_sdr": 1.0, "semantic_anchor": 0.0})
        config = rl_config(tone_data, supervised, max_steps=2, checkpoint_every=2, val_every=2, val_mixtures=1, estimator="pathwise",
                           rewards=rewards)
        result = train_rl(config, tmp_path / "rl", encoder=query_encoder, reward_encoder=reward_encoder, device="cpu", progress=False)
    finally:
        del REWARD_TERMS["test_quietness"]
    train = [h for h in result.history if "reward_mean" in h]
    assert len(train) == 2
    for record in train:
        assert record["reward_std/test_quietness"] > 0 and 0.0 <= record["zero_spread_groups"] <= 1.0
        weighted = 0.5 * record["reward/test_quietness"] + record["reward/si_sdr"] + record["reward/energy_guard"]
        assert record["reward_mean"] == pytest.approx(weighted, rel=1e-4, abs=1e-6)
    assert "val_reward/test_quietness" in result.history[-1]


def test_clip_fraction_is_measured_after_the_update(tone_data, supervised, tmp_path):
    """With --ppo-epochs 1 the loss sees the policy at sampling time (every ratio 1): the logged
    clip fraction is that of the updated policy on the step's samples."""
    query_encoder, reward_encoder = make_test_encoders()
    config = rl_config(tone_data, supervised, max_steps=3, checkpoint_every=3, val_every=3, val_mixtures=1, surrogate="per_bin",
                       learning_rate=5e-3, warmup_steps=0)
    result = train_rl(config, tmp_path / "rl", encoder=query_encoder, reward_encoder=reward_encoder, device="cpu", progress=False)
    train = [h for h in result.history if "reward_mean" in h]
    assert max(h["clip_fraction"] for h in train) > 0 and max(h["kl_old_new"] for h in train) > 0


def test_a_second_run_into_the_same_out_is_refused(tone_data, supervised, tmp_path):
    """While another process trains into --out (it holds the run's lock), a second run stops with one line."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from marsctl.train.lock import RunLock; "
                               "lock = RunLock(sys.argv[1]); lock.acquire(); print('locked', flush=True); time.sleep(60)", str(tmp_path / "rl")],
                              env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        query_encoder, reward_encoder = make_test_encoders()
        config = rl_config(tone_data, supervised, max_steps=1, checkpoint_every=1, val_every=1, val_mixtures=1)
        with pytest.raises(MarsctlError) as refused:
            train_rl(config, tmp_path / "rl", encoder=query_encoder, reward_encoder=reward_encoder, device="cpu", progress=False)
        message = str(refused.value)
        assert "another training run" in message and str(tmp_path / "rl") in message and "\n" not in message
        assert not (tmp_path / "rl" / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    # the lock dies with its process: the same run now goes ahead
    train_rl(config, tmp_path / "rl", encoder=query_encoder, reward_encoder=reward_encoder, device="cpu", progress=False)
    assert list_checkpoints(tmp_path / "rl") == [1]


def test_recipe_paths_are_relative_to_the_recipe_and_default_is_the_shipped_model(supervised, tmp_path, monkeypatch):
    from marsctl.pretrained import DEFAULT_SEPARATOR_DIR

    recipe = Path(supervised).parent / "rl-here.yaml"
    recipe.write_text(f"init_model: {Path(supervised).name}\n")
    monkeypatch.chdir(tmp_path)  # anywhere else
    assert Path(load_rl_config(recipe).init_model) == Path(supervised).resolve()
    assert Path(load_rl_config(recipe, {"init_model": "elsewhere"}).init_model) == Path("elsewhere")  # the command line wins
    assert Path(load_rl_config(None, {"init_model": "default"}).init_model) == DEFAULT_SEPARATOR_DIR
    shipped = load_rl_config(Path(__file__).parents[1] / "recipes" / "train" / "rl-soundfont-small.yaml")
    assert (Path(shipped.init_model) / "config.json").is_file()


def test_cli_init_model_default_and_help_at_80_columns(tmp_path):
    from typer.testing import CliRunner

    from marsctl.cli.main import app

    result = CliRunner().invoke(app, ["train", "rl", "--init-model", "default", "--data", str(tmp_path / "no-data"), "--out", str(tmp_path / "o")])
    # the starting model is accepted; what is missing is the data
    assert result.exit_code == 2 and result.output.startswith(f"error: {tmp_path / 'no-data'}: no such"), result.output
    for command in ("rl", "sup"):
        proc = subprocess.run([sys.executable, "-m", "marsctl", "train", command, "--help"], env=_env(COLUMNS="80"), capture_output=True, text=True)
        assert proc.returncode == 0 and "--out" in proc.stdout
        lines = proc.stdout.splitlines()
        assert max(len(line) for line in lines) <= 80 and "…" not in proc.stdout
        assert not any(kind in proc.stdout for kind in ("<str>", "<int>", "<path>", "<float>", "range>"))
