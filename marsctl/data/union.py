"""Source kind ``union``: one training set made of datasets that are already built.

A union recipe names member datasets (directories built by ``marsctl data build``)::

    union:
      datasets:
        - {path: data/soundfont-multi, family: instruments}
        - {path: data/everyday, family: everyday}
    mix:
      pairing: {within: 0.5, across: 0.5}

The kept clips of every member enter the union with their label, split, recording group
(prefixed ``<family>:``), soundfont and a ``family`` column naming the member; clip ids
become ``<family>-<clip_id>``. Clip files (and frames) are hard-linked into the union's
``clips/`` (copied where a hard link cannot be made, e.g. across file systems), never
symlinked, so the union is a self-contained dataset directory like any other. The union's
filter section then runs on them as usual (members are already filtered: keep it lenient),
and its ``mix`` section draws the fixed mixtures; with ``mix.pairing`` those pair sounds
within and across families, and training on the union follows the same pairing (see
:mod:`marsctl.data.mixing`).

Member paths: absolute, or relative to ``root`` when given (``root`` itself relative to
the current directory, like ``--root``, which overrides it), else to the folder of the
recipe file, or to the current directory for a recipe shipped with marsctl and named on the
command line. The card records the resolved absolute paths. A member that is not a built
dataset is a one-line skip and the build goes on (exit status 1 at the end).

One unit of work is one member; it is redone when the member's clips manifest changes.
A member's cached filter scores come along with its clips: the filter checks them against
the linked file and its own settings as usual, and scores again only what does not match.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from marsctl.data.filter import STATE_SCORES
from marsctl.data.manifest import CLIPS_MANIFEST, load_clips
from marsctl.data.paths import UnsafePathError, inside, label_dirname, safe_id
from marsctl.data.records import ClipRecord, SkippedRow, WorkUnit, fingerprint
from marsctl.errors import ConfigError, MarsctlError
from marsctl.files import atomic_path

LINK_MODES = ("hardlink", "copy")


@dataclass(frozen=True)
class UnionSource:
    """Member datasets of a union (see the module docstring)."""

    #: each ``{path: <built dataset directory>, family: <name>}``; family defaults to the folder name
    datasets: list[dict[str, str]] = field(default_factory=list)
    #: the folder relative member paths are under (None: the recipe file's folder)
    root: Optional[str] = None
    #: "hardlink" (a copy where linking fails) or "copy"
    link: str = "hardlink"

    def __post_init__(self) -> None:
        if self.link not in LINK_MODES:
            raise ConfigError(f"union.link must be one of {', '.join(LINK_MODES)}, got {self.link!r}")
        if not self.datasets:
            raise ConfigError("union.datasets: name at least one built dataset ({path: ..., family: ...})")
        families = [m.family for m in self.members()]
        twice = sorted({f for f in families if families.count(f) > 1})
        if twice:
            raise ConfigError(f"union.datasets: family {twice[0]!r} is used twice; give each member its own family")

    def members(self) -> list["Member"]:
        members = []
        for i, entry in enumerate(self.datasets):
            where = f"union.datasets[{i}]"
            if isinstance(entry, str):
                entry = {"path": entry}
            if not isinstance(entry, dict) or "path" not in entry or set(entry) - {"path", "family"}:
                raise ConfigError(f"{where}: give path (and optionally family), got {entry!r}")
            path = str(entry["path"])
            family = str(entry.get("family") or Path(path).name)
            if safe_id(family) != family:
                raise ConfigError(f"{where}: family {family!r} must be a plain name (letters, digits, '_', '.', '-')")
            members.append(Member(path, family))
        return members

    def relative_to(self, folder: Path) -> "UnionSource":
        """The section as read from a recipe file in ``folder``: without ``root``, relative member paths
        become absolute against ``folder``; with ``root``, only the root is made absolute (against the
        current directory) and the members stay relative to it, so that ``--root`` can still replace it."""
        if self.root:
            return dataclasses.replace(self, root=str(Path(self.root).expanduser().resolve()))
        return self.resolved(folder)

    def resolved(self, folder: Path) -> "UnionSource":
        """The section with every member path absolute, against ``root`` or else ``folder``."""
        base = Path(self.root).expanduser().resolve() if self.root else Path(folder).resolve()
        datasets = [{"path": os.path.normpath(base / Path(m.path).expanduser()), "family": m.family} for m in self.members()]
        return dataclasses.replace(self, datasets=datasets)


@dataclass(frozen=True)
class Member:
    path: str
    family: str


def apply_options(recipe, options, dataset_dir: Path | None = None):
    """``--root`` sets the folder of relative member paths; every path becomes absolute (for the card)."""
    source: UnionSource = recipe.source
    if getattr(options, "root", None):
        source = dataclasses.replace(source, root=str(Path(options.root).expanduser().resolve()))
    return recipe.with_source(**dataclasses.asdict(source.resolved(Path.cwd())))


def _manifest_stamp(member_dir: Path) -> list[int] | None:
    try:
        stat = (member_dir / CLIPS_MANIFEST).stat()
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def plan_units(recipe, dataset_dir: Path, options=None) -> tuple[list[WorkUnit], list[SkippedRow]]:
    """One unit per member dataset: its kept clips (of the recipe's labels, if it lists any)."""
    source: UnionSource = recipe.source.resolved(Path.cwd())
    wanted = set(recipe.labels)
    units: list[WorkUnit] = []
    skipped: list[SkippedRow] = []
    for member in source.members():
        member_dir = Path(member.path)
        try:
            clips = load_clips(member_dir, kept_only=True)
        except MarsctlError as exc:
            skipped.append(SkippedRow(member.path, f"not a built dataset: {exc}", "missing_dataset"))
            continue
        rows = [dict(row) for row in clips]
        if wanted:
            for label in sorted({r["label"] for r in rows} - wanted):
                skipped.append(SkippedRow(f"{member.path} label {label!r}", "label not in the union recipe's labels", "unknown_label"))
            rows = [r for r in rows if r["label"] in wanted]
        items = [{"family": member.family, "member_dir": str(member_dir), "clip": r} for r in rows]
        units.append(
            WorkUnit(
                unit_id=safe_id(f"union-{member.family}"),
                items=items,
                description=member.family,
                fingerprint=fingerprint(member.path, member.family, _manifest_stamp(member_dir), source.link, rows),
            )
        )
    return units, skipped


def _place(src: Path, dst: Path, link: str) -> None:
    """``dst`` becomes a hard link to (or a copy of) ``src``, atomically; an existing link is kept."""
    try:
        if dst.is_file() and os.path.samefile(src, dst):
            return
    except OSError:
        pass
    with atomic_path(dst) as tmp:
        tmp.unlink()
        if link == "hardlink":
            try:
                os.link(src, tmp)
                return
            except OSError:  # another file system, or links not allowed: copy
                pass
        shutil.copy2(src, tmp)


def run_unit(unit: WorkUnit, recipe, dataset_dir: Path) -> list[ClipRecord]:
    """Link (or copy) one member's clips and frames into the union; a missing file fails that clip only."""
    source: UnionSource = recipe.source
    records = []
    for item in unit.items:
        family, member_dir, row = item["family"], Path(item["member_dir"]), item["clip"]
        clip_id = safe_id(f"{family}-{row['clip_id']}")
        label_dir = label_dirname(row["label"])
        group = row.get("group") or ""
        record = ClipRecord(
            clip_id=clip_id,
            label=row["label"],
            split=row["split"],
            source=f"{family}:{row['clip_id']} ({row['source']})",
            group=f"{family}:{group}" if group else "",
            soundfont=row.get("soundfont") or "",
            family=family,
        )
        try:
            src = inside(member_dir, row["audio_path"])
            rel = f"clips/{label_dir}/{clip_id}{src.suffix}"
            _place(src, Path(dataset_dir) / rel, source.link)
            frames = []
            for frame in row.get("frame_paths") or []:
                frame_src = inside(member_dir, frame)
                frame_rel = f"frames/{label_dir}/{clip_id}/{frame_src.name}"
                _place(frame_src, Path(dataset_dir) / frame_rel, source.link)
                frames.append(frame_rel)
            cached = member_dir / STATE_SCORES / f"{safe_id(row['clip_id'])}.json"
            own = Path(dataset_dir) / STATE_SCORES / f"{clip_id}.json"
            if cached.is_file() and not own.exists():
                _place(cached, own, "copy")
        except (OSError, UnsafePathError) as exc:
            record.status, record.reason = "failed", f"missing_file: {member_dir}: {exc}"
            records.append(record)
            continue
        record.audio_path, record.frame_paths = rel, frames
        record.duration_s, record.sample_rate = float(row["duration_s"]), int(row["sample_rate"])
        records.append(record)
    return records


def mixture_pair_kind(row: dict[str, Any]) -> str:
    """A fixed mixture's pair kind for reports: its family for a within pair, ``a+b`` across, ``""`` without pairing."""
    families = sorted(set(row.get("source_families") or []))
    return "+".join(families) if row.get("pair_type") else ""


def source_groups(dataset_dir: str | Path, split: str = "test") -> dict[tuple[str, str], dict[str, str]]:
    """``(mixture_id, source label) -> {"pair_kind", "family", "soundfont"}`` for a built dataset's fixed
    mixtures: how reports break a union's scores down (pair kinds, soundfonts of instrument sources)."""
    from marsctl.data.manifest import load_clips, load_mixtures

    clips = load_clips(dataset_dir)
    soundfont = dict(zip(clips["clip_id"], clips["soundfont"])) if "soundfont" in clips.column_names else {}
    groups = {}
    for row in load_mixtures(dataset_dir, split=split):
        families = list(row.get("source_families") or [""] * len(row["source_labels"]))
        for label, clip_id, family in zip(row["source_labels"], row["source_clip_ids"], families):
            groups[(row["mixture_id"], label)] = {"pair_kind": mixture_pair_kind(row), "family": family,
                                                  "soundfont": soundfont.get(clip_id) or ""}
    return groups
