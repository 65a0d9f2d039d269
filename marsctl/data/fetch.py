"""The fetch stage: turn a recipe's source (a kind from :mod:`marsctl.data.sources`) into clips.

Work is split into units (one video segment, one file, one rendered class). A finished
unit writes ``state/fetch/<unit_id>.json`` atomically, so a rerun skips it and a killed
run loses only the units in flight. Items that fail (dead video, unreadable file) are
recorded with the reason and the stage goes on; so are rows skipped before any attempt
(malformed row, unknown label, path climbing out with ``../``). ``logs/failures.jsonl``
lists both at the end.
"""

from __future__ import annotations

import json
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from marsctl.data.paths import safe_id
from marsctl.data.recipe import DataRecipe
from marsctl.data.records import ClipRecord, SkippedRow, WorkUnit
from marsctl.data.sources import source_module
from marsctl.files import write_json_atomic, write_text_atomic
from marsctl.progress import stage_progress

STATE_FETCH = "state/fetch"
FETCHED_INDEX = "state/fetched.json"
FAILURES_LOG = "logs/failures.jsonl"


@dataclass
class FetchOptions:
    """Command-line overrides of the recipe's source settings."""

    #: a local source list (CSV/JSON) instead of the recipe's URL
    source_list: str | None = None
    #: the folder recipe's root
    root: str | None = None
    workers: int | None = None
    mirror: str | None = None
    #: yt-dlp cookies file (online recipes)
    cookies: str | None = None
    #: fetch only the first N planned units (a quick look at a big recipe)
    limit: int | None = None
    #: try again units that failed in an earlier run
    retry_failed: bool = False
    progress: bool = True


@dataclass
class FetchResult:
    records: list[ClipRecord] = field(default_factory=list)
    skipped: list[SkippedRow] = field(default_factory=list)
    units_run: int = 0
    units_reused: int = 0

    @property
    def ok(self) -> list[ClipRecord]:
        return [r for r in self.records if r.status == "ok"]

    @property
    def failed(self) -> list[ClipRecord]:
        return [r for r in self.records if r.status != "ok"]


def apply_options(recipe: DataRecipe, options: FetchOptions, dataset_dir: Path | None = None) -> DataRecipe:
    """The recipe with the command-line overrides that change what is fetched (recorded in the card).

    Each source module applies the options that concern it (its optional ``apply_options``).
    """
    module = source_module(recipe.source_kind)
    apply = getattr(module, "apply_options", None)
    return apply(recipe, options, dataset_dir) if apply is not None else recipe


def plan(recipe: DataRecipe, dataset_dir: Path, options: FetchOptions) -> tuple[list[WorkUnit], list[SkippedRow]]:
    units, skipped = source_module(recipe.source_kind).plan_units(recipe, dataset_dir, options)
    if options.limit is not None:
        units = units[: max(0, options.limit)]
    return units, skipped


def _state_path(dataset_dir: Path, unit: WorkUnit) -> Path:
    return dataset_dir / STATE_FETCH / f"{safe_id(unit.unit_id)}.json"


def _read_state(path: Path, fingerprint: str | None = None) -> list[ClipRecord] | None:
    """The saved records of a unit; None if missing, unreadable or stale (other fingerprint)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if fingerprint is not None and data.get("fingerprint") != fingerprint:
            return None
        return [ClipRecord.from_dict(r) for r in data["records"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or unreadable: the unit runs again


def fetch(recipe: DataRecipe, dataset_dir: str | Path, options: FetchOptions | None = None) -> FetchResult:
    """Run the fetch stage (resumable); returns every record of the planned units."""
    options = options or FetchOptions()
    dataset_dir = Path(dataset_dir)
    recipe = apply_options(recipe, options, dataset_dir)
    module = source_module(recipe.source_kind)
    units, skipped = plan(recipe, dataset_dir, options)
    result = FetchResult(skipped=list(skipped))
    done: dict[str, list[ClipRecord]] = {}
    todo: list[WorkUnit] = []
    for unit in units:
        records = _read_state(_state_path(dataset_dir, unit), unit.fingerprint)
        if records is not None and not (options.retry_failed and any(r.status != "ok" for r in records)):
            done[unit.unit_id] = records
        else:
            todo.append(unit)
    result.units_reused = len(done)

    run_one: Callable[[WorkUnit], list[ClipRecord]] = lambda unit: module.run_unit(unit, recipe, dataset_dir)
    workers = max(1, options.workers or _default_workers(recipe))
    n_items = sum(len(u.items) for u in todo)
    with stage_progress(f"fetch {recipe.name}", total=n_items, show=options.progress) as advance:
        if workers == 1 or len(todo) <= 1:
            for unit in todo:
                done[unit.unit_id] = _finish(dataset_dir, unit, run_one(unit))
                advance(len(unit.items))
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                pending = {pool.submit(run_one, unit): unit for unit in todo}
                while pending:
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        unit = pending.pop(future)
                        done[unit.unit_id] = _finish(dataset_dir, unit, future.result())
                        advance(len(unit.items))
    result.units_run = len(todo)
    for unit in units:
        result.records.extend(done[unit.unit_id])
    write_json_atomic(dataset_dir / FETCHED_INDEX, {"units": [safe_id(u.unit_id) for u in units]})
    _write_failures(dataset_dir, result)
    return result


def _default_workers(recipe: DataRecipe) -> int:
    return int(getattr(recipe.source, "workers", 1) or 1)


def _finish(dataset_dir: Path, unit: WorkUnit, records: list[ClipRecord]) -> list[ClipRecord]:
    write_json_atomic(
        _state_path(dataset_dir, unit),
        {"unit_id": unit.unit_id, "fingerprint": unit.fingerprint, "records": [r.to_dict() for r in records]},
    )
    return records


def _write_failures(dataset_dir: Path, result: FetchResult) -> None:
    lines = [json.dumps(s.to_dict(), ensure_ascii=False) for s in result.skipped]
    lines += [
        json.dumps(
            {"status": "failed", "clip_id": r.clip_id, "label": r.label, "split": r.split, "source": r.source,
             "reason": r.reason, "attempts": r.attempts},
            ensure_ascii=False,
        )
        for r in result.failed
    ]
    write_text_atomic(dataset_dir / FAILURES_LOG, "".join(line + "\n" for line in lines))


def load_fetched(dataset_dir: str | Path) -> list[ClipRecord]:
    """The records of the last completed fetch (what the filter stage works on)."""
    from marsctl.errors import MarsctlError

    dataset_dir = Path(dataset_dir)
    index = dataset_dir / FETCHED_INDEX
    if not index.is_file():
        raise MarsctlError(f"{dataset_dir}: no completed fetch here (run 'marsctl data fetch' first)")
    units = json.loads(index.read_text(encoding="utf-8"))["units"]
    records: list[ClipRecord] = []
    for unit_id in units:
        got = _read_state(dataset_dir / STATE_FETCH / f"{unit_id}.json")
        if got is None:
            raise MarsctlError(f"{dataset_dir}: fetch record of {unit_id} is missing; run 'marsctl data fetch' again")
        records.extend(got)
    return records
