"""Helpers and subprocess entry point for the RL training tests (no tests here).

``pretrain`` trains a small separator with supervision on a test dataset (the RL starting
point); ``rl_config`` is a small RL configuration; ``make_test_encoders`` gives the query encoder
(LabelTestEncoder) and a reward encoder whose anchor module makes z* the target's audio
embedding (an untrained AnchorFusion over audio only is exactly normalize(phi_a(target))).

    python tests/test_rl_worker.py DATA INIT_MODEL RUN MAX_STEPS [KILL_AFTER_STEP]

runs ``train_rl`` (optionally SIGKILLing itself after a step); under torchrun each rank
saves its final weights as ``RUN/rank<r>.safetensors``.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from marsctl.models.encoders import AnchorFusion  # noqa: E402
from marsctl.rl.trainer import RLConfig, train_rl  # noqa: E402
from marsctl.train.supervised import train_supervised  # noqa: E402
from test_separator_fixtures import LabelTestEncoder  # noqa: E402
from test_train_sup_worker import small_config  # noqa: E402


def make_test_encoders():
    query_encoder = LabelTestEncoder()
    reward_encoder = LabelTestEncoder()
    reward_encoder.anchor_fusion = AnchorFusion(reward_encoder.embedding_dim, rank=4, modalities=("audio",))
    return query_encoder, reward_encoder


def pretrain(data: str | Path, out: Path, steps: int = 40) -> Path:
    config = small_config(str(data), max_steps=steps, query_modalities=("text",), val_every=steps, checkpoint_every=steps)
    train_supervised(config, out, encoder=LabelTestEncoder(), device="cpu", progress=False)
    return out


def rl_config(data: str | Path, init_model: str | Path, max_steps: int, **kw) -> RLConfig:
    base = dict(
        data=str(data), init_model=str(init_model), encoder="test", reward_encoder="test-reward", batch_size=4, group_size=4,
        max_steps=max_steps, learning_rate=1e-3, warmup_steps=2, val_every=10, checkpoint_every=5, log_every=1,
        num_workers=0, val_mixtures=3, estimator="score_function",
    )
    base.update(kw)
    return RLConfig(**base)


def main() -> None:
    data, init_model, run, max_steps = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
    kill_after = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    checkpoint_every = int(os.environ.get("TEST_CHECKPOINT_EVERY", "5"))
    ppo_epochs = int(os.environ.get("TEST_PPO_EPOCHS", "1"))
    baseline = os.environ.get("TEST_BASELINE", "group")
    estimator = os.environ.get("TEST_ESTIMATOR", "score_function")
    num_workers = int(os.environ.get("TEST_NUM_WORKERS", "0"))

    def on_step_end(step: int) -> None:
        if kill_after and step == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # a real kill: no cleanup

    query_encoder, reward_encoder = make_test_encoders()
    config = rl_config(data, init_model, max_steps, checkpoint_every=checkpoint_every, ppo_epochs=ppo_epochs, baseline=baseline,
                       estimator=estimator, num_workers=num_workers)
    result = train_rl(config, run, encoder=query_encoder, reward_encoder=reward_encoder, device="cpu", progress=False, on_step_end=on_step_end)
    if "RANK" in os.environ:
        from safetensors.torch import save_file

        state = {k: v.contiguous() for k, v in result.model.state_dict().items()}
        save_file(state, str(run / f"rank{os.environ['RANK']}.safetensors"))


if __name__ == "__main__":
    main()
