"""`marsctl hub push|pull` end to end: real subprocesses against the loopback Hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hub_server import fake_hub, hf_env, make_dataset_artifact, make_encoder_artifact  # noqa: F401  (fixtures)


def marsctl(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **env, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    return subprocess.run([sys.executable, "-m", "marsctl", *args], env=full_env, capture_output=True, text=True,
                          timeout=300)


def test_cli_push_pull_and_offline_pull(fake_hub, hf_env, tmp_path: Path) -> None:
    token = hf_env["HF_TOKEN"]
    env = {**hf_env, "HF_ENDPOINT": fake_hub.endpoint}
    root = tmp_path / "ds"
    real = make_dataset_artifact(root, token=token)

    dry = marsctl(["hub", "push", str(root), "org/toy-ds", "--dry-run", "--json"], env)
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["files"] == sorted([*real, "README.md"])
    assert fake_hub.requests == []

    pushed = marsctl(["hub", "push", str(root), "org/toy-ds", "--json"], env)
    assert pushed.returncode == 0, pushed.stderr
    result = json.loads(pushed.stdout)
    assert (result["repo_type"], result["kind"]) == ("dataset", "dataset")
    assert sorted(fake_hub.commits[-1].files) == sorted([*real, "README.md"])
    assert token not in pushed.stdout + pushed.stderr + dry.stdout + dry.stderr
    assert all(token.encode() not in body for body in fake_hub.all_received_bytes())

    pulled = marsctl(["hub", "pull", "org/toy-ds"], env)
    assert pulled.returncode == 0, pulled.stderr
    folder = Path(pulled.stdout.strip().splitlines()[-1])
    assert folder.parent.parent.name == "datasets--org--toy-ds" and folder.name == result["commit"]
    assert (folder / "dataset.json").read_bytes() == (root / "dataset.json").read_bytes()

    fake_hub.stop()
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    again = marsctl(["hub", "pull", f"org/toy-ds@{result['commit']}"], offline)
    assert again.returncode == 0, again.stderr
    assert Path(again.stdout.strip().splitlines()[-1]) == folder

    missing = marsctl(["hub", "pull", "org/not-pulled@v2", "--repo-type", "model"], offline)
    assert missing.returncode == 2
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert "marsctl hub pull org/not-pulled@v2 --repo-type model" in lines[0]


def test_cli_push_refuses_a_token_in_the_artifact_without_printing_it(fake_hub, hf_env, tmp_path: Path) -> None:
    token = hf_env["HF_TOKEN"]
    root = tmp_path / "enc"
    make_encoder_artifact(root)
    (root / "train.log").write_text(f"logged in with {token}\n")
    run = marsctl(["hub", "push", str(root), "org/enc"], {**hf_env, "HF_ENDPOINT": fake_hub.endpoint})
    assert run.returncode == 2
    assert "refusing to push, train.log contain" in run.stderr
    assert token not in run.stdout + run.stderr
    assert fake_hub.commits == []


@pytest.mark.parametrize("command", [["hub", "--help"], ["hub", "push", "--help"], ["hub", "pull", "--help"]])
def test_cli_help_explains_the_commands(command: list[str]) -> None:
    from typer.testing import CliRunner

    from marsctl.cli.main import app

    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0
    assert "Hub" in result.output and "--help" in result.output


def _labeled_folder(root: Path) -> None:
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(0)
    t = np.arange(32_000) / 16_000
    for label, f0 in (("dog", 300.0), ("bell", 900.0)):
        for split in ("train", "val", "test"):
            for i in range(2):
                path = root / label / split / f"{i}.wav"
                path.parent.mkdir(parents=True, exist_ok=True)
                wave = 0.2 * np.sin(2 * np.pi * (f0 + 50 * i) * t) + 0.01 * rng.standard_normal(t.size)
                sf.write(path, wave.astype("float32"), 16_000)


def test_data_build_push_to_then_reuse_elsewhere(fake_hub, hf_env, tmp_path: Path) -> None:
    """`marsctl data build --push-to` publishes the dataset; `--reuse` on an empty --out takes it back."""
    env = {**hf_env, "HF_ENDPOINT": fake_hub.endpoint}
    _labeled_folder(tmp_path / "sounds")
    args = ["data", "build", "folder", "--root", str(tmp_path / "sounds"), "-q"]
    first = marsctl([*args, "--out", str(tmp_path / "ds1"), "--push-to", "org/sounds"], env)
    assert first.returncode == 0, first.stderr
    assert "pushed to the Hub: datasets/org/sounds@" in first.stdout
    head = fake_hub.head_files("org/sounds", "dataset")
    assert {"dataset.json", "manifests/clips.parquet", "provenance.json", "README.md"} <= set(head)
    assert not [name for name in head if name.startswith("state/tmp/")]

    n_commits = len(fake_hub.commits)
    # another machine (empty cache): --reuse looks at the --push-to repo on the Hub
    second = marsctl([*args, "--out", str(tmp_path / "ds2"), "--push-to", "org/sounds", "--reuse"],
                     {**env, "HF_HOME": str(tmp_path / "home2"), "HF_HUB_CACHE": str(tmp_path / "home2" / "hub")})
    assert second.returncode == 0, second.stderr
    assert "reused the dataset built with the same recipe and inputs" in second.stdout
    assert len(fake_hub.commits) == n_commits  # nothing rebuilt, nothing pushed
    for name in ("dataset.json", "manifests/clips.parquet", "manifests/mixtures.parquet"):
        assert (tmp_path / "ds2" / name).read_bytes() == (tmp_path / "ds1" / name).read_bytes()


@pytest.mark.slow  # about 40 s on 2 cores: a folder build, a 2-step training run, a reuse
def test_train_sup_push_to_then_reuse(fake_hub, hf_env, tmp_path: Path) -> None:
    env = {**hf_env, "HF_ENDPOINT": fake_hub.endpoint}
    _labeled_folder(tmp_path / "sounds")
    built = marsctl(["data", "build", "folder", "--root", str(tmp_path / "sounds"), "--out", str(tmp_path / "ds"), "-q"], env)
    assert built.returncode == 0, built.stderr
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("encoder: builtin\nsignal: {segment_samples: 8191}\n"
                      "architecture: {num_levels: 5, base_channels: 8, max_channel_multiplier: 4}\n"
                      "batch_size: 2\nmax_steps: 2\nwarmup_steps: 1\nval_every: 2\ncheckpoint_every: 2\nnum_workers: 0\n")
    args = ["train", "sup", "--recipe", str(recipe), "--data", str(tmp_path / "ds"), "--push-to", "org/sup"]
    first = marsctl([*args, "--out", str(tmp_path / "run1")], env)
    assert first.returncode == 0, first.stderr
    head = fake_hub.head_files("org/sup")
    assert {"config.json", "model.safetensors", "provenance.json", "README.md"} <= set(head)
    assert not [name for name in head if name.startswith("checkpoints/")]
    n_commits = len(fake_hub.commits)
    second = marsctl([*args, "--out", str(tmp_path / "run2"), "--reuse"],
                     {**env, "HF_HOME": str(tmp_path / "home2"), "HF_HUB_CACHE": str(tmp_path / "home2" / "hub")})
    assert second.returncode == 0, second.stderr
    assert "reused the separator trained with the same config and data" in second.stdout
    assert len(fake_hub.commits) == n_commits
    assert (tmp_path / "run2" / "model.safetensors").read_bytes() == (tmp_path / "run1" / "model.safetensors").read_bytes()
