"""Finding the files to separate: folders searched recursively, and query mapping files."""

from __future__ import annotations

import csv
import dataclasses
import errno
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from marsctl.audio import is_audio_path
from marsctl.errors import ConfigError
from marsctl.separate.queries import Query, parse_span


@dataclasses.dataclass(frozen=True)
class InputFile:
    path: Path
    #: output folder relative to --out: the path relative to the folder given, without suffix
    relative: Path


@dataclasses.dataclass
class InputSearch:
    files: list[InputFile] = dataclasses.field(default_factory=list)
    #: files with a non-audio suffix found inside the folders given
    skipped_non_audio: list[Path] = dataclasses.field(default_factory=list)
    #: one line per folder that could not be listed
    problems: list[str] = dataclasses.field(default_factory=list)


def find_inputs(paths: Sequence[str | Path], exclude: Iterable[str | Path] = ()) -> InputSearch:
    """Files to separate: files named as given, folders searched recursively (sorted; hidden
    files and the folders in ``exclude``, such as the output folder, left out). A missing or
    non-audio file named explicitly is reported when it is loaded; a folder that cannot be
    listed, a dangling symlink, a symlink loop and a FIFO or device are reported in ``problems``."""
    search = InputSearch()
    excluded = {Path(p).resolve() for p in exclude}
    for given in map(Path, paths):
        if not given.is_dir():
            search.files.append(InputFile(given, Path(given.stem)))
            continue
        found: list[Path] = []

        def unreadable(error: OSError) -> None:
            reason = "permission denied" if isinstance(error, PermissionError) else (error.strerror or str(error))
            search.problems.append(f"{error.filename or given}: cannot list this folder ({reason})")

        for folder, subfolders, names in os.walk(given, onerror=unreadable):
            subfolders[:] = sorted(d for d in subfolders if Path(folder, d).resolve() not in excluded)
            found += [Path(folder, name) for name in names if not name.startswith(".")]
        for path in sorted(found):
            if not path.is_file():  # one line each, never a silent skip
                if path.is_symlink():
                    try:
                        path.stat()
                        kind = "its target is not a file"
                    except OSError as exc:
                        kind = "a symlink loop" if getattr(exc, "errno", None) == errno.ELOOP else "a dangling symlink"
                    search.problems.append(f"{path}: skipped: {kind}")
                elif path.exists() and not path.is_dir():
                    search.problems.append(f"{path}: skipped: not a regular file (a FIFO, socket or device)")
                continue
            if is_audio_path(path):
                search.files.append(InputFile(path, path.relative_to(given).with_suffix("")))
            else:
                search.skipped_non_audio.append(path)
    return search


QUERY_COLUMNS = ("query", "query_audio", "query_image", "span")


def read_query_mapping(path: str | Path) -> list[tuple[InputFile, Query]]:
    """Per-file queries from CSV/TSV (columns ``path``, ``query`` and optionally ``query_audio``,
    ``query_image``, ``span`` (``START:END`` seconds of that file), ``negative``) or JSON (``{"file": "query", ...}`` or a list of objects with
    those keys; values are strings or lists of strings). Several texts in one cell are separated
    by ``|``. Relative paths (inputs and query files) are relative to the mapping file, and outputs
    mirror that layout (a row whose output would leave ``--out``, such as ``../x.wav``, fails when
    it is separated). A UTF-8
    byte-order mark (as Excel writes) is accepted; an empty mapping is an error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such query mapping file")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
        if suffix == ".json":
            data = json.loads(text)
            rows = [{"path": k, "query": v} for k, v in data.items()] if isinstance(data, dict) else data
        elif suffix in (".csv", ".tsv"):
            reader = csv.reader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
            header = [name.strip() for name in next(reader, [])]
            _check_columns(path, header)
            rows = [dict(zip(header, cells)) for cells in reader if any(c.strip() for c in cells)]
        else:
            raise ConfigError(f"{path}: query mapping must be .csv, .tsv or .json")
    except PermissionError:
        raise ConfigError(f"{path}: permission denied") from None
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as exc:
        raise ConfigError(f"{path}: cannot parse the query mapping ({exc})") from exc
    if not isinstance(rows, list):
        raise ConfigError(f"{path}: expected an object or a list of objects")
    if not rows:
        raise ConfigError(f"{path}: the query mapping has no entries")
    return [_mapping_row(path, number, row) for number, row in enumerate(rows, start=1)]


def _check_columns(path: Path, header: list[str]) -> None:
    found = ", ".join(repr(h) for h in header if h) or "none"
    if "path" not in header:
        raise ConfigError(f"{path}: no 'path' column (columns found: {found})")
    if not any(column in header for column in QUERY_COLUMNS):
        raise ConfigError(f"{path}: no query column, expected one of {', '.join(QUERY_COLUMNS)} (columns found: {found})")


def _mapping_row(path: Path, number: int, row: Any) -> tuple[InputFile, Query]:
    base = path.parent
    if not isinstance(row, dict) or not row.get("path"):
        keys = f" (keys found: {', '.join(map(repr, row))})" if isinstance(row, dict) and row else ""
        raise ConfigError(f"{path}: entry {number} has no 'path'{keys}")
    if not isinstance(row["path"], str):
        raise ConfigError(f"{path}: entry {number}: 'path' must be a string, got {row['path']!r}")
    where = f"{path}: entry {number} ({row['path']})"

    def split(key: str) -> tuple[str, ...]:
        value = row.get(key)
        if value is None:
            return ()
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            items = value
        elif isinstance(value, str):
            items = value.split("|")
        else:
            raise ConfigError(f"{where}: '{key}' must be a string or a list of strings, got {json.dumps(value)}")
        return tuple(s.strip() for s in items if s.strip())

    def local(value: str) -> str:
        return str(value if Path(value).is_absolute() else base / value)

    try:
        query = Query(
            texts=split("query"),
            audio=tuple(local(p) for p in split("query_audio")),
            images=tuple(local(p) for p in split("query_image")),
            negative=split("negative"),
            spans=tuple(parse_span(span) for span in split("span")),
        )
    except ConfigError as exc:
        if not (split("query") or split("query_audio") or split("query_image") or split("span")):
            raise ConfigError(f"{where} has no query") from None
        raise ConfigError(f"{where}: {exc}") from None
    file = Path(row["path"])
    if file.is_absolute():  # outputs go to <out>/<file name>/
        return InputFile(file, Path(file.name).with_suffix("")), query
    return InputFile(base / file, file.with_suffix("")), query
