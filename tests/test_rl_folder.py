"""`marsctl train rl --data FOLDER --queries CSV`: reference-free RL on a plain folder of mixtures.

A tiny untrained separator and the deterministic test encoders (tests/test_rl_worker.py) run a
few real RL steps on synthetic tone + noise mixtures: weights change, the reward terms are
logged (no SI-SDRi), a killed run resumes bit-exactly, a reward term that needs a reference is
refused in one line before anything loads, a corrupt file is skipped in one line.

    python tests/test_rl_folder.py FOLDER QUERIES START RUN MAX_STEPS [KILL_AFTER_STEP]

runs the folder RL (SIGKILLing itself after a step when asked; the resume test's worker).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from marsctl.audio import save_audio  # noqa: E402
from marsctl.config import SignalConfig  # noqa: E402
from marsctl.errors import ConfigError, MarsctlError  # noqa: E402
from marsctl.models.separator import Separator, SeparatorConfig, load_separator, save_separator  # noqa: E402
from marsctl.rl.trainer import RLConfig, load_rl_config, train_rl  # noqa: E402
from marsctl.train.checkpoint import list_checkpoints  # noqa: E402

SR = 16_000
REFERENCE_FREE = {"semantic_anchor": 0.0, "si_sdr": 0.0, "query_similarity": 1.0, "energy_guard": 1.0}
GOOD_FILES = 6


def _tone(freq: float, seconds: float, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))).astype(np.float32)


def make_folder(root: Path) -> tuple[Path, Path]:
    """GOOD_FILES mixtures of a tone and noise (lengths 0.4-1.4 s, so one is shorter than a segment),
    one corrupt file with a query, one file without a query, and the queries CSV."""
    rng = np.random.default_rng(5)
    folder = root / "mixtures"
    rows = ["path,query"]
    for i in range(GOOD_FILES):
        seconds = 0.4 + 0.2 * i
        mix = _tone(150 + 40 * i, seconds, rng) + 0.1 * rng.standard_normal(int(seconds * SR)).astype(np.float32)
        save_audio(folder / f"sub/mix{i}.wav" if i % 2 else folder / f"mix{i}.wav", mix, SR)
        name = f"sub/mix{i}.wav" if i % 2 else f"mix{i}.wav"
        rows.append(f"{name},low hum")
        if i == 0:
            rows.append(f"{name},noise hiss|static")  # a second query of the same file (composed)
    (folder / "broken.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEnot really audio")
    rows.append("broken.wav,low hum")
    save_audio(folder / "unlisted.wav", _tone(440, 0.5, rng), SR)
    queries = folder / "queries.csv"
    queries.write_text("\n".join(rows) + "\n")
    return folder, queries


def make_start(out: Path) -> Path:
    """A tiny untrained separator for 16-d queries (the test encoders')."""
    torch.manual_seed(0)
    config = SeparatorConfig(query_dim=16, num_levels=5, base_channels=8, max_channel_multiplier=4, mask_channels=8,
                             signal=SignalConfig(segment_samples=8191))
    save_separator(Separator(config), out, encoder="test")
    return out


def folder_config(folder: Path, queries: Path, start: Path, max_steps: int, **kw) -> RLConfig:
    base = dict(
        data=str(folder), queries=str(queries), init_model=str(start), encoder="test", reward_encoder="test-reward",
        batch_size=2, group_size=2, max_steps=max_steps, learning_rate=1e-3, warmup_steps=1, val_every=2,
        checkpoint_every=2, log_every=1, num_workers=0, val_mixtures=2, estimator="pathwise", entropy_coef=0.0,
        rewards=REFERENCE_FREE,
    )
    base.update(kw)
    return RLConfig(**base)


def run(config: RLConfig, out: Path, **kw):
    from test_rl_worker import make_test_encoders

    query_encoder, reward_encoder = make_test_encoders()
    return train_rl(config, out, encoder=query_encoder, reward_encoder=reward_encoder, device="cpu", progress=False, **kw)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("rl-folder"))


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    return make_start(tmp_path_factory.mktemp("rl-folder-start") / "start")


