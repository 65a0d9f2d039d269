"""Subprocess entry point for the training tests (no tests here): trains on a test dataset
with the test encoder, optionally SIGKILLs itself after a given step, and under torchrun
saves each rank's final weights so the test can compare ranks.

    python tests/test_train_sup_worker.py DATA RUN MAX_STEPS [KILL_AFTER_STEP]
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from marsctl.config import SignalConfig  # noqa: E402
from marsctl.train.supervised import ArchitectureConfig, SupervisedConfig, train_supervised  # noqa: E402
from test_separator_fixtures import LabelTestEncoder  # noqa: E402


def small_config(data: str, max_steps: int, **kw) -> SupervisedConfig:
    base = dict(
        data=data, encoder="test", signal=SignalConfig(segment_samples=8191),
        architecture=ArchitectureConfig(num_levels=5, base_channels=8, max_channel_multiplier=4),
        batch_size=4, max_steps=max_steps, learning_rate=3e-3, warmup_steps=5, val_every=10,
        checkpoint_every=10, log_every=5, num_workers=0, query_modalities=("text", "audio"),
    )
    base.update(kw)
    return SupervisedConfig(**base)


def main() -> None:
    data, run, max_steps = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    kill_after = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    checkpoint_every = int(os.environ.get("TEST_CHECKPOINT_EVERY", "10"))
    num_workers = int(os.environ.get("TEST_NUM_WORKERS", "0"))

    def on_step_end(step: int) -> None:
        if kill_after and step == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # a real kill: no cleanup, no finally blocks

    config = small_config(data, max_steps, checkpoint_every=checkpoint_every, val_every=checkpoint_every, num_workers=num_workers)
    result = train_supervised(config, run, encoder=LabelTestEncoder(), device="cpu", progress=False, on_step_end=on_step_end)
    if "RANK" in os.environ:
        from safetensors.torch import save_file

        state = {k: v.contiguous() for k, v in result.model.state_dict().items()}
        save_file(state, str(run / f"rank{os.environ['RANK']}.safetensors"))


if __name__ == "__main__":
    main()
