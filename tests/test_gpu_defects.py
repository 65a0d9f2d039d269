"""What broke (or would have broken) on CUDA and several GPUs (issue 26, defects 1-12; issue 32 item 9),
each simulated on the CPU: states mapped to the ``meta`` device, a monkeypatched CUDA runtime, gloo
ranks with different views of the run directory, and host syncs counted as tensor-to-Python
conversions during an unlogged RL step."""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from marsctl.errors import MarsctlError
from marsctl.train import checkpoint as ckpt
from marsctl.train.checkpoint import list_checkpoints
from clap_fixtures import no_network, tiny_clap  # noqa: F401  (fixtures)
from test_separator_fixtures import LabelTestEncoder, make_tone_dataset
from test_train_sup_worker import small_config

HERE = Path(__file__).parent
WORKER = HERE / "gpu_defects_worker.py"


def _env(**extra) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent), **extra)


def _torchrun(*args, timeout: float = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER), *map(str, args)]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tone_data(tmp_path_factory):
    return make_tone_dataset(tmp_path_factory.mktemp("gpu-tones") / "data")


@pytest.fixture(scope="module")
def four_steps(tone_data, tmp_path_factory):
    """A 4-step supervised run with a checkpoint every step (steps 2, 3 and 4 kept)."""
    from marsctl.train.supervised import train_supervised

    run = tmp_path_factory.mktemp("gpu-sup") / "run"
    config = small_config(str(tone_data), 4, checkpoint_every=1, val_every=100, log_every=1)
    train_supervised(config, run, encoder=LabelTestEncoder(), device="cpu", progress=False)
    assert list_checkpoints(run) == [2, 3, 4]
    return run


def _copy_run(run: Path, to: Path, drop: tuple[int, ...] = (), world_size: int | None = None) -> Path:
    shutil.copytree(run, to)
    for step in drop:
        shutil.rmtree(ckpt.checkpoint_dir(to, step))
    if world_size is not None:  # as a run of world_size processes wrote them
        for step in list_checkpoints(to):
            path = ckpt.checkpoint_dir(to, step) / ckpt.STATE_FILE
            state = torch.load(path, weights_only=True)
            state["world_size"] = world_size
            torch.save(state, path)
    return to


