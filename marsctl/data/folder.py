"""Recipe source ``folder``: build the same manifests from any labeled folder tree.

``<root>/<label>/**/<file>``: the label is the first-level subfolder's name; every audio or
video file below it (any format :func:`marsctl.audio.load_audio` reads) becomes one clip,
converted to 16 kHz mono FLAC; video files also give 1 fps, 224 px frames. A ``train``,
``val`` or ``test`` folder anywhere below the label sets the split; otherwise a stable hash
of the file's relative path does (``folder.val_fraction``, ``folder.test_fraction``).

Skipped with a logged reason, never fatal: files directly under the root, files of labels
not in the recipe's ``labels`` (when given), other file types, symlinks leading outside the
root, FIFOs and devices (not regular files), subfolders that cannot be listed, dangling symlinks,
unreadable or empty audio.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from stat import S_ISREG

from marsctl.audio import is_audio_path, load_audio, save_audio
from marsctl.data.media import extract_frames, probe_streams
from marsctl.data.paths import UnsafePathError, inside, label_dirname, safe_id
from marsctl.data.recipe import DataRecipe
from marsctl.data.records import ClipRecord, SkippedRow, WorkUnit, fingerprint
from marsctl.errors import AudioError, ConfigError

VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".3gp"})
SPLIT_NAMES = ("train", "val", "test")


def hash_split(key: str, val_fraction: float, test_fraction: float) -> str:
    """A stable split for ``key``: the same key always lands in the same split."""
    u = int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:12], 16) / float(1 << 48)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def root_from_card(dataset_dir: Path, name: str) -> str | None:
    """The root an earlier build of the same recipe into ``dataset_dir`` used (so a rerun needs no --root)."""
    import json

    try:
        card = json.loads((dataset_dir / "dataset.json").read_text(encoding="utf-8"))
        if card.get("recipe") == name:
            return (card.get("config") or {}).get("folder", {}).get("root")
    except (OSError, ValueError, AttributeError):
        pass
    return None


def apply_options(recipe: DataRecipe, options, dataset_dir: Path | None = None) -> DataRecipe:
    """``--root`` into the recipe; without it, a rebuild into the same directory takes the card's root."""
    if options.root:
        return recipe.with_source(root=str(Path(options.root).expanduser().resolve()))
    if not recipe.source.root and dataset_dir is not None:
        root = root_from_card(Path(dataset_dir), recipe.name)
        if root:
            return recipe.with_source(root=root)
    return recipe


def plan_units(recipe: DataRecipe, dataset_dir: Path, options) -> tuple[list[WorkUnit], list[SkippedRow]]:
    source = recipe.folder
    assert source is not None
    root_text = options.root or source.root or root_from_card(dataset_dir, recipe.name)
    if not root_text:
        raise ConfigError("the folder recipe needs a root folder: give --root DIR (or folder.root in the recipe)")
    root = Path(root_text).expanduser()
    if not root.is_dir():
        raise ConfigError(f"{root}: no such folder")
    root = root.resolve()
    allowed = set(recipe.labels)
    units: list[WorkUnit] = []
    skipped: list[SkippedRow] = []
    def unlistable(exc: OSError) -> None:  # a subfolder that cannot be listed: one logged row, the walk goes on
        where = Path(exc.filename).relative_to(root).as_posix() if exc.filename else str(root)
        skipped.append(SkippedRow(where, f"cannot list the folder ({exc.strerror or exc})", "unreadable"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unlistable, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(root)
            where = str(rel)
            if len(rel.parts) < 2:
                skipped.append(SkippedRow(where, "not inside a label folder (<root>/<label>/...)", "no_label_folder"))
                continue
            if not is_audio_path(path):
                skipped.append(SkippedRow(where, f"unsupported file type '{path.suffix or name}'", "unsupported_file"))
                continue
            try:
                stat = path.stat()
            except OSError as exc:  # a dangling symlink, a symlink loop
                skipped.append(SkippedRow(where, f"cannot read the file ({exc.strerror or exc})", "unreadable"))
                continue
            if not S_ISREG(stat.st_mode):  # a FIFO or a device would block or never end when read
                skipped.append(SkippedRow(where, "not a regular file", "not_regular_file"))
                continue
            try:
                inside(root, rel)  # a symlink pointing outside the root is refused
            except UnsafePathError as exc:
                skipped.append(SkippedRow(where, f"path outside the root: {exc}", "outside_root"))
                continue
            label = rel.parts[0]
            if allowed and label not in allowed:
                skipped.append(SkippedRow(where, f"unknown label {label!r} (not in the recipe's labels)", "unknown_label"))
                continue
            marked = [p for p in rel.parts[1:-1] if p in SPLIT_NAMES]
            split = marked[-1] if marked else hash_split(rel.as_posix(), source.val_fraction, source.test_fraction)
            clip_id = safe_id(rel.with_suffix("").as_posix().replace("/", "__").replace(" ", "_"))
            item = (str(path), label, split, clip_id)
            settings = (stat.st_size, stat.st_mtime_ns, source.max_duration_s, source.extract_frames, recipe.signal.sample_rate)
            units.append(WorkUnit(unit_id=f"folder-{clip_id}", items=[item], description=where, fingerprint=fingerprint(item, settings)))
    return units, skipped


def run_unit(unit: WorkUnit, recipe: DataRecipe, dataset_dir: Path) -> list[ClipRecord]:
    source = recipe.folder
    assert source is not None
    sr = recipe.signal.sample_rate
    path_text, label, split, clip_id = unit.items[0]
    path = Path(path_text)
    record = ClipRecord(clip_id=clip_id, label=label, split=split, source=f"file:{path}")
    try:
        wave = load_audio(path, sr)
        if source.max_duration_s is not None:
            wave = wave[: int(source.max_duration_s * sr)]
        rel = f"clips/{label_dirname(label)}/{clip_id}.flac"
        save_audio(inside(dataset_dir, rel), wave, sr)
        record.audio_path, record.duration_s, record.sample_rate = rel, len(wave) / sr, sr
        if source.extract_frames and path.suffix.lower() in VIDEO_SUFFIXES and probe_streams(path)[1]:
            frames_rel = f"frames/{label_dirname(label)}/{clip_id}"
            names = extract_frames(path, inside(dataset_dir, frames_rel), duration_s=source.max_duration_s)
            record.frame_paths = [f"{frames_rel}/{n}" for n in names]
    except (AudioError, UnsafePathError, OSError) as exc:
        record.status, record.reason = "failed", f"unreadable: {exc}"
    except Exception as exc:  # one bad file never stops the build; the reason is logged
        record.status, record.reason = "failed", f"error: {path}: {type(exc).__name__}: {exc}"
    return [record]
