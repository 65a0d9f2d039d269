"""Training checkpoints that resume exactly, written so that a kill never leaves a half one.

A checkpoint is a directory ``<run>/checkpoints/step-00001000/`` holding

* ``config.json`` + ``model.safetensors``: a complete separator artifact (loadable by
  :func:`marsctl.models.separator.load_separator`, so any checkpoint can be evaluated);
* ``training_state.pt``: optimizer, LR scheduler, step, best validation score and the
  torch RNG states, saved with ``torch.save`` of tensors/plain containers only and loaded
  with ``weights_only=True`` (no pickle of arbitrary objects).

The directory is assembled under a temporary name and renamed into place, so it exists
complete or not at all; :func:`latest_checkpoint` picks the highest step with a training state, and
:func:`read_checkpoint` checks that its files can be read (a file cut short by a full disk or a
copy).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from marsctl.errors import MarsctlError

STATE_FILE = "training_state.pt"
MODEL_FILE = "model.safetensors"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """The global RNG states to checkpoint: the CPU generator's, and ``device``'s own when it is a
    GPU (one rank's GPU, not every visible one: a resume may see fewer GPUs)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore :func:`rng_state`'s states: the CPU generator's, and the GPU state into ``device`` only
    (a checkpoint written before per-device states held a list of every GPU's: the entry of
    ``device``'s index is used when it exists)."""
    torch.set_rng_state(state["torch"].cpu())
    saved = state.get("cuda")
    if saved is None or device is None or device.type != "cuda":
        return
    if isinstance(saved, (list, tuple)):
        index = device.index or 0
        if index >= len(saved):
            return
        saved = saved[index]
    torch.cuda.set_rng_state(saved.cpu(), device)


def save_checkpoint(run_dir: Path, step: int, write_model, training_state: dict[str, Any], keep: int = 3) -> Path:
    """Write checkpoint ``step`` atomically. ``write_model(directory)`` writes the model artifact files."""
    final = checkpoint_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        write_model(tmp)
        torch.save(training_state, tmp / STATE_FILE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(final.parent, keep)
    return final


def _prune(parent: Path, keep: int) -> None:
    steps = sorted(list_checkpoints(parent.parent))
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(checkpoint_dir(parent.parent, old), ignore_errors=True)
    # leftovers of a run killed while writing
    for leftover in parent.glob(".step-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def list_checkpoints(run_dir: Path) -> list[int]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    steps = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / STATE_FILE).is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def latest_checkpoint(run_dir: Path) -> Path | None:
    steps = list_checkpoints(run_dir)
    return checkpoint_dir(run_dir, steps[-1]) if steps else None


def model_file_problem(directory: Path) -> str | None:
    """Why ``directory``'s ``model.safetensors`` cannot be loaded (missing, truncated, damaged), or None.
    The header and every tensor are read, so a file cut short anywhere is found."""
    path = Path(directory) / MODEL_FILE
    if not path.is_file():
        return f"no {MODEL_FILE}"
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as model_file:
            for key in model_file.keys():
                model_file.get_tensor(key)
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        return f"{MODEL_FILE} is damaged or truncated ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    return None


def read_checkpoint(directory: Path) -> dict[str, Any]:
    """The training state of a complete checkpoint, on the CPU; a missing or damaged model file or
    training state is one :class:`MarsctlError` naming it."""
    problem = model_file_problem(directory)
    if problem is not None:
        raise MarsctlError(f"{directory}: {problem}")
    return load_training_state(directory)


def load_training_state(directory: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(directory) / STATE_FILE
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged file
        raise MarsctlError(f"{path}: cannot read the training state ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from exc
