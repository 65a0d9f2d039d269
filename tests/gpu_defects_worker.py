"""Subprocess entry point of tests/test_gpu_defects.py (no tests here): one rank of a gloo run under
``python -m torch.distributed.run --nproc-per-node=2``. Each mode writes what the test checks into
JSON files under OUT (and the ranks' final weights into ``rank<r>.safetensors`` files).

    views DATA MAX_STEPS OUT RUN0 RUN1 [RUN0 RUN1 ...]
        for each pair, train sup where rank 0 sees RUN0 and rank 1 sees RUN1 (two views of one run
        directory, as a lagging network file system gives): the steps each rank trained, or its error
        (``OUT/<i>-rank<r>.json``)
    cli-rl DATA RUN OUT
        ``marsctl train sup`` as torchrun's child (its output, the all-reduces of each step, DDP's
        broadcast_buffers: ``OUT/cli-rank<r>.json``), then train rl (score_function) from that run (the
        all-reduces of each step, DDP's broadcast_buffers, which ranks loaded the judge: ``OUT/rl-rank<r>.json``)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
import torch.distributed as torch_dist  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

RANK = int(os.environ.get("RANK", "0"))


class Recorder:
    """Counts torch.distributed.all_reduce calls inside each training step (logged or not), and DDP's broadcast_buffers."""

    def __init__(self) -> None:
        self.all_reduces = 0
        self.per_step: dict[int, int] = {}
        self.broadcast_buffers: list[bool] = []
        real_all_reduce = torch_dist.all_reduce

        def all_reduce(*args, **kwargs):
            self.all_reduces += 1
            return real_all_reduce(*args, **kwargs)

        torch_dist.all_reduce = all_reduce
        real_init = torch.nn.parallel.DistributedDataParallel.__init__
        recorder = self

        def ddp_init(self, *args, **kwargs):
            recorder.broadcast_buffers.append(bool(kwargs.get("broadcast_buffers", True)))
            real_init(self, *args, **kwargs)

        torch.nn.parallel.DistributedDataParallel.__init__ = ddp_init

    def count_steps(self, task_class) -> None:
        real_step = task_class.train_step
        recorder = self

        def train_step(self, step, batch, train_model, optimizer, log):
            before = recorder.all_reduces
            out = real_step(self, step, batch, train_model, optimizer, log)
            recorder.per_step[step] = recorder.all_reduces - before
            return out

        task_class.train_step = train_step


def write(path: Path, info: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info))


def save_weights(path: Path, model: torch.nn.Module) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def views(data: str, max_steps: int, out: Path, runs: list[str]) -> None:
    from marsctl.errors import MarsctlError
    from marsctl.train.supervised import train_supervised
    from test_separator_fixtures import LabelTestEncoder
    from test_train_sup_worker import small_config

    for index in range(len(runs) // 2):
        steps: list[int] = []
        config = small_config(data, max_steps, checkpoint_every=1, val_every=100, log_every=1)
        try:
            result = train_supervised(config, runs[2 * index + RANK], encoder=LabelTestEncoder(), device="cpu", progress=False,
                                      on_step_end=steps.append)
        except MarsctlError as exc:
            write(out / f"{index}-rank{RANK}.json", {"steps": steps, "error": str(exc)})
            continue
        save_weights(out / f"{index}-rank{RANK}.safetensors", result.model)
        write(out / f"{index}-rank{RANK}.json", {"steps": steps, "error": None})


def cli_rl(data: str, run: str, out: Path) -> None:
    import marsctl.models.encoders as encoders
    from test_rl_worker import make_test_encoders, rl_config
    from test_separator_fixtures import LabelTestEncoder
    from typer.testing import CliRunner

    from marsctl.cli.main import app
    from marsctl.rl import judge as judge_module
    from marsctl.rl.trainer import RLTask, train_rl
    from marsctl.train.supervised import SupervisedTask

    real_load = encoders.load_encoder
    encoders.load_encoder = lambda spec, *a, **k: LabelTestEncoder() if spec == "test" else real_load(spec, *a, **k)
    recorder = Recorder()
    recorder.count_steps(SupervisedTask)
    recorder.count_steps(RLTask)
    recipe = Path(run) / "tiny.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text("signal: {segment_samples: 8191}\narchitecture: {num_levels: 5, base_channels: 8, max_channel_multiplier: 4}\n"
                      "batch_size: 2\nmax_steps: 2\nwarmup_steps: 1\nval_every: 2\ncheckpoint_every: 2\nlog_every: 2\nnum_workers: 0\n"
                      "query_modalities: [text]\n")
    result = CliRunner().invoke(app, ["train", "sup", "--recipe", str(recipe), "--data", data, "--encoder", "test",
                                      "--out", f"{run}/sup", "--device", "cpu"])
    write(out / f"cli-rank{RANK}.json", {"exit_code": result.exit_code, "output": result.output, "exception": repr(result.exception),
                                         "all_reduces": recorder.per_step, "broadcast_buffers": recorder.broadcast_buffers})
    recorder.per_step, recorder.broadcast_buffers = {}, []
    judge_loads: list[int] = []
    # the judge's own loading is not under test here (only which ranks load it): it is recorded, not loaded
    judge_module.RLJudge.load = classmethod(lambda cls, *args, **kwargs: judge_loads.append(RANK))
    query_encoder, reward_encoder = make_test_encoders()
    config = rl_config(data, f"{run}/sup", 2, checkpoint_every=2, val_every=2, val_mixtures=1, log_every=2, judge="a-judge")
    trained = train_rl(config, f"{run}/rl", encoder=query_encoder, reward_encoder=reward_encoder, device="cpu", progress=False)
    save_weights(out / f"rl-rank{RANK}.safetensors", trained.model)
    write(out / f"rl-rank{RANK}.json", {"all_reduces": recorder.per_step, "broadcast_buffers": recorder.broadcast_buffers,
                                        "judge_loads": judge_loads})


def main() -> None:
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "views":
        views(args[0], int(args[1]), Path(args[2]), args[3:])
    elif mode == "cli-rl":
        cli_rl(args[0], args[1], Path(args[2]))
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
