"""Alignment data: the clips manifest of a dataset directory, crops, batches with hard negatives.

Reads ``<dataset>/manifests/clips.parquet`` (the shared dataset contract; kept clips
only) through :func:`marsctl.data.manifest.load_clips`. Training clips are decoded per
step (with an LRU cache), held-out clips once. A clip that cannot be decoded is dropped
from training with a warning and listed in the stage report; training goes on.

Hard negatives: every class gets a 64-bin mean log-mel profile (from up to 8 of its
training clips); the ``k`` classes with the closest profiles (cosine) are its
acoustically close classes. A batch slot is, with probability ``hard_negative_share``,
filled with a clip of a class close to the previous slot's class, so that each batch
holds look-alike interference, as a mixture in MARS-Sep does.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torchaudio

from marsctl.audio import load_audio
from marsctl.errors import AudioError, MarsctlError


@dataclasses.dataclass(frozen=True)
class Clip:
    clip_id: str
    label: str
    split: str
    audio_path: Path
    frame_paths: tuple[Path, ...]


def read_clip_table(dataset_dir: Path) -> list[dict[str, Any]]:
    """Rows of the clips manifest (all of them, kept and dropped)."""
    from marsctl.data.manifest import load_clips

    manifest = dataset_dir / "manifests" / "clips.parquet"
    if not manifest.is_file():
        raise MarsctlError(f"{manifest}: missing; is {dataset_dir} a dataset built by 'marsctl data build'?")
    return list(load_clips(dataset_dir))


def read_clips(dataset_dir: str | Path) -> list[Clip]:
    """The kept clips of a dataset directory, with absolute paths."""
    dataset_dir = Path(dataset_dir)
    clips = []
    for row in read_clip_table(dataset_dir):
        if not row.get("keep", True):
            continue
        for key in ("clip_id", "label", "split", "audio_path"):
            if key not in row:
                raise MarsctlError(f"{dataset_dir}/manifests/clips.parquet: column {key!r} is missing")
        clips.append(
            Clip(
                clip_id=str(row["clip_id"]),
                label=str(row["label"]),
                split=str(row["split"]),
                audio_path=dataset_dir / row["audio_path"],
                frame_paths=tuple(dataset_dir / p for p in (row.get("frame_paths") or [])),
            )
        )
    if not clips:
        raise MarsctlError(f"{dataset_dir}: the clips manifest has no kept clips")
    return clips


def load_image(path: Path) -> torch.Tensor:
    """An RGB image file -> ``[3, 224, 224]`` float in [0, 1] (the trunks resize again to their size)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB").resize((224, 224), Image.BILINEAR)
            array = np.asarray(image, dtype=np.float32) / 255.0
    except FileNotFoundError as exc:
        raise MarsctlError(f"{path}: frame file is missing") from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise MarsctlError(f"{path}: not a readable image ({exc})") from exc
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def fit_length(wave: torch.Tensor, length: int, start: int = 0) -> torch.Tensor:
    """``length`` samples from ``start``; a short clip is tiled (repeat-padded) to length."""
    if wave.shape[-1] < length:
        wave = wave.repeat(math.ceil(length / wave.shape[-1]))
    return wave[start : start + length]


class AudioCache:
    """Decoded clips (16 kHz mono float32), least recently used evicted first."""

    def __init__(self, sample_rate: int, capacity: int):
        self.sample_rate, self.capacity = sample_rate, max(1, capacity)
        self._items: collections.OrderedDict[Path, torch.Tensor] = collections.OrderedDict()

    def get(self, path: Path) -> torch.Tensor:
        if path in self._items:
            self._items.move_to_end(path)
            return self._items[path]
        wave = torch.from_numpy(load_audio(path, self.sample_rate))
        self._items[path] = wave
        if len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return wave


def class_profiles(clips: list[Clip], cache: AudioCache, per_class: int = 8, seconds: float = 4.0) -> dict[str, torch.Tensor]:
    """Mean log-mel spectrum (64 bins) of each class, from up to ``per_class`` clips."""
    melspec = torchaudio.transforms.MelSpectrogram(cache.sample_rate, n_fft=1024, hop_length=512, n_mels=64)
    by_label: dict[str, list[Clip]] = collections.defaultdict(list)
    for clip in clips:
        by_label[clip.label].append(clip)
    profiles = {}
    for label, members in sorted(by_label.items()):
        spectra = []
        for clip in members[:per_class]:
            try:
                wave = cache.get(clip.audio_path)[: int(seconds * cache.sample_rate)]
            except AudioError:
                continue
            spectra.append(torch.log(melspec(wave) + 1e-6).mean(-1))
        if spectra:
            profiles[label] = torch.stack(spectra).mean(0)
    return profiles


def acoustic_neighbors(profiles: dict[str, torch.Tensor], k: int) -> dict[str, list[str]]:
    """For each class, the ``k`` other classes with the most similar (centered, cosine) profiles."""
    labels = sorted(profiles)
    if len(labels) < 2:
        return {label: [] for label in labels}
    matrix = torch.stack([profiles[label] for label in labels])
    matrix = torch.nn.functional.normalize(matrix - matrix.mean(0, keepdim=True), dim=-1)
    similarity = matrix @ matrix.T
    similarity.fill_diagonal_(-float("inf"))
    order = similarity.argsort(dim=1, descending=True)[:, : min(k, len(labels) - 1)]
    return {label: [labels[j] for j in order[i].tolist()] for i, label in enumerate(labels)}


