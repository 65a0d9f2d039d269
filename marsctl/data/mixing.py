"""Mixtures: fixed, seeded evaluation mixtures on disk, and dynamic mixing for training.

Two recipes (``mix.mode``):

- ``omnisep`` (OmniSep/CLIPSep): every source is multiplied by ``signal.mix_source_gain``
  (0.5, i.e. "each source /2") and the results are summed.
- ``snr``: the first source gets ``mix_source_gain``; every other source is scaled so that
  the first source's energy over its energy is an SNR drawn uniformly from
  ``mix.snr_db_range``. If the sum would clip, everything is scaled down together.

Sources are saved *as they sit in the mix* (after gains), so ``mixture = sum(sources)``.
Training mixtures (``DynamicMixDataset(augment=...)``, the training recipes' ``augment:``) may
also pass every source through simulated rooms, gain, EQ and time shifts first
(:mod:`marsctl.data.augment`); the fixed mixtures never do.
A mixture draws ``num_sources`` distinct labels, one kept clip of each, and a random
window of ``signal.segment_samples`` samples from each clip (zero-padded if shorter).
Fixed mixture ``i`` of split ``s`` is drawn from a generator seeded by ``(mix.seed, s, i)``,
so a rerun, or a run resumed after a kill, writes the same mixtures.

Which labels (class balance):

- by default every label is equally likely, whatever its number of clips (a class
  uniformly, then a clip of it); ``DynamicMixDataset(balance="clip")`` instead makes every
  clip equally likely, so classes count in proportion to their clips;
- with ``mix.pairing`` (``{within: p, across: q}``; datasets whose clips have a ``family``,
  e.g. a union of instruments and everyday sounds) a mixture is first drawn "within" (all
  sources from one family, the family uniformly) or "across" (sources from different
  families) with those shares, then labels uniformly inside the families, then clips. The
  mixture manifest records ``pair_type`` and ``source_families`` so that evaluation can report
  instrument pairs, everyday pairs and cross pairs apart.
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
from marsctl.data.augment import AugmentConfig, SourceAugmenter
from marsctl.data.manifest import CARD_FILE, SPLITS, load_clips, write_mixtures
from marsctl.data.paths import inside, label_dirname
from marsctl.progress import stage_progress
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
    family: str = ""


def _pool_by_label(clips) -> dict[str, list[ClipRef]]:
    pool: dict[str, list[ClipRef]] = {}
    for row in clips:
        pool.setdefault(row["label"], []).append(
            ClipRef(row["clip_id"], row["label"], row["audio_path"], tuple(row["frame_paths"] or ()), row.get("family") or "")
        )
    return {label: sorted(refs, key=lambda r: r.clip_id) for label, refs in sorted(pool.items())}


def _families(pool: dict[str, list[ClipRef]]) -> dict[str, list[str]]:
    """family -> its labels (sorted); a label whose clips come from two families is in both."""
    families: dict[str, set[str]] = {}
    for label, refs in pool.items():
        for ref in refs:
            families.setdefault(ref.family, set()).add(label)
    return {family: sorted(labels) for family, labels in sorted(families.items())}


def choose_labels(
    rng: np.random.Generator,
    pool: dict[str, list[ClipRef]],
    num_sources: int,
    pairing: dict[str, float] | None = None,
    balance: str = "class",
) -> tuple[list[str], list[str], str]:
    """(labels, the family each source is taken from, pair type) of one mixture.

    The pair type is ``""`` without ``pairing``, else ``within`` or ``across``; a type that the
    pool cannot make (one family only, too few labels in every family) is not drawn.
    """
    labels = list(pool)
    if not pairing or num_sources < 2:
        if balance == "clip":
            counts = np.array([len(pool[label]) for label in labels], dtype=np.float64)
            picked = rng.choice(len(labels), size=num_sources, replace=False, p=counts / counts.sum())
        else:
            picked = rng.choice(len(labels), size=num_sources, replace=False)
        return [labels[i] for i in picked], [], ""
    families = _families(pool)
    names = list(families)
    within_ok = [f for f in names if len(families[f]) >= num_sources]
    weights = {
        "within": float(pairing.get("within", 0.0)) if within_ok else 0.0,
        "across": float(pairing.get("across", 0.0)) if len(names) >= 2 and len(labels) >= num_sources else 0.0,
    }
    total = weights["within"] + weights["across"]
    if total <= 0:
        raise MarsctlError(
            f"mix.pairing {dict(pairing)}: cannot draw {num_sources}-source mixtures from families "
            + ", ".join(f"{f or '(none)'}: {len(families[f])} label(s)" for f in names)
        )
    if rng.random() < weights["within"] / total:
        family = within_ok[int(rng.integers(len(within_ok)))]
        members = families[family]
        return [members[i] for i in rng.choice(len(members), size=num_sources, replace=False)], [family] * num_sources, "within"
    first, second = (names[i] for i in rng.choice(len(names), size=2, replace=False))
    chosen = [(first, families[first][int(rng.integers(len(families[first])))])]
    others = [label for label in families[second] if label != chosen[0][1]]
    if not others:  # the second family holds only the first label
        others_families = [f for f in names if f != first and any(label != chosen[0][1] for label in families[f])]
        second = others_families[int(rng.integers(len(others_families)))]
        others = [label for label in families[second] if label != chosen[0][1]]
    chosen.append((second, others[int(rng.integers(len(others)))]))
    rest = [(f, label) for f in names for label in families[f] if label not in {c[1] for c in chosen}]
    while len(chosen) < num_sources:
        family, label = rest[int(rng.integers(len(rest)))]
        chosen.append((family, label))
        rest = [(f, lab) for f, lab in rest if lab != label]
    return [label for _, label in chosen], [family for family, _ in chosen], "across"


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
    balance: str = "class",
    augment: SourceAugmenter | None = None,
) -> dict[str, Any]:
    """One random mixture: distinct labels, one clip each, a window each, gains by ``mix.mode``.

    Labels follow ``mix.pairing`` and ``balance`` (see :func:`choose_labels`). ``augment`` (training
    mixtures only) changes each window before the gains (:mod:`marsctl.data.augment`); it draws from
    children of ``rng``, so the labels, clips, windows and SNR drawn are the same with it or without.
    """
    labels = list(pool)
    if len(labels) < num_sources:
        raise MarsctlError(f"{dataset_dir}: need clips of at least {num_sources} labels to mix, found {len(labels)}")
    chosen, families, pair_type = choose_labels(rng, pool, num_sources, mix.pairing, balance)
    if families:  # a clip of the label from the family drawn
        candidates = [[r for r in pool[label] if r.family == family] for label, family in zip(chosen, families)]
    else:
        candidates = [pool[label] for label in chosen]
    refs = [refs[int(rng.integers(len(refs)))] for refs in candidates]
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
    if augment is not None and augment.config.per_source:
        waves = augment(rng, waves)
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
            "sources": sources.astype(np.float32), "mixture": mixture.astype(np.float32), "pair_type": pair_type}


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
                    "source_families": [r.family for r in drawn["refs"]],
                    "pair_type": drawn["pair_type"],
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
         "frame_paths": list[list[str]]  (absolute paths, [] where a clip has no frames),
         "families": list[str] ("" for a dataset without families)}

    with ``T = signal_config.segment_samples``; labels are distinct within a mixture. The
    gains follow ``mode`` as for the fixed mixtures (OmniSep ``/2`` by default). ``length``
    is the number of items per epoch (default: the number of kept clips in the split).

    ``balance``: ``"class"`` (default) draws a class uniformly, then a clip of it; ``"clip"``
    draws classes in proportion to their clips. ``pairing`` (``{within: p, across: q}``, see
    the module docstring) defaults to the ``mix.pairing`` of the recipe in the dataset's card,
    so a union dataset trains with the pair types it is evaluated on; ``{}`` switches it off.

    ``augment`` (:class:`~marsctl.data.augment.AugmentConfig`, training only) adds simulated rooms,
    gain, EQ and time shifts to every source, and its ``snr_db_range`` (when set) replaces ``mode``
    and ``snr_db_range`` with ``snr`` mixing over that range; ``None`` or all off draws exactly the
    mixtures drawn without it. The room bank is loaded (or simulated and cached) here, once.
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
        balance: str = "class",
        pairing: dict[str, float] | None = None,
        augment: AugmentConfig | None = None,
    ) -> None:
        if balance not in ("class", "clip"):
            raise MarsctlError(f"DynamicMixDataset: balance must be 'class' or 'clip', got {balance!r}")
        self.dataset_dir = Path(dataset_dir)
        self.split = split
        self.signal = signal_config or SignalConfig()
        self.num_sources = num_sources
        self.seed = seed
        self.epoch = 0
        self.balance = balance
        if pairing is None:
            pairing = card_pairing(self.dataset_dir)
        if augment is not None and augment.snr_db_range:
            mode, snr_db_range = "snr", augment.snr_db_range
        self.mix = MixConfig(num_sources=num_sources, mode=mode, snr_db_range=list(snr_db_range), pairing=dict(pairing))
        clips = load_clips(self.dataset_dir, kept_only=True, split=split)
        self.pool = _pool_by_label(clips)
        if len(self.pool) < num_sources:
            raise MarsctlError(
                f"{self.dataset_dir}: split {split!r} has kept clips of {len(self.pool)} label(s); "
                f"{num_sources}-source mixtures need at least {num_sources}"
            )
        self.length = int(length) if length is not None else len(clips)
        self._lengths: dict[str, int] = {}
        self.augment = SourceAugmenter(augment, self.signal.sample_rate) if augment is not None and augment.per_source else None

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
        drawn = draw_mixture(rng, self.pool, self.dataset_dir, self.signal, self.mix, self.num_sources, self._lengths, self.balance,
                             self.augment)
        root = self.dataset_dir.resolve()
        return {
            "mixture": torch.from_numpy(drawn["mixture"]),
            "sources": torch.from_numpy(drawn["sources"]),
            "labels": [r.label for r in drawn["refs"]],
            "clip_ids": [r.clip_id for r in drawn["refs"]],
            "frame_paths": [[str(root / p) for p in r.frame_paths] for r in drawn["refs"]],
            "families": [r.family for r in drawn["refs"]],
        }


def card_pairing(dataset_dir: Path) -> dict[str, float]:
    """The ``mix.pairing`` recorded in a dataset's card ({} when there is none or no card)."""
    try:
        card = json.loads((Path(dataset_dir) / CARD_FILE).read_text(encoding="utf-8"))
        pairing = card["config"]["mix"].get("pairing") or {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}
    return dict(pairing) if isinstance(pairing, dict) else {}


def collate_mixtures(items: list[dict[str, Any]]) -> dict[str, Any]:
    """DataLoader ``collate_fn``: stacks tensors, keeps the metadata as lists of lists."""
    return {
        "mixture": torch.stack([it["mixture"] for it in items]),
        "sources": torch.stack([it["sources"] for it in items]),
        "labels": [it["labels"] for it in items],
        "clip_ids": [it["clip_ids"] for it in items],
        "frame_paths": [it["frame_paths"] for it in items],
        "families": [it.get("families", []) for it in items],
    }
