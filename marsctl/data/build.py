"""``marsctl data build``: fetch -> filter -> mix, resumable, with a dataset card and a summary.

Each stage skips finished work (per-unit fetch records, cached scores, mixtures on disk),
and every file is written atomically, so a build killed at any point and run again ends
with the same manifests as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from marsctl.data.fetch import FetchOptions, FetchResult, apply_options, fetch, load_fetched
from marsctl.data.filter import FilterResult, filter_clips
from marsctl.data.manifest import CARD_FILE, SCHEMA_VERSION, load_clips
from marsctl.data.mixing import make_mixtures
from marsctl.data.recipe import DataRecipe, recipe_from_mapping
from marsctl.errors import MarsctlError
from marsctl.files import write_json_atomic
from marsctl.train.lock import RunLock


@dataclass
class BuildSummary:
    """What a build (or one stage) did: kept, dropped by reason, failed by reason."""

    recipe: str
    clips_total: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    kept_per_split: Counter = field(default_factory=Counter)
    mixtures_per_split: Counter = field(default_factory=Counter)

    @property
    def n_failed(self) -> int:
        return sum(self.failed.values()) + sum(self.skipped.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "clips": self.clips_total,
            "kept": self.kept,
            "kept_per_split": dict(sorted(self.kept_per_split.items())),
            "dropped_by_reason": dict(sorted(self.dropped.items())),
            "failed_by_reason": dict(sorted(self.failed.items())),
            "skipped_by_reason": dict(sorted(self.skipped.items())),
            "mixtures_per_split": dict(sorted(self.mixtures_per_split.items())),
        }


def _reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0].strip() or "unknown"


def summarize_fetch(summary: BuildSummary, result: FetchResult) -> None:
    summary.failed.update(_reason_kind(r.reason) for r in result.failed)
    summary.skipped.update(s.kind for s in result.skipped)


def summarize_filter(summary: BuildSummary, result: FilterResult) -> None:
    summary.clips_total = len(result.rows)
    summary.kept = result.kept
    summary.dropped = result.dropped_by_reason()
    summary.kept_per_split = Counter(r["split"] for r in result.rows if r["keep"])


def write_card(dataset_dir: Path, recipe: DataRecipe, status: str, summary: BuildSummary | None = None) -> None:
    card = {
        "schema_version": SCHEMA_VERSION,
        "recipe": recipe.name,
        "description": recipe.description,
        "source": recipe.source_kind,
        "status": status,
        "config": recipe.to_mapping(),
        "counts": summary.to_dict() if summary else {},
        "layout": {
            "clips": "clips/<label>/<clip_id>.flac",
            "frames": "frames/<label>/<clip_id>/NNN.jpg",
            "clips_manifest": "manifests/clips.parquet",
            "mixtures_manifest": "manifests/mixtures.parquet",
            "mixtures": "mixtures/<split>/<mixture_id>/{mixture,<label>}.wav",
            "failures": "logs/failures.jsonl",
        },
    }
    write_json_atomic(dataset_dir / CARD_FILE, card)


def read_card_recipe(dataset_dir: str | Path) -> DataRecipe:
    """The recipe a dataset directory was built with (from its ``dataset.json``)."""
    path = Path(dataset_dir) / CARD_FILE
    if not path.is_file():
        raise MarsctlError(f"{path}: no dataset card here; build with 'marsctl data build' or give --recipe")
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise MarsctlError(f"{path}: unreadable dataset card ({exc})") from exc
    return recipe_from_mapping(card.get("config"), f"{path}:config")


#: temporary names a killed writer of this build leaves: ``atomic_path``'s
#: ``.<stem>.<8 random characters of mkstemp>.tmp<suffix>`` files (nothing else matches)
_TEMP_FILE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)?$")
#: the folders a build writes into; the sweep looks only there (and at the top-level files below)
BUILD_FOLDERS = ("clips", "frames", "manifests", "mixtures", "state", "logs", "scores")
#: the files a build writes at the top of the dataset folder (their temporary names are swept too)
_TOP_LEVEL_STEMS = frozenset({"dataset", "provenance", "artifact", "README"})
#: the lock a build holds on its dataset folder (the same advisory lock a training run holds on its run)
BUILD_LOCK = "build.lock"


def _is_own_temp(path: Path) -> bool:
    return _TEMP_FILE.match(path.name) is not None and path.is_file() and not path.is_symlink()


def sweep_temporary_files(dataset_dir: Path) -> int:
    """Remove what a killed build left half-written: temporary names of marsctl's own writers, under the
    build's own folders only (a user's ``.notes.tmp`` elsewhere in the tree is never touched)."""
    removed = 0
    for path in list(dataset_dir.glob(".*")):
        if _is_own_temp(path) and path.name[1:].split(".", 1)[0] in _TOP_LEVEL_STEMS:
            path.unlink(missing_ok=True)
            removed += 1
    for folder in BUILD_FOLDERS:
        root = dataset_dir / folder
        if not root.is_dir() or root.is_symlink():
            continue
        for path in list(root.rglob(".*")):
            if _is_own_temp(path):
                path.unlink(missing_ok=True)
                removed += 1
            elif folder == "frames" and path.is_dir() and not path.is_symlink() and path.parent.parent == root:
                # extract_frames' ``.<clip_id>.<random>`` staging folders: frames/<label>/.<clip_id>.*
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
    tmp = dataset_dir / "state" / "tmp"
    if tmp.is_dir() and not tmp.is_symlink():
        for child in tmp.iterdir():
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() and not child.is_symlink() else child.unlink(missing_ok=True)
            removed += 1
    return removed


@contextlib.contextmanager
def build_lock(dataset_dir: Path) -> Iterator[None]:
    """Hold the dataset folder's lock (refused with one line while another build writes there)."""
    with RunLock(dataset_dir, BUILD_LOCK, "data build"):
        yield