class TrainingPool:
    """Training clips with seeded sampling: single clips, same-class pairs, crops with random gain."""

    def __init__(
        self,
        clips: list[Clip],
        cache: AudioCache,
        neighbors: dict[str, list[str]],
        warn: Callable[[str], None] = print,
    ):
        self.clips = clips
        self.cache = cache
        self.neighbors = neighbors
        self.warn = warn
        self.failed: dict[str, str] = {}
        self.by_label: dict[str, list[int]] = collections.defaultdict(list)
        for index, clip in enumerate(clips):
            self.by_label[clip.label].append(index)
        self.labels = sorted(self.by_label)
        if len(self.labels) < 2:
            raise MarsctlError("alignment needs training clips of at least two classes")

    def _rand(self, n: int, gen: torch.Generator) -> int:
        return int(torch.randint(n, (1,), generator=gen))

    def _next_label(self, previous: str | None, hard_share: float, gen: torch.Generator) -> str:
        close = [c for c in self.neighbors.get(previous or "", []) if self.by_label.get(c)]
        if previous is not None and close and float(torch.rand(1, generator=gen)) < hard_share:
            return close[self._rand(len(close), gen)]
        return self.labels[self._rand(len(self.labels), gen)]

    def sample_clips(self, n: int, hard_share: float, gen: torch.Generator) -> list[int]:
        out, label = [], None
        for _ in range(n):
            label = self._next_label(label, hard_share, gen)
            members = self.by_label[label]
            out.append(members[self._rand(len(members), gen)])
        return out

    def sample_pairs(self, n: int, hard_share: float, gen: torch.Generator) -> list[tuple[int, int]]:
        """``n`` (clip, other clip of the same class) pairs; a class with one clip pairs it with itself."""
        out, label = [], None
        for _ in range(n):
            label = self._next_label(label, hard_share, gen)
            members = self.by_label[label]
            first = self._rand(len(members), gen)
            second = (first + 1 + self._rand(len(members) - 1, gen)) % len(members) if len(members) > 1 else first
            out.append((members[first], members[second]))
        return out

    def crop(self, index: int, samples: int, gen: torch.Generator, gain_db: tuple[float, float] = (-12.0, 0.0)) -> torch.Tensor:
        """A random ``samples``-long crop of clip ``index`` at a random gain (uniform in dB)."""
        wave = self.cache.get(self.clips[index].audio_path)
        start = self._rand(max(1, wave.shape[-1] - samples + 1), gen)
        gain = gain_db[0] + (gain_db[1] - gain_db[0]) * float(torch.rand(1, generator=gen))
        return fit_length(wave, samples, start) * (10 ** (gain / 20))

    def crops(self, indices: list[int], samples: int, gen: torch.Generator) -> torch.Tensor:
        """Crops of the given clips; an unreadable clip is dropped from the pool (reported once) and
        replaced by another clip of its class (or of any class when none is left)."""
        out = []
        for index in indices:
            while True:
                try:
                    out.append(self.crop(index, samples, gen))
                    break
                except AudioError as exc:
                    index = self._drop(index, str(exc), gen)
        return torch.stack(out)

    def frames(self, indices: list[int], gen: torch.Generator) -> tuple[list[int], torch.Tensor]:
        """A random frame of each clip; a clip whose frame cannot be read is dropped and replaced
        (like an unreadable clip). Returns the clip indices actually used and ``[B, 3, 224, 224]``."""
        used, images = [], []
        for index in indices:
            while True:
                paths = self.clips[index].frame_paths
                try:
                    images.append(load_image(paths[self._rand(len(paths), gen)]))
                    used.append(index)
                    break
                except MarsctlError as exc:
                    index = self._drop(index, str(exc), gen)
        return used, torch.stack(images)

    def _drop(self, index: int, problem: str, gen: torch.Generator) -> int:
        clip = self.clips[index]
        if clip.clip_id not in self.failed:
            self.failed[clip.clip_id] = problem
            self.warn(f"skipping clip {clip.clip_id}: {problem}")
        members = self.by_label[clip.label]
        if index in members:
            members.remove(index)
        if not members:
            self.labels = [label for label in self.labels if self.by_label[label]]
            if len(self.labels) < 2:
                raise MarsctlError("too many unreadable training clips: fewer than two classes are left")
            members = self.by_label[self.labels[self._rand(len(self.labels), gen)]]
        return members[self._rand(len(members), gen)]


@dataclasses.dataclass
class HeldOut:
    """Decoded held-out clips of one split (first ``max_seconds``), with one frame each when available."""

    split: str
    clips: list[Clip]
    waves: list[torch.Tensor]
    frames: list[torch.Tensor | None]
    failed: dict[str, str]
    #: a separator's estimates of the targets of ``marsctl.align.metrics.heldout_mixtures`` (``eval.separator``)
    estimates: list[torch.Tensor] | None = None

    @classmethod
    def load(cls, clips: list[Clip], split: str, sample_rate: int, max_seconds: float, max_clips: int, seed: int) -> "HeldOut":
        members = [c for c in clips if c.split == split]
        if max_clips and len(members) > max_clips:
            order = torch.randperm(len(members), generator=torch.Generator().manual_seed(seed))[:max_clips]
            members = [members[i] for i in sorted(order.tolist())]
        kept, waves, frames, failed = [], [], [], {}
        limit = int(max_seconds * sample_rate)
        for clip in members:
            try:
                wave = torch.from_numpy(load_audio(clip.audio_path, sample_rate))[:limit]
                frame = load_image(clip.frame_paths[len(clip.frame_paths) // 2]) if clip.frame_paths else None
            except MarsctlError as exc:
                failed[clip.clip_id] = str(exc)
                continue
            kept.append(clip)
            waves.append(wave)
            frames.append(frame)
        return cls(split, kept, waves, frames, failed)

    def __len__(self) -> int:
        return len(self.clips)