# --- 1. the training state is loaded to the CPU, whatever the training device -------------------------------
def test_resume_state_stays_on_the_cpu_for_any_device(four_steps):
    """On CUDA, ``map_location=ctx.device`` put the RNG ByteTensor on the GPU (``set_rng_state`` raised
    TypeError) and AdamW's ``step`` there (a sync per parameter per step). Simulated with the meta
    device: ``set_rng_state`` of a meta tensor fails the same way."""
    from marsctl.models.separator import Separator
    from marsctl.train.loop import restore_checkpoint

    directory = ckpt.checkpoint_dir(four_steps, 4)
    state = ckpt.read_checkpoint(directory)
    tensors = [v for v in state["optimizer"]["state"][0].values() if isinstance(v, torch.Tensor)] + [state["rng"]["torch"]]
    assert all(t.device.type == "cpu" for t in tensors)
    with pytest.raises((TypeError, RuntimeError, NotImplementedError)):  # what map_location=<device> did
        torch.set_rng_state(ckpt.load_training_state(directory, map_location="meta")["rng"]["torch"])

    model = Separator(small_config("x", 4).separator_config(16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    torch.manual_seed(123)
    restore_checkpoint(directory, state, model, optimizer, scheduler, torch.device("meta"))
    assert torch.equal(torch.get_rng_state(), state["rng"]["torch"])
    steps = [s["step"] for s in optimizer.state.values()]
    assert steps and all(s.device.type == "cpu" and float(s) == 4 for s in steps)  # AdamW's step stays a CPU scalar
    saved = load_file(str(directory / "model.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


# --- 2. CUDA RNG state: one device's, restored into that device ----------------------------------------------
class _FakeCudaRng:
    """torch.cuda's RNG functions for a machine with ``count`` GPUs: records every set."""

    def __init__(self, monkeypatch, count: int):
        self.count, self.sets = count, []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [self.get(i) for i in range(count)])
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: [self.set(s, i) for i, s in enumerate(states)])

    def _index(self, device) -> int:
        index = device if isinstance(device, int) else (torch.device(device).index or 0)
        if index >= self.count:
            raise IndexError(f"cuda:{index} of {self.count} GPU(s)")  # what torch.cuda does on a real machine
        return index

    def get(self, device="cuda") -> torch.Tensor:
        return torch.full((8,), self._index(device), dtype=torch.uint8)

    def set(self, state, device="cuda") -> None:
        self.sets.append((self._index(device), int(state[0])))


def test_cuda_rng_state_is_saved_and_restored_per_device(monkeypatch):
    saved_on_two = _FakeCudaRng(monkeypatch, count=2)
    state = ckpt.rng_state(torch.device("cuda", 1))
    assert torch.equal(state["cuda"], torch.full((8,), 1, dtype=torch.uint8))  # its own GPU's state only
    assert saved_on_two.sets == []
    one_gpu = _FakeCudaRng(monkeypatch, count=1)  # resumed where only one GPU is visible
    ckpt.set_rng_state(state, torch.device("cuda", 0))
    assert one_gpu.sets == [(0, 1)]
    legacy = {"torch": torch.get_rng_state(), "cuda": [torch.full((8,), 7, dtype=torch.uint8), torch.full((8,), 9, dtype=torch.uint8)]}
    ckpt.set_rng_state(legacy, torch.device("cuda", 0))  # an older checkpoint with every GPU's state: its own entry
    assert one_gpu.sets == [(0, 1), (0, 7)]
    ckpt.set_rng_state(legacy, torch.device("cpu"))  # a CPU run touches no GPU
    assert one_gpu.sets == [(0, 1), (0, 7)]


# --- 3 and issue 32 item 9: rank 0 chooses the step; incomplete checkpoints are skipped ------------------------
def test_ranks_with_different_views_resume_from_rank0s_step(tone_data, four_steps, tmp_path):
    """Two gloo ranks, each with its own view of the run directory (a lagging shared file system).
    First rank 0 sees steps 2-3 and rank 1 also a step 4: both resume at step 3 and end with identical
    weights (before: rank 1 resumed at 4; the ranks diverged or hung in a collective). Then rank 1 lacks
    the step 4 that rank 0 resumes from: every rank stops with one line, none trains."""
    views = [_copy_run(four_steps, tmp_path / "a0", drop=(4,), world_size=2), _copy_run(four_steps, tmp_path / "a1", world_size=2),
             _copy_run(four_steps, tmp_path / "b0", world_size=2), _copy_run(four_steps, tmp_path / "b1", drop=(4,), world_size=2)]
    proc = _torchrun("views", str(tone_data), 5, tmp_path / "out", *views)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = ([json.loads((tmp_path / "out" / f"{i}-rank{r}.json").read_text()) for r in (0, 1)] for i in (0, 1))
    assert [info["steps"] for info in first] == [[4, 5], [4, 5]] and [info["error"] for info in first] == [None, None]
    r0, r1 = (load_file(str(tmp_path / "out" / f"0-rank{r}.safetensors")) for r in (0, 1))
    assert [k for k in r0 if "running" not in k and "num_batches" not in k and not torch.equal(r0[k], r1[k])] == []
    assert [info["steps"] for info in second] == [[], []]
    assert "another rank cannot read checkpoint step 4" in second[0]["error"]  # rank 0 stops too, instead of hanging
    assert second[1]["error"].startswith("rank 1: cannot read checkpoint step 4, which rank 0 resumes from")
    assert list_checkpoints(views[2]) == [2, 3, 4]


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tone_data, four_steps, tmp_path, damage):
    from marsctl.train.supervised import train_supervised

    run = _copy_run(four_steps, tmp_path / "run")
    model_file = ckpt.checkpoint_dir(run, 4) / "model.safetensors"
    if damage == "truncate":  # a disk that filled up, a copy cut short
        model_file.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])
    else:
        model_file.unlink()
    lines: list[str] = []
    config = small_config(str(tone_data), 5, checkpoint_every=1, val_every=100, log_every=1)
    result = train_supervised(config, run, encoder=LabelTestEncoder(), device="cpu", progress=False, log=lines.append)
    skipped = [line for line in lines if "step-00000004" in line]
    assert len(skipped) == 1 and ("truncated" in skipped[0] or "no model.safetensors" in skipped[0]), lines
    assert any(line.endswith("(step 3)") and line.startswith("resuming from") for line in lines), lines
    assert result.step == 5 and [h["step"] for h in result.history if "loss" in h] == [1, 2, 3, 4, 5]
    assert ckpt.read_checkpoint(ckpt.checkpoint_dir(run, 4))["step"] == 4  # step 4 written again, complete