def test_folder_run_trains_logs_reward_terms_and_skips_bad_files(folder, start, tmp_path):
    mixtures, queries = folder
    messages: list[str] = []
    result = run(folder_config(mixtures, queries, start, max_steps=4), tmp_path / "rl", log=messages.append)
    # the corrupt file: one line naming it; the file without a query: one summary line
    broken = [m for m in messages if "broken.wav" in m]
    assert len(broken) == 1 and broken[0].startswith("skipping") and "\n" not in broken[0], messages
    unlisted = [m for m in messages if "unlisted.wav" in m]
    assert len(unlisted) == 1 and "no query" in unlisted[0], messages
    assert any("5 training and 1 held-out file(s)" in m and "no SI-SDRi" in m for m in messages), messages
    # the weights moved
    before = load_file(str(start / "model.safetensors"))
    after = {k: v for k, v in result.model.state_dict().items()}
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())
    saved = load_file(str(tmp_path / "rl" / "model.safetensors"))
    assert all(torch.equal(saved[k], after[k]) for k in saved)
    # logged: the reference-free terms in training and validation, no SI-SDRi, no reference-needing term
    history = result.history
    val = [h for h in history if "val_reward" in h]
    assert [h["step"] for h in val] == [0, 2, 4]
    for record in val:
        assert {"val_reward/query_similarity", "val_reward/energy_guard"} <= set(record)
        assert not any(k.endswith(("si_sdr", "semantic_anchor", "si_sdri")) for k in record), record
        assert record["val_reward"] == pytest.approx(record["val_reward/query_similarity"] + record["val_reward/energy_guard"], abs=1e-5)
    train = [h for h in history if "reward_mean" in h]
    assert len(train) == 4 and all("reward/query_similarity" in h and "reward/energy_guard" in h for h in train)
    assert all(np.isfinite(h["reward_mean"]) and np.isfinite(h["grad_norm"]) for h in train)
    assert len((tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()) == 5  # step 0 (validation) + 4 steps
    # the run directory is a loadable separator whose card says what the validation measured
    loaded = load_separator(tmp_path / "rl")
    assert loaded.config["training"]["stage"] == "rl"
    recorded = loaded.config["training"]["queries"]  # relative to the run folder, so that no home path is recorded
    assert not Path(recorded).is_absolute() and (tmp_path / "rl" / recorded).resolve() == Path(queries).resolve()
    card = (tmp_path / "rl" / "README.md").read_text()
    assert "reference-free" in card and "no SI-SDRi" in card and "held-out file(s)" in card
    assert f"{val[-1]['val_reward']:.4f}" in card


def test_crops_are_seeded_weighted_by_length_and_padded(folder):
    from marsctl.rl.folder_data import FolderCropDataset, held_out_crops, load_folder_data

    mixtures, queries = folder
    data = load_folder_data(mixtures, queries, SR, seed=0, say=lambda message: None)
    assert len(data.train) + len(data.val) == GOOD_FILES and len(data.val) == 1
    assert sorted(q.texts for q in data.queries) == [("low hum",), ("noise hiss", "static")]
    again = load_folder_data(mixtures, queries, SR, seed=0, say=lambda message: None)
    assert [f.path for f in again.val] == [f.path for f in data.val]  # the held-out file is a function of the seed
    segment = 8191
    dataset = FolderCropDataset(data.train, segment, seed=3)
    assert len(dataset) == sum(max(1, -(-len(f.wave) // segment)) for f in data.train)
    dataset.set_epoch(2)
    a = dataset[1]["mixture"]
    dataset.set_epoch(0)
    dataset.set_epoch(2)
    assert torch.equal(a, dataset[1]["mixture"]) and a.shape == (segment,)
    short = FolderCropDataset([f for f in data.train if len(f.wave) < segment] or data.train[:1], 4 * SR, seed=3)[0]["mixture"]
    assert short.shape == (4 * SR,) and float(short[-100:].abs().max()) == 0.0  # zero-padded past the file's end
    crops = held_out_crops(data.val, segment, limit=3)
    assert 1 <= len(crops) <= 3 and all(c.mixture.shape == (segment,) for c in crops)


def test_reference_needing_reward_is_refused_before_anything_loads(folder, tmp_path):
    mixtures, queries = folder
    missing = tmp_path / "no-such-model"  # never loaded: the refusal comes first
    for weights, term, why in (({}, "semantic_anchor", "anchor z*"), ({"semantic_anchor": 0.0}, "si_sdr", "reference audio")):
        config = folder_config(mixtures, queries, missing, max_steps=1, rewards=weights)
        with pytest.raises(ConfigError) as caught:
            run(config, tmp_path / "rl")
        message = str(caught.value)
        assert f"reward term '{term}' needs" in message and why in message and "\n" not in message
        assert "query_similarity" in message and "energy_guard" in message  # what is allowed
    assert not (tmp_path / "rl").exists()


def test_no_usable_file_is_one_error_line(tmp_path, start):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.wav").write_bytes(b"")
    (folder / "b.flac").write_bytes(b"fLaC garbage")
    (folder / "q.csv").write_text("path,query\na.wav,low hum\nb.flac,noise hiss\n")
    messages: list[str] = []
    with pytest.raises(MarsctlError, match="no usable audio file with a query") as caught:
        run(folder_config(folder, folder / "q.csv", start, max_steps=1), tmp_path / "rl", log=messages.append)
    assert "\n" not in str(caught.value)
    assert [m.split(":")[0] for m in messages if m.startswith("skipping")] == [f"skipping {folder / 'a.wav'}", f"skipping {folder / 'b.flac'}"]
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    (dataset / "dataset.json").write_text("{}")
    with pytest.raises(ConfigError, match="data build' dataset; --queries is for a plain folder"):
        run(folder_config(dataset, folder / "q.csv", start, max_steps=1), tmp_path / "rl2")


def _worker(*args, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    proc = subprocess.run([sys.executable, __file__, *map(str, args)], env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr[-3000:])
    return proc


def test_resume_after_kill_is_bit_exact(folder, start, tmp_path):
    """6 steps with a DataLoader worker, a checkpoint every 3; killed after step 4, resumed from step 3."""
    mixtures, queries = folder
    _worker(mixtures, queries, start, tmp_path / "straight", 6)
    killed = _worker(mixtures, queries, start, tmp_path / "killed", 6, 4, check=False)
    assert killed.returncode == -9 and list_checkpoints(tmp_path / "killed") == [3]
    _worker(mixtures, queries, start, tmp_path / "killed", 6)
    name = "checkpoints/step-00000006"
    a = load_file(str(tmp_path / "straight" / name / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / name / "model.safetensors"))
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    sa, sb = (torch.load(tmp_path / run_dir / name / "training_state.pt", weights_only=True) for run_dir in ("straight", "killed"))
    timing = ("step_time_s", "reward_time_share")
    assert [{k: v for k, v in h.items() if k not in timing} for h in sa["history"]] == \
        [{k: v for k, v in h.items() if k not in timing} for h in sb["history"]]
    assert any("val_reward" in h for h in sa["history"])


def test_cli_refuses_a_reference_reward_and_ships_a_folder_recipe(folder, start, tmp_path):
    from typer.testing import CliRunner

    from marsctl.cli.main import app

    mixtures, queries = folder
    result = CliRunner().invoke(app, ["train", "rl", "--init-model", str(start), "--data", str(mixtures), "--queries", str(queries),
                                      "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "reward term 'semantic_anchor' needs" in result.output, result.output
    shipped = load_rl_config("rl-folder", {"queries": str(queries), "data": str(mixtures)})
    from marsctl.rl.folder_data import check_folder_config

    check_folder_config(shipped)  # the shipped recipe's weights are reference-free
    assert shipped.rewards.weights["query_similarity"] > 0


def main() -> None:
    folder, queries, start, out, max_steps = sys.argv[1:6]
    kill_after = int(sys.argv[6]) if len(sys.argv) > 6 else 0

    def on_step_end(step: int) -> None:
        if kill_after and step == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # a real kill: no cleanup

    config = folder_config(Path(folder), Path(queries), Path(start), int(max_steps), checkpoint_every=3, val_every=3, num_workers=1)
    run(config, Path(out), on_step_end=on_step_end)


if __name__ == "__main__":
    main()


def test_folder_run_warns_about_queries_the_start_was_not_trained_on(folder, tmp_path):
    """A start whose config records its classes: a folder query far from all of them gets one warning line
    (reference-free RL does not teach new classes, BENCHMARKS.md 12.2b), a known one none; the RL run's model
    records the start's classes."""
    import json

    from marsctl.rl.folder_data import new_class_warnings
    from test_rl_worker import make_test_encoders

    mixtures, queries = folder
    start = make_start(tmp_path / "start")
    config_path = start / "config.json"
    config = json.loads(config_path.read_text())
    config["labels"] = ["low hum"]  # "noise hiss" and "static" (file 0's composed query) are not
    config_path.write_text(json.dumps(config))
    messages: list[str] = []
    run(folder_config(mixtures, queries, start, max_steps=1, val_every=1, checkpoint_every=1), tmp_path / "rl", log=messages.append)
    warned = [m for m in messages if "reference-free RL does not teach new classes" in m]
    encoder, _ = make_test_encoders()
    from marsctl.separate.queries import Query

    expected = new_class_warnings(encoder, ["low hum"], [Query(texts=("noise hiss", "static")), Query(texts=("low hum",))])
    assert warned == expected and 1 <= len(warned) <= 2 and not any("'low hum'" in m for m in warned), messages
    assert all("\n" not in m and "nearest: low hum" in m for m in warned)
    assert json.loads((tmp_path / "rl" / "config.json").read_text())["labels"] == ["low hum"]
    assert new_class_warnings(encoder, [], [Query(texts=("static",))]) == []  # a start that records no classes: no check
