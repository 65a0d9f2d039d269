"""Paths as marsctl records them in the files it writes (model cards, ``config.json``,
``train_config.json``, ``provenance.json``): never a user's absolute home path.

:func:`portable_path` gives a local path relative to the folder the record is written into (the run
or dataset), a Hugging Face cache snapshot as its Hub id, and any other absolute path under the home
folder as ``~/...``. :func:`portable_command` does the same for the words of a command line and
replaces the value of ``--cookies`` (a login session) with ``<redacted>``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

#: recorded settings that hold a path (or a spec that may be one)
PATH_KEYS = frozenset({"data", "encoder", "init_model", "reward_encoder", "queries", "root", "source_list", "cookies"})
#: command-line options whose value is never recorded
SECRET_OPTIONS = frozenset({"--cookies"})
REDACTED = "<redacted>"
_SNAPSHOT = re.compile(r"(?:^|/)(models|datasets)--([^/]+?)--([^/]+)/snapshots/([0-9a-f]{40})(/.*)?$")


def _hub_id(text: str) -> str | None:
    match = _SNAPSHOT.search(text)
    if match is None:
        return None
    kind, org, name, commit, rest = match.groups()
    spec = f"{'datasets/' if kind == 'datasets' else ''}{org}/{name}@{commit}"
    return spec + (rest or "")


def portable_path(value: Any, base: str | os.PathLike[str]) -> Any:
    """``value`` as it may be recorded in a file under ``base``.

    A Hub cache snapshot becomes its Hub id (``datasets/org/name@commit``); an absolute path becomes
    relative to ``base`` when both lie under the same top folder (``/home`` with ``/home``, ``/data``
    with ``/data``), else ``~/...`` when under the home folder; anything else (a built-in name such as
    ``builtin``, a Hub id, a relative path, a non-path value) is returned unchanged.
    """
    if not isinstance(value, (str, os.PathLike)):
        return value
    text = os.fspath(value)
    if not text or "://" in text:
        return value
    hub = _hub_id(text)
    if hub is not None:
        return hub
    path = Path(text).expanduser()
    if not path.is_absolute():
        return value  # a name, a Hub id, or a path relative to where the command ran (no home folder in it)
    full = Path(os.path.abspath(path))
    root = Path(os.path.abspath(Path(base).expanduser()))
    if full.parts[:2] == root.parts[:2] and len(full.parts) > 1:
        return Path(os.path.relpath(full, root)).as_posix()
    home = Path.home()
    if full.is_relative_to(home):
        return "~/" + full.relative_to(home).as_posix()
    return full.as_posix()


def portable_mapping(mapping: Mapping[str, Any], base: str | os.PathLike[str]) -> dict[str, Any]:
    """``mapping`` with the values of :data:`PATH_KEYS` (at any depth) made portable for ``base``."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            out[key] = portable_mapping(value, base)
        elif key in PATH_KEYS:
            out[key] = REDACTED if key == "cookies" and value else portable_path(value, base)
        else:
            out[key] = value
    return out


def portable_command(words: Sequence[str], base: str | os.PathLike[str]) -> list[str]:
    """A command line as it may be recorded under ``base``: paths portable, ``--cookies`` values redacted."""
    out: list[str] = []
    hide_next = False
    for word in map(str, words):
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        option, equals, _ = word.partition("=")
        if option in SECRET_OPTIONS:
            if equals:
                out.append(f"{option}={REDACTED}")
            else:
                out.append(word)
                hide_next = True
            continue
        if equals and option.startswith("--"):
            out.append(f"{option}={portable_path(word.split('=', 1)[1], base)}")
        elif word.startswith("-"):
            out.append(word)
        else:
            out.append(str(portable_path(word, base)))
    return out


def portable_config(config: Any, base: str | os.PathLike[str]) -> Any:
    """A copy of a frozen config dataclass whose :data:`PATH_KEYS` fields are portable for ``base``
    (what its model card shows)."""
    import dataclasses

    changes = {f.name: portable_path(getattr(config, f.name), base) for f in dataclasses.fields(config) if f.name in PATH_KEYS}
    return dataclasses.replace(config, **{k: v for k, v in changes.items() if v != getattr(config, k)})