def folder_files_input(recipe: DataRecipe, dataset_dir: str | Path, options: FetchOptions):
    """The stage input of a folder recipe's root: the regular files under it that the build reads
    (a :class:`marsctl.hub.stage.FileSelection`), so the fingerprint never reads anything else; None for
    other source kinds."""
    from marsctl.data.fetch import plan
    from marsctl.hub.stage import FileSelection

    dataset_dir = Path(dataset_dir)
    recipe = apply_options(recipe, options, dataset_dir)
    if recipe.source_kind != "folder":
        return None
    units, _ = plan(recipe, dataset_dir, options)
    root = Path(recipe.folder.root or options.root or "").expanduser().resolve()
    return FileSelection(root, tuple(Path(item[0]).relative_to(root).as_posix() for unit in units for item in unit.items))


def build(
    recipe: DataRecipe,
    dataset_dir: str | Path,
    options: FetchOptions | None = None,
    *,
    encoder=None,
) -> BuildSummary:
    """fetch -> filter -> mix into ``dataset_dir``; resumable; returns the summary (also in the card)."""
    options = options or FetchOptions()
    dataset_dir = Path(dataset_dir)
    recipe = apply_options(recipe, options, dataset_dir)
    dataset_dir.mkdir(parents=True, exist_ok=True)
    with build_lock(dataset_dir):  # one build per directory at a time: the sweep never meets a live writer
        sweep_temporary_files(dataset_dir)
        summary = BuildSummary(recipe=recipe.name)
        write_card(dataset_dir, recipe, "building")
        fetched = fetch(recipe, dataset_dir, options)
        summarize_fetch(summary, fetched)
        filtered = filter_clips(recipe, dataset_dir, fetched.records, encoder=encoder, progress=options.progress)
        summarize_filter(summary, filtered)
        rows = make_mixtures(recipe, dataset_dir, progress=options.progress)
        summary.mixtures_per_split = Counter(r["split"] for r in rows)
        write_card(dataset_dir, recipe, "complete", summary)
    return summary


def refilter(recipe: DataRecipe, dataset_dir: str | Path, *, encoder=None, progress: bool = True) -> BuildSummary:
    """Rerun the filter on an already fetched dataset (cached scores; new thresholds apply)."""
    dataset_dir = Path(dataset_dir)
    records = load_fetched(dataset_dir)
    with build_lock(dataset_dir):
        sweep_temporary_files(dataset_dir)
        summary = BuildSummary(recipe=recipe.name)
        summary.failed.update(_reason_kind(r.reason) for r in records if r.status != "ok")
        summarize_filter(summary, filter_clips(recipe, dataset_dir, records, encoder=encoder, progress=progress))
        write_card(dataset_dir, recipe, "filtered", summary)
    return summary


def remix(recipe: DataRecipe, dataset_dir: str | Path, *, progress: bool = True) -> BuildSummary:
    dataset_dir = Path(dataset_dir)
    clips = load_clips(dataset_dir)
    with build_lock(dataset_dir):
        sweep_temporary_files(dataset_dir)
        summary = BuildSummary(recipe=recipe.name)
        summary.clips_total = len(clips)
        summary.kept = sum(clips["keep"])
        rows = make_mixtures(recipe, dataset_dir, progress=progress)
        summary.mixtures_per_split = Counter(r["split"] for r in rows)
        write_card(dataset_dir, recipe, "complete", summary)
    return summary