# --- 4. the process group's timeout covers rank 0's validation ---------------------------------------------
def test_process_group_timeout_is_sized_to_validation(monkeypatch):
    import datetime

    import torch.distributed as torch_dist

    from marsctl.train import distributed

    calls = []
    monkeypatch.setattr(torch_dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch_dist, "init_process_group", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    distributed.DistributedContext.from_env("cpu")
    assert calls[-1]["backend"] == "gloo" and calls[-1]["timeout"] >= datetime.timedelta(hours=1)  # NCCL's default: 10 min
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "5400")
    distributed.DistributedContext.from_env("cpu")
    assert calls[-1]["timeout"] == datetime.timedelta(seconds=5400)
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(MarsctlError, match="MARSCTL_COLLECTIVE_TIMEOUT_S='soon'"):
        distributed.DistributedContext.from_env("cpu")


# --- 5. a changed world size is refused -------------------------------------------------------------------------
def test_resume_with_another_world_size_is_refused(tone_data, four_steps, tmp_path):
    from marsctl.train.supervised import train_supervised

    run = _copy_run(four_steps, tmp_path / "run", world_size=2)
    config = small_config(str(tone_data), 5, checkpoint_every=1, val_every=100, log_every=1)
    with pytest.raises(MarsctlError, match=r"trained by 2 process\(es\) and this run has 1"):
        train_supervised(config, run, encoder=LabelTestEncoder(), device="cpu", progress=False)
    assert list_checkpoints(run) == [2, 3, 4]


# --- 6. bf16 only where the hardware has it; the precision is logged ------------------------------------------
def test_bf16_needs_native_hardware_support(monkeypatch, tone_data, tmp_path):
    from marsctl.train.distributed import DistributedContext
    from marsctl.train.supervised import SupervisedTask, train_supervised
    from marsctl.models.separator import Separator

    native = {"value": False}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation or native["value"])
    config = small_config(str(tone_data), 1)
    model = Separator(config.separator_config(16))
    cuda = DistributedContext(device=torch.device("cuda", 0))
    assert not SupervisedTask(config, model, LabelTestEncoder(), tone_data, cuda).use_bf16  # emulated bf16 (e.g. a V100/T4)
    native["value"] = True
    assert SupervisedTask(config, model, LabelTestEncoder(), tone_data, cuda).use_bf16  # an A100/H100
    assert not SupervisedTask(config, model, LabelTestEncoder(), tone_data, DistributedContext()).use_bf16  # CPU
    lines: list[str] = []
    train_supervised(small_config(str(tone_data), 1, val_every=100), tmp_path / "run", encoder=LabelTestEncoder(), device="cpu",
                     progress=False, log=lines.append)
    assert "precision: fp32 on cpu" in lines


