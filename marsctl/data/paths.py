"""Safe names and paths for dataset files.

Everything a source list or a folder tree supplies (IDs, labels, file names) is untrusted:
it may contain ``../``, absolute paths, separators or control characters. These helpers
turn such strings into names that stay inside the dataset directory, and refuse paths
that would leave it.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

_UNSAFE_ID = re.compile(r"[^A-Za-z0-9_.\-]+")
_UNSAFE_LABEL_FILE = re.compile(r"[\x00-\x1f/\\]+")


class UnsafePathError(ValueError):
    """A path from untrusted input would leave the directory it belongs in."""


def safe_id(text: str, max_len: int = 120) -> str:
    """A file-system-safe identifier: runs of characters other than ``[A-Za-z0-9_.-]`` become ``_``.

    Leading dots are removed (no hidden files, no ``..``). If anything had to be changed or
    cut, a short hash of the original is appended so that distinct inputs stay distinct.
    """
    cleaned = _UNSAFE_ID.sub("_", text).lstrip(".")
    if cleaned == text and 0 < len(cleaned) <= max_len:
        return cleaned
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]
    return f"{cleaned[: max_len - 9] or 'id'}-{digest}"


def label_dirname(label: str) -> str:
    """Directory/file stem for a class label ("dog barking" stays readable, "a/b" does not escape)."""
    name = _UNSAFE_LABEL_FILE.sub("_", label).strip().lstrip(".")
    if not name:
        raise UnsafePathError(f"label {label!r} gives no usable file name")
    return name


def inside(root: Path, relative: str | Path) -> Path:
    """``root / relative``, refusing absolute paths and anything that resolves outside ``root``."""
    rel = Path(relative)
    if rel.is_absolute() or ".." in rel.parts:
        raise UnsafePathError(f"path {str(relative)!r} is absolute or climbs out with '..'")
    root_resolved = root.resolve()
    full = (root_resolved / rel).resolve()
    if full != root_resolved and root_resolved not in full.parents:
        raise UnsafePathError(f"path {str(relative)!r} resolves outside {root}")
    return full
