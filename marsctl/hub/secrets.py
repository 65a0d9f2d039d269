"""Secrets that must never be published: the current Hugging Face token, token-shaped
strings, and symlinks that would carry files from outside an artifact.

``hub push`` refuses an artifact when :func:`find_secrets` or :func:`links_leaving` names a
file; the token itself is never printed (:func:`redact_secrets`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable

from marsctl.errors import MarsctlError

#: Hugging Face user access tokens: "hf_" and 34 letters/digits.
HF_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{30,}")
_TEXT_SUFFIXES = {".json", ".jsonl", ".yaml", ".yml", ".txt", ".md", ".csv", ".tsv", ".toml", ".cfg", ".ini", ".log",
                  ".py", ".sh"}
#: bytes read at a time when files are searched for secrets
SCAN_CHUNK_BYTES = 8 * 1024 * 1024
#: a token-shaped string longer than this may be missed where it crosses a chunk boundary
_TOKEN_SHAPE_OVERLAP = 256


def redact_secrets(text: str, token: str | None = None) -> str:
    """Replace the current token and anything shaped like a Hugging Face token."""
    if token:
        text = text.replace(token, "<redacted>")
    return HF_TOKEN_RE.sub("<redacted>", text)


def _contains_secret(path: Path, needle: bytes | None, token_shaped: bool, chunk_size: int) -> bool:
    """Whether ``path`` holds ``needle`` (or, if ``token_shaped``, a token-shaped string).

    Read in chunks of ``chunk_size`` bytes, each searched together with the last bytes of the
    one before (``len(needle) - 1``, or enough for a token shape), so a match across a chunk
    boundary is found and memory stays flat whatever the file's size.
    """
    overlap = max(len(needle) - 1 if needle else 0, _TOKEN_SHAPE_OVERLAP if token_shaped else 0)
    tail = b""
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            window = tail + chunk
            if needle and needle in window:
                return True
            if token_shaped and HF_TOKEN_RE.search(window.decode("ascii", "replace")):
                return True
            tail = window[-overlap:] if overlap else b""
    return False


def find_secrets(root: Path, files: Iterable[str], token: str | None, *, chunk_size: int = SCAN_CHUNK_BYTES) -> list[str]:
    """Files (relative paths) that contain the current token or a token-shaped string.

    Every file, whatever its size, is searched in chunks for the exact current token; text
    files (by suffix) are also searched for anything shaped like a Hugging Face token.
    """
    needle = token.encode() if token else None
    offenders = []
    for name in files:
        path = Path(root) / name
        try:
            found = _contains_secret(path, needle, path.suffix.lower() in _TEXT_SUFFIXES, max(1, chunk_size))
        except OSError as exc:
            raise MarsctlError(f"{path}: cannot read ({exc.strerror or exc})") from exc
        if found:
            offenders.append(name)
    return offenders


def links_leaving(root: Path, files: Iterable[str]) -> list[str]:
    """Files (relative paths) that are, or lie below, a symlink pointing outside ``root``, and
    symlinked folders (``name/``) pointing outside it.

    A snapshot of the Hugging Face cache (``.../<type>s--org--name/snapshots/<rev>/``) may link
    into its own repo folder's ``blobs/``; nothing else outside ``root`` is allowed.
    """
    root = Path(root)
    base = root.resolve()
    allowed = [base]
    if base.parent.name == "snapshots" and "--" in base.parent.parent.name:
        allowed.append(base.parent.parent / "blobs")

    def outside(path: Path) -> bool:
        target = path.resolve()
        return not any(target == a or a in target.parents for a in allowed)

    leaving = [name for name in files if outside(root / name)]
    for dirpath, dirnames, _ in os.walk(root):
        for name in dirnames:
            folder = Path(dirpath) / name
            if folder.is_symlink() and not name.startswith(".") and outside(folder):
                leaving.append(folder.relative_to(root).as_posix() + "/")
    return leaving
