"""Mixtures: fixed, seeded evaluation mixtures on disk, and dynamic mixing for training.

Two recipes (``mix.mode``):

- ``omnisep`` (OmniSep/CLIPSep): every source is multiplied by ``signal.mix_source_gain``
  (0.5, i.e. "each source /2") and the results are summed.
- ``snr``: the first source gets ``mix_source_gain``; every other source is scaled so that
  the first source's energy over its energy is an SNR drawn uniformly from
  ``mix.snr_db_range``. If the sum would clip, everything is scaled down together.

Sources are saved *as they sit in the mix* (after gains), so ``mixture = sum(sources)``.
A mixture draws ``num_sources`` distinct labels, one kept clip of each, and a random
window of ``signal.segment_samples`` samples from each clip (zero-padded if shorter).
Fixed mixture ``i`` of split ``s`` is drawn from a generator seeded by ``(mix.seed, s, i)``,
so a rerun, or a run resumed after a kill, writes the same mixtures.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import Dataset

from marsctl.audio import load_audio, save_audio
from marsctl.config import SignalConfig
from marsctl.data.manifest import SPLITS, load_clips, write_mixtures
from marsctl.data.paths import inside, label_dirname
from marsctl.data.progress import stage_progress
from marsctl.data.recipe import DataRecipe, MixConfig
from marsctl.data.records import fingerprint
from marsctl.errors import MarsctlError
from marsctl.files import write_json_atomic

#: one small record per written mixture: what it was drawn from (stale mixtures are redone)
STATE_MIX = "state/mix"


@dataclass(frozen=True)
class ClipRef:
    clip_id: str
    label: str
    audio_path: str
    frame_paths: tuple[str, ...]


def _pool_by_label(clips) -> dict[str, list[ClipRef]]:
    pool: dict[str, list[ClipRef]] = {}
    for row in clips:
        pool.setdefault(row["label"], []).append(
            ClipRef(row["clip_id"], row["label"], row["audio_path"], tuple(row["frame_paths"] or ()))
        )
    return {label: sorted(refs, key=lambda r: r.clip_id) for label, refs in sorted(pool.items())}


def read_window(path: Path, offset: int, length: int, sample_rate: int) -> np.ndarray:
    """``length`` samples of a clip from ``offset`` (zero-padded past its end), mono float32."""
    try:
        info = sf.info(str(path))
        native = info.samplerate == sample_rate
    except Exception:
        native = False
    if native:
        data, _ = sf.read(str(path), start=offset, stop=offset + length, dtype="float32", always_2d=True)
        wave = data.mean(axis=1)
    else:
        wave = load_audio(path, sample_rate)[offset : offset + length]
    if len(wave) < length:
        wave = np.pad(wave, (0, length - len(wave)))
    return wave.astype(np.float32)


def _clip_frames(path: Path) -> int:
    try:
        return int(sf.info(str(path)).frames)
    except Exception:
        return 0


def draw_mixture(
    rng: np.random.Generator,
    pool: dict[str, list[ClipRef]],
    dataset_dir: Path,
    signal: SignalConfig,
    mix: MixConfig,
    num_sources: int,
    lengths: dict[str, int] | None = None,
) -> dict[str, Any]:
    """One random mixture: distinct labels, one clip each, a window each, gains by ``mix.mode``."""
    labels = list(pool)
    if len(labels) < num_sources:
        raise MarsctlError(f"{dataset_dir}: need clips of at least {num_sources} labels to mix, found {len(labels)}")
    chosen = [labels[i] for i in rng.choice(len(labels), size=num_sources, replace=False)]
    refs = [pool[label][int(rng.integers(len(pool[label])))] for label in chosen]
    T = signal.segment_samples
    offsets, waves = [], []
    for ref in refs:
        path = inside(dataset_dir, ref.audio_path)
        n = lengths.get(ref.clip_id) if lengths is not None and ref.clip_id in lengths else _clip_frames(path)
        if lengths is not None:
            lengths[ref.clip_id] = n
        offset = int(rng.integers(0, max(0, n - T) + 1))
        offsets.append(offset)
        waves.append(read_window(path, offset, T, signal.sample_rate))
    gains = [signal.mix_source_gain] * num_sources
    snr_db = None
    if mix.mode == "snr" and num_sources > 1:
        snr_db = float(rng.uniform(*mix.snr_db_range))
        target_energy = float(np.sum((waves[0] * gains[0]) ** 2)) + 1e-12
        for k in range(1, num_sources):
            energy = float(np.sum(waves[k] ** 2)) + 1e-12
            gains[k] = float(np.sqrt(target_energy / (energy * 10 ** (snr_db / 10))))
    sources = np.stack([w * g for w, g in zip(waves, gains)])
    mixture = sources.sum(axis=0)
    peak = float(np.abs(mixture).max(initial=0.0))
    if peak > 0.99:
        scale = 0.99 / peak
        sources *= scale
        mixture *= scale
        gains = [g * scale for g in gains]
    return {"refs": refs, "offsets": offsets, "gains": [float(g) for g in gains], "snr_db": snr_db,
            "sources": sources.astype(np.float32), "mixture": mixture.astype(np.float32)}


def make_mixtures(recipe: DataRecipe, dataset_dir: str | Path, *, progress: bool = True) -> list[dict[str, Any]]:
    """Write the fixed mixtures of every split in ``mix.mixtures_per_split`` and ``mixtures.parquet``.

    A mixture whose files all exist is not written again (resume after a kill).
    """
    dataset_dir = Path(dataset_dir)
    mix = recipe.mix
    signal = recipe.signal
    clips = load_clips(dataset_dir, kept_only=True)
    rows: list[dict[str, Any]] = []
    plan = [(split, int(n)) for split, n in mix.mixtures_per_split.items() if int(n) > 0]
    unknown = [s for s, _ in plan if s not in SPLITS]
    if unknown:
        raise MarsctlError(f"mix.mixtures_per_split: unknown split(s) {unknown}; use {', '.join(SPLITS)}")
    total = sum(n for _, n in plan)
    lengths: dict[str, int] = {}
    with stage_progress("mix", total=total, show=progress) as advance:
        for split, count in plan:
            pool = _pool_by_label(row for row in clips if row["split"] == split)
            if len(pool) < mix.num_sources:
                advance(count)
                continue  # reported in the summary: no mixtures for this split
            split_index = SPLITS.index(split)
            for i in range(count):
                mixture_id = f"{split}-{i:05d}"
                rng = np.random.default_rng([mix.seed, split_index, i])
                drawn = draw_mixture(rng, pool, dataset_dir, signal, mix, mix.num_sources, lengths)
                folder = f"mixtures/{split}/{mixture_id}"
                source_paths = [f"{folder}/{label_dirname(ref.label)}.wav" for ref in drawn["refs"]]
                mixture_path = f"{folder}/mixture.wav"
                row = {
                    "mixture_id": mixture_id,
                    "split": split,
                    "mixture_path": mixture_path,
                    "source_clip_ids": [r.clip_id for r in drawn["refs"]],
                    "source_labels": [r.label for r in drawn["refs"]],
                    "source_paths": source_paths,
                    "source_frame_paths": [list(r.frame_paths) for r in drawn["refs"]],
                    "source_offsets": drawn["offsets"],
                    "gains": drawn["gains"],
                    "snr_db": drawn["snr_db"],
                    "seed": mix.seed,
                }
                stamps = [_stamp(inside(dataset_dir, ref.audio_path)) for ref in drawn["refs"]]
                digest = fingerprint(row, stamps, signal.sample_rate, signal.segment_samples)
                state = dataset_dir / STATE_MIX / f"{mixture_id}.json"
                files = [dataset_dir / p for p in [*source_paths, mixture_path]]
                if _read_digest(state) != digest or not all(f.is_file() for f in files):
                    for stale in (dataset_dir / folder).glob("*.wav"):
                        if stale not in files:
                            stale.unlink()  # a source of another label from an older recipe
                    for path, wave in zip(source_paths, drawn["sources"]):
                        save_audio(dataset_dir / path, wave, signal.sample_rate)
                    save_audio(dataset_dir / mixture_path, drawn["mixture"], signal.sample_rate)
                    write_json_atomic(state, {"mixture_id": mixture_id, "fingerprint": digest})
                rows.append(row)
                advance()
    write_mixtures(dataset_dir, rows)
    _prune_mixture_dirs(dataset_dir, {r["mixture_id"] for r in rows})
    return rows


def _stamp(path: Path) -> list[int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def _read_digest(path: Path) -> str | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def _prune_mixture_dirs(dataset_dir: Path, keep: set[str]) -> None:
    """Remove mixture folders an older recipe left that the manifest no longer lists."""
    root = dataset_dir / "mixtures"
    for split in SPLITS:
        for folder in (root / split).glob(f"{split}-*") if (root / split).is_dir() else []:
            if folder.is_dir() and not folder.is_symlink() and re.fullmatch(rf"{split}-\d+", folder.name) and folder.name not in keep:
                shutil.rmtree(folder)
                (dataset_dir / STATE_MIX / f"{folder.name}.json").unlink(missing_ok=True)


class DynamicMixDataset(Dataset):
    """Training mixtures drawn on the fly from the kept clips of one split.

    Item ``i`` of epoch ``e`` is drawn from a generator seeded by ``(seed, e, i)``: the same
    index gives the same mixture within an epoch, and ``set_epoch`` gives new ones. Items are::

        {"mixture": FloatTensor[T], "sources": FloatTensor[S, T] (as they sit in the mix),
         "labels": list[str], "clip_ids": list[str],
         "frame_paths": list[list[str]]  (absolute paths, [] where a clip has no frames)}

    with ``T = signal_config.segment_samples``; labels are distinct within a mixture. The
    gains follow ``mode`` as for the fixed mixtures (OmniSep ``/2`` by default). ``length``
    is the number of items per epoch (default: the number of kept clips in the split).
    """

    def __init__(
        self,
        dataset_dir: str | Path,
        split: str,
        signal_config: SignalConfig | None = None,
        num_sources: int = 2,
        seed: int = 0,
        *,
        mode: str = "omnisep",
        snr_db_range: tuple[float, float] = (-5.0, 5.0),
        length: int | None = None,
    ) -> None:
        self.dataset_dir = Path(dataset_dir)
        self.split = split
        self.signal = signal_config or SignalConfig()
        self.num_sources = num_sources
        self.seed = seed
        self.epoch = 0
        self.mix = MixConfig(num_sources=num_sources, mode=mode, snr_db_range=list(snr_db_range))
        clips = load_clips(self.dataset_dir, kept_only=True, split=split)
        self.pool = _pool_by_label(clips)
        if len(self.pool) < num_sources:
            raise MarsctlError(
                f"{self.dataset_dir}: split {split!r} has kept clips of {len(self.pool)} label(s); "
                f"{num_sources}-source mixtures need at least {num_sources}"
            )
        self.length = int(length) if length is not None else len(clips)
        self._lengths: dict[str, int] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def labels(self) -> list[str]:
        return list(self.pool)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        drawn = draw_mixture(rng, self.pool, self.dataset_dir, self.signal, self.mix, self.num_sources, self._lengths)
        root = self.dataset_dir.resolve()
        return {
            "mixture": torch.from_numpy(drawn["mixture"]),
            "sources": torch.from_numpy(drawn["sources"]),
            "labels": [r.label for r in drawn["refs"]],
            "clip_ids": [r.clip_id for r in drawn["refs"]],
            "frame_paths": [[str(root / p) for p in r.frame_paths] for r in drawn["refs"]],
        }


def collate_mixtures(items: list[dict[str, Any]]) -> dict[str, Any]:
    """DataLoader ``collate_fn``: stacks tensors, keeps the metadata as lists of lists."""
    return {
        "mixture": torch.stack([it["mixture"] for it in items]),
        "sources": torch.stack([it["sources"] for it in items]),
        "labels": [it["labels"] for it in items],
        "clip_ids": [it["clip_ids"] for it in items],
        "frame_paths": [it["frame_paths"] for it in items],
    }
