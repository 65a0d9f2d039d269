"""Training and validation data for the trainers, on top of the dataset directory contract.

Training batches come from the data layer's dynamic mixing Dataset
(``marsctl.data.mixing.DynamicMixDataset``): items ``{"mixture": [T], "sources": [S, T]
(as in the mix), "labels", "clip_ids", "frame_paths"}``. The order in which items are
drawn is a pure function of ``(seed, step, rank)`` (:class:`StepBatchSampler`), so a
resumed run sees exactly the batches the uninterrupted run would have seen. The recipe's
``augment`` section (:mod:`marsctl.data.augment`) changes the training mixtures only; every
augmentation draws from the item's own seeded generator, so augmented items are as reproducible.

Validation uses the dataset's fixed mixtures of the validation split
(``manifests/mixtures.parquet``); a dataset without fixed validation mixtures is
validated on a fixed, seeded set of dynamic mixtures of its ``val`` clips instead.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from marsctl.audio import load_audio
from marsctl.config import SignalConfig
from marsctl.data.augment import AugmentConfig
from marsctl.errors import MarsctlError

#: seed offset of the fixed validation mixtures drawn from val clips (never the training seed)
VALIDATION_SEED = 1_000_003


def mixing_dataset(dataset_dir: str | Path, split: str, signal: SignalConfig, num_sources: int, seed: int,
                   augment: AugmentConfig | None = None) -> Dataset:
    """The data layer's dynamic-mixing Dataset of ``split`` (:class:`marsctl.data.mixing.DynamicMixDataset`),
    with the recipe's ``augment`` section for the training split (never for validation mixtures)."""
    from marsctl.data.mixing import DynamicMixDataset

    return DynamicMixDataset(dataset_dir, split, signal, num_sources=num_sources, seed=seed, augment=augment)


class EpochIndexedDataset(Dataset):
    """Reads *virtual* indices ``epoch * len(base) + i`` as item ``i`` of ``epoch``.

    Dynamic mixing draws new mixtures each epoch (``set_epoch``); passing the epoch inside
    the index keeps that working in DataLoader worker processes, whose dataset copies
    never see a ``set_epoch`` called in the main process, and makes every item a pure
    function of its index (exact resume).
    """

    def __init__(self, base: Dataset):
        self.base = base
        self.size = len(base)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, virtual_index: int) -> dict[str, Any]:
        epoch, index = divmod(int(virtual_index), self.size)
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)
        return self.base[index]


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {
        "mixture": torch.stack([torch.as_tensor(i["mixture"]) for i in items]),
        "sources": torch.stack([torch.as_tensor(i["sources"]) for i in items]),
        "labels": [list(i["labels"]) for i in items],
        "clip_ids": [list(i.get("clip_ids", [])) for i in items],
        "frame_paths": [[list(p) for p in i.get("frame_paths", [])] for i in items],
    }


class StepBatchSampler(Sampler[list[int]]):
    """Batches for steps ``start_step + 1 .. max_steps`` of one rank, a pure function of the step.

    The global order is a concatenation of seeded permutations of the dataset (one per
    epoch); step ``s`` takes the next ``batch_size * world_size`` positions and rank ``r``
    every ``world_size``-th of them. Resuming at step ``s`` needs nothing but ``s``.
    """

    def __init__(self, dataset_size: int, batch_size: int, seed: int, start_step: int, max_steps: int, rank: int = 0, world_size: int = 1):
        if dataset_size <= 0:
            raise MarsctlError("the training split has no items")
        self.n, self.batch_size, self.seed = dataset_size, batch_size, seed
        self.start_step, self.max_steps, self.rank, self.world_size = start_step, max_steps, rank, world_size
        self._perm_cache: dict[int, torch.Tensor] = {}

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_033 + epoch))}
        return self._perm_cache[epoch]

    def step_indices(self, step: int) -> list[int]:
        global_batch = self.batch_size * self.world_size
        first = (step - 1) * global_batch
        positions = range(first + self.rank, first + global_batch, self.world_size)
        # virtual indices epoch * n + i (see EpochIndexedDataset)
        return [(p // self.n) * self.n + int(self._permutation(p // self.n)[p % self.n]) for p in positions]

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step + 1, self.max_steps + 1):
            yield self.step_indices(step)

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start_step)


@dataclasses.dataclass
class FixedMixture:
    mixture_id: str
    mixture: np.ndarray  # [T]
    sources: np.ndarray  # [S, T], as in the mix
    labels: list[str]
    frame_paths: list[list[str]]


def fixed_mixtures(dataset_dir: str | Path, split: str, signal: SignalConfig, limit: int, num_sources: int = 2) -> list[FixedMixture]:
    """Up to ``limit`` fixed mixtures of ``split`` (see the module docstring for the fallback)."""
    from marsctl.data.manifest import MIXTURES_MANIFEST, load_mixtures

    root = Path(dataset_dir)
    out: list[FixedMixture] = []
    if (root / MIXTURES_MANIFEST).is_file():
        table = load_mixtures(root, split=split)
        for i in range(min(limit, len(table))):
            row = table[i]
            mixture = load_audio(root / row["mixture_path"], signal.sample_rate)
            sources = np.stack([load_audio(root / p, signal.sample_rate) for p in row["source_paths"]])
            length = min(len(mixture), sources.shape[1])
            out.append(
                FixedMixture(row["mixture_id"], mixture[:length], sources[:, :length], list(row["source_labels"]), [list(p) for p in row["source_frame_paths"]])
            )
    if out:
        return out
    try:
        dataset = mixing_dataset(root, split, signal, num_sources, seed=VALIDATION_SEED)
    except MarsctlError:
        return []
    for i in range(min(limit, len(dataset))):
        item = dataset[i]
        out.append(
            FixedMixture(f"{split}-{i:05d}", item["mixture"].numpy(), item["sources"].numpy(), list(item["labels"]), [list(p) for p in item["frame_paths"]])
        )
    return out
