"""What the fetch stage hands to the filter stage: one record per clip (or per failure).

Records are small JSON files under ``<dataset>/state/fetch/<unit_id>.json``, written
atomically when a unit of work finishes; a rerun skips units whose record exists, so a
killed build loses at most the units that were in flight.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class ClipRecord:
    """A fetched (or rendered, or imported) clip, or an item that failed (``status='failed'``)."""

    clip_id: str
    label: str
    split: str
    source: str
    status: str = "ok"
    reason: str = ""
    audio_path: str = ""
    frame_paths: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    sample_rate: int = 0
    attempts: int = 1
    #: recording group (all takes of one recording share it; splits never divide a group)
    group: str = ""
    #: the soundfont that rendered the clip (soundfont sources), else ""
    soundfont: str = ""
    #: the member dataset a union dataset took the clip from, else ""
    family: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ClipRecord":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass
class WorkUnit:
    """One resumable piece of fetch work: one video segment, one file, or one rendered class."""

    unit_id: str
    items: list[Any]
    description: str = ""
    #: digest of everything that decides the unit's output; a saved record with another
    #: fingerprint (the recipe or the source file changed) is stale and the unit runs again
    fingerprint: str = ""


def fingerprint(*parts: Any) -> str:
    """A stable digest of plain values (their ``repr``)."""
    import hashlib

    return hashlib.sha1(repr(parts).encode("utf-8")).hexdigest()[:16]


@dataclass
class SkippedRow:
    """A source-list row or file that was not even attempted, with the reason."""

    where: str
    reason: str
    #: a short category for summaries: malformed_row, invalid_id, unknown_label, outside_root, ...
    kind: str = "skipped"

    def to_dict(self) -> dict[str, Any]:
        return {"status": "skipped", "kind": self.kind, "where": self.where, "reason": self.reason}


class ItemFailed(Exception):
    """One item could not be fetched. ``retryable`` says whether trying again may help."""

    def __init__(self, reason: str, retryable: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