# --- 7. CUDA asked for where there is none: one line, before relaunching ---------------------------------------
def test_missing_gpus_are_one_line_before_relaunching(monkeypatch, tone_data, tmp_path):
    from typer.testing import CliRunner

    from marsctl.cli.main import app
    from marsctl.train import distributed

    runner = CliRunner()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = runner.invoke(app, ["train", "sup", "--data", str(tone_data), "--out", str(tmp_path / "a"), "--device", "cuda"])
    assert result.exit_code == 2, result.output
    assert "--device cuda: no CUDA GPU is visible here" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    launched = []
    monkeypatch.setattr(distributed, "relaunch", lambda *args, **kwargs: launched.append(args) or 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    result = runner.invoke(app, ["train", "sup", "--data", str(tone_data), "--out", str(tmp_path / "b"), "--gpus", "2"])
    assert result.exit_code == 2 and "--gpus 2: only 1 CUDA GPU(s) visible here" in result.output, result.output
    assert launched == [] and not (tmp_path / "b").exists()


# --- 8. no host sync on an unlogged RL step ------------------------------------------------------------------
_CONVERSIONS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")


def _count_host_syncs(monkeypatch, run) -> collections.Counter:
    """Tensor-to-Python conversions (each one a device sync on a GPU) made while ``run()`` runs, by caller.
    torch.optim's own ``.item()`` of AdamW's step is left out: that counter is a CPU tensor by design
    (test 1 checks that a resume keeps it there)."""
    counts: collections.Counter = collections.Counter()
    active = [False]
    for name in _CONVERSIONS:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            if active[0]:
                caller = traceback.extract_stack(limit=2)[0]
                if f"torch{os.sep}optim{os.sep}" not in caller.filename:
                    counts[f"{_name} {Path(caller.filename).name}:{caller.lineno}"] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    active[0] = True
    try:
        run()
    finally:
        active[0] = False
    return counts


@pytest.mark.parametrize("estimator", ["pathwise", "score_function"])
def test_an_unlogged_rl_step_makes_no_host_sync(monkeypatch, estimator):
    from marsctl.rl.config import RLConfig
    from test_rl_update_paths import _run

    config = RLConfig(init_model="x", data="x", batch_size=3, group_size=2, ppo_epochs=2, estimator=estimator, kl_coef=0.5)
    assert _count_host_syncs(monkeypatch, lambda: _run(config, wrap=False, diagnostics=False, steps=1)) == {}
    logged = _count_host_syncs(monkeypatch, lambda: _run(config, wrap=False, diagnostics=True, steps=1))
    assert logged == {}  # the statistics stay tensors: the trainer copies them to the host at once


# --- 9, 11, 12: one all-reduce per logged step; rank 0 prints; the judge on rank 0; DDP buffers ---------------
def test_under_torchrun_one_all_reduce_per_logged_step_one_final_line_judge_on_rank0(tone_data, tmp_path):
    """``marsctl train sup`` then ``train rl`` from it, in two gloo ranks (2 steps, step 2 logged)."""
    proc = _torchrun("cli-rl", tone_data, tmp_path / "run", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    sup, rl = ([json.loads((tmp_path / "out" / f"{stage}-rank{r}.json").read_text()) for r in (0, 1)] for stage in ("cli", "rl"))
    assert [i["exit_code"] for i in sup] == [0, 0], [i["exception"] for i in sup]
    assert [i["output"].count("done: step 2") for i in sup] == [1, 0]  # rank 1's numbers are not the run's
    assert "precision: fp32 on cpu" in sup[0]["output"] and "precision" not in sup[1]["output"]
    for info in sup + rl:  # the logged step's metrics: one stacked all-reduce (RL: about 20 before)
        assert info["all_reduces"]["2"] - info["all_reduces"]["1"] == 1, info["all_reduces"]
    assert [i["all_reduces"]["1"] for i in rl] == [0, 0]  # nothing on an unlogged RL step
    assert [i["broadcast_buffers"] for i in sup] == [[True], [True]]  # supervised BatchNorm trains its statistics
    assert [i["broadcast_buffers"] for i in rl] == [[False], [False]]  # RL's BatchNorm is frozen
    assert [i["judge_loads"] for i in rl] == [[0], []]
    r0, r1 = (load_file(str(tmp_path / "out" / f"rl-rank{r}.safetensors")) for r in (0, 1))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)


# --- 10. per-clip loops ------------------------------------------------------------------------------------------
def test_batch_queries_stay_on_the_encoder_device_and_frames_decode_once(tmp_path, monkeypatch):
    """The audio and image queries of a batch went GPU -> CPU -> GPU; with the encoder on the meta device
    any copy to the host fails. Each frame is decoded (and embedded) once, not every step."""
    from marsctl.queries import QueryBuilder
    from marsctl.separate import queries as image_reader
    from marsctl.train.data import collate, mixing_dataset
    from marsctl.config import SignalConfig

    data = make_tone_dataset(tmp_path / "data", frames=True)
    signal_config = SignalConfig(segment_samples=8191)
    dataset = mixing_dataset(data, "train", signal_config, 2, seed=0)
    batch = collate([dataset[i] for i in range(3)])
    cpu_builder = QueryBuilder(LabelTestEncoder(), data, signal_config.sample_rate, ("text", "audio", "image"))
    on_cpu = cpu_builder.batch(batch, torch.Generator().manual_seed(0))
    meta_builder = QueryBuilder(LabelTestEncoder().to("meta"), data, signal_config.sample_rate, ("text", "audio", "image"))
    on_meta = meta_builder.batch(batch, torch.Generator().manual_seed(0))
    assert on_meta.device.type == "meta" and on_meta.shape == on_cpu.shape == (3, 2, 16)

    loads = []
    real_load = image_reader.load_image
    monkeypatch.setattr(image_reader, "load_image", lambda path, *a, **k: loads.append(path) or real_load(path, *a, **k))
    builder = QueryBuilder(LabelTestEncoder(), data, signal_config.sample_rate, ("text", "image"), mixup=False)
    first = builder.batch(batch, None)
    assert torch.equal(first, builder.batch(batch, None))
    frames = {p[0] for item in batch["frame_paths"] for p in item if p}
    assert len(loads) == len(frames) > 0  # decoded once each, the second batch from the cache
    alone = torch.stack([builder.image([path]) for path in sorted(frames)])
    cached = torch.stack([builder._frame_cache[path] for path in sorted(frames)])
    assert torch.equal(alone, cached)  # the same embedding as one frame on its own (eval's query)


@pytest.mark.skipif(importlib.util.find_spec("laion_clap") is None, reason="the laion-clap extra is not installed")
def test_clap_windows_go_through_htsat_in_one_batch_and_resampling_is_batched(monkeypatch, tiny_clap):
    from marsctl.models.encoders import common
    from marsctl.models.encoders.clap import ClapEncoder, ClapEncoderConfig

    checkpoint, text_dir, _ = tiny_clap
    encoder = ClapEncoder(ClapEncoderConfig(checkpoint=str(checkpoint), text_model=str(text_dir))).eval()
    waves = [0.1 * torch.randn(16_000, generator=torch.Generator().manual_seed(i)) for i in range(10)]
    alone = torch.cat([encoder.embed_audio([w], 16_000) for w in waves])
    calls, resamples = [], []
    real_embedding, real_resample = encoder.clap.get_audio_embedding, common.resample
    monkeypatch.setattr(encoder.clap, "get_audio_embedding", lambda inputs: calls.append(len(inputs)) or real_embedding(inputs))
    monkeypatch.setattr(common, "resample", lambda wave, *a: resamples.append(tuple(wave.shape)) or real_resample(wave, *a))
    together = encoder.embed_audio(waves, 16_000)
    assert calls == [8, 2]  # one HTSAT batch per audio_batch_size clips (was one call per clip: 10)
    assert resamples == [(10, 16_000)]  # one resampling of the stacked waveforms (was 10)
    assert torch.allclose(together, alone, atol=1e-5)


# --- 12. the launcher forwards SIGTERM to torchrun, which ends its workers ------------------------------------
def test_sigterm_to_the_launcher_ends_torchruns_workers(tmp_path):
    """torchrun's workers run in their own session: killing the launcher's process group leaves them
    running. The launcher forwards SIGINT/SIGTERM to torchrun, which ends them."""
    worker = tmp_path / "sleeper.py"
    pid_file = tmp_path / "worker.pid"
    worker.write_text(f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(600)\n")
    launcher = (
        "import sys\nfrom marsctl.train.distributed import run_forwarding_signals\n"
        f"sys.exit(run_forwarding_signals([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node=1', {str(worker)!r}]))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", launcher], env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline and proc.poll() is None, "the worker never started"
            time.sleep(0.2)
        worker_pid = int(pid_file.read_text())
        os.kill(proc.pid, signal.SIGTERM)  # the launcher only, as a job scheduler would
        assert proc.wait(timeout=90) != 0
        deadline = time.monotonic() + 30
        while _alive(worker_pid):
            assert time.monotonic() < deadline, "torchrun's worker outlived the launcher"
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if pid_file.exists() and pid_file.read_text() and _alive(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (ended, not yet reaped by its parent) is not running
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
