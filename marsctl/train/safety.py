"""What keeps a training run from destroying files or shipping broken weights.

* :func:`check_run_folder`: ``--out`` must be absent, empty, or a marsctl run (a folder with a
  marker only marsctl writes there); a user's folder is refused before anything is written, so
  its ``README.md``, ``config.json`` or ``metrics.jsonl`` are never replaced.
* :func:`clear_checkpoints`: ``--no-resume`` deletes the ``step-*`` checkpoints marsctl wrote (and
  its half-written ``.step-*`` folders), nothing else under ``checkpoints/``.
* :class:`NonFiniteLoss` / :func:`check_finite_step`: a trainer raises it at the first step whose
  loss or gradient norm is NaN or infinite, before the optimizer applies it; the loop stops with
  one line naming the step and the last good checkpoint. :func:`check_finite_weights` refuses to
  save a model with a non-finite parameter.
"""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import torch

from marsctl.errors import MarsctlError

#: files only marsctl writes into a run folder; one of them makes a non-empty folder a run
RUN_MARKERS = ("train.lock", "train_config.json", "artifact.json")
_STEP_DIR = re.compile(r"^step-\d{8}$")
_STEP_TEMP = re.compile(r"^\.step-\d{8}\.[A-Za-z0-9_]{8}$")  # save_checkpoint's mkdtemp staging folders
_STATE_FILE = "training_state.pt"


def check_run_folder(run_dir: str | Path) -> None:
    """Refuse ``run_dir`` when it is a file, or a non-empty folder that is not a marsctl run."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise MarsctlError(f"--out {run_dir}: exists and is not a folder")
    if not run_dir.is_dir():
        return
    try:
        entries = sorted(p.name for p in run_dir.iterdir())
    except OSError as exc:
        raise MarsctlError(f"--out {run_dir}: cannot list the folder ({exc.strerror or exc})") from None
    if entries and not any((run_dir / marker).is_file() for marker in RUN_MARKERS):
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise MarsctlError(
            f"--out {run_dir}: the folder holds files that are not a marsctl run ({shown}); "
            "give an empty or new folder, or the folder of an earlier run to resume it"
        )


def clear_checkpoints(run_dir: str | Path) -> int:
    """Delete the checkpoints marsctl wrote under ``run_dir/checkpoints`` (``step-NNNNNNNN`` folders with a
    training state, and half-written ``.step-*`` folders); other files there are kept. Returns how many."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir() or root.is_symlink():
        return 0
    removed = 0
    for path in sorted(root.iterdir()):
        if path.is_symlink() or not path.is_dir():
            continue
        if (_STEP_DIR.match(path.name) and (path / _STATE_FILE).is_file()) or _STEP_TEMP.match(path.name):
            shutil.rmtree(path)
            removed += 1
    return removed


class NonFiniteLoss(MarsctlError):
    """A step's loss (or gradient norm) is NaN or infinite; raised before the optimizer applies it."""

    def __init__(self, step: int, what: str, value: float):
        self.step, self.what, self.value = step, what, value
        super().__init__(f"step {step}: the {what} is {value} (not finite)")


def check_finite_step(step: int, values: dict[str, float], all_reduce_mean=None) -> None:
    """Raise :class:`NonFiniteLoss` when one of ``values`` (name -> float: the loss, the gradient norm)
    is not finite; under DDP ``all_reduce_mean`` makes every rank stop at the same step."""
    bad = next(((name, value) for name, value in values.items() if not math.isfinite(value)), None)
    if all_reduce_mean is not None and all_reduce_mean(1.0 if bad else 0.0) > 0 and bad is None:
        bad = ("loss on another process", math.nan)
    if bad is not None:
        raise NonFiniteLoss(step, *bad)


def check_finite_weights(model: torch.nn.Module, where: str) -> None:
    """Refuse to save ``model`` when a parameter or buffer holds NaN or Inf."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise MarsctlError(f"{where}: not saved: the weights are not finite ({name}); the run diverged")


def stop_message(run_dir: Path, error: NonFiniteLoss, last_good: Path | None) -> str:
    """The one line a run ends with at a non-finite loss."""
    kept = f"the last good checkpoint is {last_good}" if last_good is not None else "no checkpoint was written before it"
    return f"{run_dir}: stopped at {error}; nothing of this step was saved; {kept}"
