"""Resume is bit-exact: a run killed after a checkpoint and resumed ends with the weights, the RNG
state and the logged metrics of an uninterrupted run (supervised and RL, with DataLoader workers)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from marsctl.train.checkpoint import list_checkpoints
from test_separator_fixtures import make_tone_dataset

HERE = Path(__file__).parent
TIMING = ("step_time_s", "reward_time_share")


@pytest.fixture(scope="module")
def tone_data(tmp_path_factory):
    return make_tone_dataset(tmp_path_factory.mktemp("resume-tones") / "data")


def _run(worker: str, *args, check: bool = True, **env) -> subprocess.CompletedProcess:
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent), **env)
    proc = subprocess.run([sys.executable, str(HERE / worker), *map(str, args)], env=environment, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr[-3000:])
    return proc


def _assert_same_end(straight: Path, resumed: Path, step: int) -> None:
    name = f"step-{step:08d}"
    a = load_file(str(straight / "checkpoints" / name / "model.safetensors"))
    b = load_file(str(resumed / "checkpoints" / name / "model.safetensors"))
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    sa = torch.load(straight / "checkpoints" / name / "training_state.pt", weights_only=True)
    sb = torch.load(resumed / "checkpoints" / name / "training_state.pt", weights_only=True)
    assert torch.equal(sa["rng"]["torch"], sb["rng"]["torch"])  # the global RNG went through the same draws
    strip = [[{k: v for k, v in h.items() if k not in TIMING} for h in s["history"]] for s in (sa, sb)]
    assert strip[0] == strip[1]


def test_supervised_resume_after_kill_is_bit_exact(tone_data, tmp_path):
    """30 steps, a checkpoint every 10, one DataLoader worker; killed after step 14, resumed from step 10."""
    env = {"TEST_CHECKPOINT_EVERY": "10", "TEST_NUM_WORKERS": "1"}
    _run("test_train_sup_worker.py", tone_data, tmp_path / "straight", 30, **env)
    killed = _run("test_train_sup_worker.py", tone_data, tmp_path / "killed", 30, 14, check=False, **env)
    assert killed.returncode == -9 and list_checkpoints(tmp_path / "killed") == [10]
    _run("test_train_sup_worker.py", tone_data, tmp_path / "killed", 30, **env)
    _assert_same_end(tmp_path / "straight", tmp_path / "killed", 30)


def test_rl_resume_after_kill_is_bit_exact(tone_data, tmp_path):
    """The same for ``train rl`` (pathwise, two PPO epochs): 12 steps, a checkpoint every 5, killed after step 7."""
    from test_rl_worker import pretrain

    start = pretrain(tone_data, tmp_path / "sup", steps=10)
    env = {"TEST_CHECKPOINT_EVERY": "5", "TEST_NUM_WORKERS": "1", "TEST_ESTIMATOR": "pathwise", "TEST_PPO_EPOCHS": "2"}
    _run("test_rl_worker.py", tone_data, start, tmp_path / "straight", 12, **env)
    killed = _run("test_rl_worker.py", tone_data, start, tmp_path / "killed", 12, 7, check=False, **env)
    assert killed.returncode == -9 and list_checkpoints(tmp_path / "killed") == [5]
    _run("test_rl_worker.py", tone_data, start, tmp_path / "killed", 12, **env)
    _assert_same_end(tmp_path / "straight", tmp_path / "killed", 12)
