"""The RL step's shortcuts leave its result unchanged.

* rl_update analyses the mixtures once and runs the bare policy and the reference from that
  analysis; a wrapped model (as under DDP) goes through ``forward()``, which analyses them again.
  Both must give the same update, bit for bit.
* ``diagnostics=False`` (the trainer's unlogged steps) skips the statistics (the loss diagnostics
  and the score-function estimator's forward pass after the update, ``after_update``) and
  nothing else: the same parameters.
"""

from __future__ import annotations

import copy

import pytest
import torch

from marsctl.config import SignalConfig
from marsctl.models.separator import Separator, SeparatorConfig
from marsctl.rl.config import RLConfig
from marsctl.rl.rewards import RewardConfig, reward_functions
from marsctl.rl.rollout import RewardModel
from marsctl.rl.update import rl_update

from test_separator_fixtures import LabelTestEncoder

SIGNAL = SignalConfig(segment_samples=8191)
CPU = torch.device("cpu")


class _Wrapper(torch.nn.Module):
    """Stands in for a DDP wrapper: another module whose forward() calls the separator's."""

    def __init__(self, module: Separator):
        super().__init__()
        self.module = module

    def forward(self, mixture, query):
        return self.module(mixture, query)


def _setup():
    torch.manual_seed(0)
    config = SeparatorConfig(query_dim=16, num_levels=4, base_channels=4, max_channel_multiplier=2, mask_channels=4, signal=SIGNAL)
    start = Separator(config).eval()
    for module in start.modules():  # BatchNorm statistics that are not the identity
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    generator = torch.Generator().manual_seed(1)
    sources = 0.1 * torch.randn(3, 2, SIGNAL.segment_samples, generator=generator)
    query = torch.nn.functional.normalize(torch.randn(3, 16, generator=generator), dim=-1)
    return start, sources, query


def _run(config: RLConfig, wrap: bool, diagnostics: bool = True, steps: int = 3):
    start, sources, query = _setup()
    model = copy.deepcopy(start)
    reference = copy.deepcopy(start).requires_grad_(False)
    # the default rewards: the semantic anchor (through the encoder), SI-SDR and the energy guard
    reward_model = RewardModel(LabelTestEncoder(16), reward_functions(config.rewards), SIGNAL, same_space_as_queries=True,
                               config=config.rewards)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_model = _Wrapper(model) if wrap else model
    updates = [
        rl_update(model, train_model, reference, reward_model, optimizer, config, sources.sum(1), query, sources[:, 0],
                  ["dog"] * 3, sample_seed=10 + step, device=CPU, diagnostics=diagnostics)
        for step in range(steps)
    ]
    return model, updates


@pytest.mark.parametrize("estimator", ["pathwise", "score_function"])
def test_bare_and_wrapped_models_take_the_same_step(estimator):
    config = RLConfig(init_model="x", data="x", batch_size=3, group_size=2, ppo_epochs=2, estimator=estimator, kl_coef=0.5,
                      rewards=RewardConfig())
    bare, bare_updates = _run(config, wrap=False)
    wrapped, wrapped_updates = _run(config, wrap=True)
    start, _, _ = _setup()
    assert any(not torch.equal(p, q) for p, q in zip(bare.state_dict().values(), start.state_dict().values()))  # it trained
    for name, value in bare.state_dict().items():
        assert torch.equal(value, wrapped.state_dict()[name]), name
    for a, b in zip(bare_updates, wrapped_updates):
        assert a.epoch_stats == b.epoch_stats and a.after_update == b.after_update
        assert a.epoch_stats[0]["kl_ref"] >= 0 and torch.equal(a.samples.rewards, b.samples.rewards)


def test_unlogged_steps_skip_only_the_diagnostics():
    config = RLConfig(init_model="x", data="x", batch_size=3, group_size=4, ppo_epochs=2, estimator="score_function")
    logged, logged_updates = _run(config, wrap=False, diagnostics=True)
    quiet, quiet_updates = _run(config, wrap=False, diagnostics=False)
    assert all(u.after_update for u in logged_updates) and not any(u.after_update for u in quiet_updates)
    assert {"clip_fraction", "kl_old_new"} <= set(logged_updates[0].after_update)
    for name, value in logged.state_dict().items():
        assert torch.equal(value, quiet.state_dict()[name]), name
    assert all(len(u.epoch_stats) == 2 and all(u.epoch_stats) for u in logged_updates)
    assert [[set(stats) for stats in u.epoch_stats] for u in quiet_updates] == [[{"grad_norm"}] * 2] * 3  # no statistics
    assert [[stats["grad_norm"] for stats in u.epoch_stats] for u in quiet_updates] == \
        [[stats["grad_norm"] for stats in u.epoch_stats] for u in logged_updates]
