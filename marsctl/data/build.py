"""``marsctl data build``: fetch -> filter -> mix, resumable, with a dataset card and a summary.

Each stage skips finished work (per-unit fetch records, cached scores, mixtures on disk),
and every file is written atomically, so a build killed at any point and run again ends
with the same manifests as an uninterrupted one.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from marsctl.data.fetch import FetchOptions, FetchResult, apply_options, fetch, load_fetched
from marsctl.data.filter import FilterResult, filter_clips
from marsctl.data.manifest import CARD_FILE, SCHEMA_VERSION, load_clips
from marsctl.data.mixing import make_mixtures
from marsctl.data.recipe import DataRecipe, recipe_from_mapping
from marsctl.errors import MarsctlError
from marsctl.files import write_json_atomic


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


#: temporary names left by a killed writer: ``atomic_path``'s ``.<stem>.<random>.tmp<suffix>``
#: files, ``extract_frames``' ``.<clip_id>.<random>`` folders and ``state/tmp`` downloads
_TEMP_FILE = re.compile(r"^\..+\.tmp(\.[A-Za-z0-9]+)?$")


def sweep_temporary_files(dataset_dir: Path) -> int:
    """Remove what a killed run left half-written (temporary names only; finished files never match)."""
    removed = 0
    for path in list(dataset_dir.rglob(".*")):
        if path.is_file() and not path.is_symlink() and _TEMP_FILE.match(path.name):
            path.unlink(missing_ok=True)
            removed += 1
        elif path.is_dir() and path.parent.parent.name == "frames" and path.parent.parent.parent == dataset_dir:
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    tmp = dataset_dir / "state" / "tmp"
    if tmp.is_dir():
        for child in tmp.iterdir():
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
            removed += 1
    return removed


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
    sweep_temporary_files(dataset_dir)  # one build per directory at a time
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
    sweep_temporary_files(dataset_dir)
    summary = BuildSummary(recipe=recipe.name)
    records = load_fetched(dataset_dir)
    summary.failed.update(_reason_kind(r.reason) for r in records if r.status != "ok")
    summarize_filter(summary, filter_clips(recipe, dataset_dir, records, encoder=encoder, progress=progress))
    write_card(dataset_dir, recipe, "filtered", summary)
    return summary


def remix(recipe: DataRecipe, dataset_dir: str | Path, *, progress: bool = True) -> BuildSummary:
    dataset_dir = Path(dataset_dir)
    sweep_temporary_files(dataset_dir)
    summary = BuildSummary(recipe=recipe.name)
    clips = load_clips(dataset_dir)
    summary.clips_total = len(clips)
    summary.kept = sum(clips["keep"])
    rows = make_mixtures(recipe, dataset_dir, progress=progress)
    summary.mixtures_per_split = Counter(r["split"] for r in rows)
    write_card(dataset_dir, recipe, "complete", summary)
    return summary
