"""curves.png beside TensorBoard (issue 28, item 3): a real short supervised run writes its validation
curves; the plot reads every val_* metric of the history."""

from __future__ import annotations

import pytest
from PIL import Image

from marsctl.train.curves import validation_series, write_curves
from marsctl.train.supervised import train_supervised
from test_separator_fixtures import LabelTestEncoder, make_tone_dataset
from test_train_sup_worker import small_config


def test_validation_series_keeps_finite_val_metrics_only():
    history = [{"step": 0, "val_si_sdri": 0.1}, {"step": 5, "loss": 0.3}, {"step": 10, "val_si_sdri": 1.2, "val_reward": float("nan"),
               "val_reward_hacking": 1}, {"step": 20, "val_si_sdri": 2.0, "val_reward": 0.5}]
    assert validation_series(history) == {"val_si_sdri": ([0, 10, 20], [0.1, 1.2, 2.0]), "val_reward": ([20], [0.5])}
    assert write_curves("unused", [{"step": 1, "loss": 1.0}]) is None


def test_a_supervised_run_writes_its_curves(tmp_path):
    data = make_tone_dataset(tmp_path / "data")
    config = small_config(str(data), max_steps=10, val_every=5, checkpoint_every=10)
    result = train_supervised(config, tmp_path / "run", encoder=LabelTestEncoder(), device="cpu", progress=False)
    assert sum("val_si_sdri" in h for h in result.history) >= 2
    with Image.open(tmp_path / "run" / "curves.png") as image:
        assert image.format == "PNG" and image.size[0] >= 300 and image.size[1] >= 200
