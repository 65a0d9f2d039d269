"""The RL step before the 2026-12-01 sampler change, for ``bench/rl_step_cost.py --baseline-update`` (BENCHMARKS.md
12.4): the current ``marsctl/rl/update.py`` (unchanged by that change but for a docstring line), run with

* the policy's pathwise draws by ``torch.distributions.Beta.rsample`` (the old ``BetaMaskPolicy.rsample``), and
* the losses of 4a8a59a~1 (the entropy always in the autograd graph), read with ``git show`` from this repository.

A private copy of the update module is patched, so the current step timed beside it in the same process is untouched.
"""

import subprocess
import sys
import types
from pathlib import Path

import torch

import marsctl.rl.update
from marsctl.models.policy import MASK_EPS
from marsctl.models.policy import BetaMaskPolicy as CurrentPolicy

REPOSITORY = Path(__file__).resolve().parents[3]
LOSSES_BEFORE = "4a8a59a~1:marsctl/rl/losses.py"


class BetaMaskPolicy(CurrentPolicy):
    def rsample(self, num_samples: int) -> torch.Tensor:
        dist = torch.distributions.Beta(self.alpha, self.beta)
        return dist.rsample(torch.Size([num_samples])).clamp(MASK_EPS, 1.0 - MASK_EPS)


def _module(name: str, source: str, filename: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__file__ = filename
    sys.modules[name] = module  # dataclasses look their module up here
    exec(compile(source, filename, "exec"), module.__dict__)
    return module


_losses = _module("losses_before_sampler", subprocess.run(["git", "-C", str(REPOSITORY), "show", LOSSES_BEFORE], check=True,
                                                           capture_output=True, text=True).stdout, LOSSES_BEFORE)
_update_path = Path(marsctl.rl.update.__file__)
_update = _module("update_before_sampler", _update_path.read_text(encoding="utf-8"), str(_update_path))
_update.BetaMaskPolicy = BetaMaskPolicy
_update.pathwise_loss, _update.policy_loss, _update.ratio_diagnostics = _losses.pathwise_loss, _losses.policy_loss, _losses.ratio_diagnostics
rl_update = _update.rl_update
assert rl_update is not marsctl.rl.update.rl_update
