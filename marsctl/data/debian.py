"""Recipe source ``debian``: real recorded sounds from Debian data packages, labelled by file-name rules.

The recipe's ``debian:`` section lists **rules**; each names a package, a ``glob`` or a
``regex`` on the path of a file inside the unpacked package (after the package's entry in
``prefixes``), the class ``label``, the recording ``group`` the files belong to and the
group's ``split``::

    debian:
      prefixes: {megaglest-data: usr/share/games/megaglest/}
      rules:
        - {package: megaglest-data, regex: 'techs/megapack/commondata/sounds/pig_die\\d\\.wav',
           label: pig, group: megaglest-pig-die, split: test}

**Archives.** Games often pack their sounds into a zip file (``.pk3``, ``.wz``, ``.zip``). A rule
with ``archive: <path of the zip in the package>`` matches its ``glob``/``regex`` against the
*members* of that zip instead; the matched members are extracted once into the cache next to the
unpacked package (``<package>_<version>.members/``) and recorded as ``<archive>!<member>``. A
missing or unreadable archive makes its rules match nothing (one logged skip each).

Packages come from a ``debs`` folder, the cache, or ``apt-get download`` (see
:mod:`marsctl.data.debian_packages`; nothing is installed). A package that cannot be had is
one logged skip; the build goes on and exits non-zero at the end.

**Splits by recording group.** All takes of one recording (one file, or the numbered takes of
one effect) form a group, and all clips made from a group go to the group's split. Identical
files (games ship the same ``rain.ogg`` in several folders) are de-duplicated by content
hash; one content in two splits, a file matched by two rules, or a group given two labels or
splits is refused (:class:`ConfigError`). A rule with ``per_file: true`` makes every file it
matches a group of its own (``<group>.<file stem>``, all in the rule's split): for collections of
distinct recordings (one word, one laugh per file) that would otherwise be pooled into one group.

**Clips** are ``clip_seconds`` long at the signal rate (16 kHz mono): a recording at least that
long is cut into consecutive windows (at most ``max_windows_per_recording``); the shorter
takes of a group are played one after another in a seeded order with seeded silent gaps (a
walk, a flock), as many sequences as the material supports (at most
``max_sequences_per_group``). One work unit = one group; reruns reuse finished groups.

**Provenance**: ``provenance/debian.json`` (package versions, ``.deb`` SHA-256, every group's
takes with their content hashes), ``licenses/<package>.copyright`` (the package's Debian
copyright file), and each clip's ``source`` column naming the package, version and files it
was made from.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from marsctl.audio import load_audio, save_audio
from marsctl.data.debian_packages import PackageInfo, PackageUnavailable, default_cache_dir, obtain_package
from marsctl.data.paths import label_dirname, safe_id
from marsctl.data.recipe import DataRecipe
from marsctl.data.records import ClipRecord, SkippedRow, WorkUnit, fingerprint
from marsctl.errors import AudioError, ConfigError
from marsctl.files import atomic_path, sha256_file, write_json_atomic

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
PROVENANCE_FILE = "provenance/debian.json"
_RULE_KEYS = {"package", "glob", "regex", "label", "group", "split", "archive", "per_file"}
ARCHIVE_SEPARATOR = "!"


@dataclass(frozen=True)
class Rule:
    """Files of ``package`` whose path (relative to the unpacked package) fully matches ``pattern``
    are takes of recording ``group`` with class ``label``; the group belongs to ``split``."""

    package: str
    pattern: str  # a regular expression on the whole path
    label: str
    group: str
    split: str
    #: a zip file in the package (path relative to the unpacked package): ``pattern`` matches its members
    archive: str = ""
    #: every matched file is a recording group of its own, ``<group>.<file stem>`` (all in ``split``)
    per_file: bool = False

    def group_of(self, path: str) -> str:
        """The recording group of the matched file ``path``."""
        if not self.per_file:
            return self.group
        stem = path.rsplit("/", 1)[-1].rsplit(ARCHIVE_SEPARATOR, 1)[-1]
        return f"{self.group}.{safe_id(stem.rsplit('.', 1)[0] if '.' in stem else stem)}"


def glob_to_regex(glob: str) -> str:
    """A glob on ``/``-separated paths as a regex: ``**`` spans folders, ``*`` and ``?`` stay within one."""
    out, i = [], 0
    while i < len(glob):
        if glob.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif glob.startswith("**", i):
            out.append(".*")
            i += 2
        elif glob[i] == "*":
            out.append("[^/]*")
            i += 1
        elif glob[i] == "?":
            out.append("[^/]")
            i += 1
        elif glob[i] == "[" and "]" in glob[i + 2 :]:
            end = glob.index("]", i + 2)
            body = glob[i + 1 : end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            out.append(re.escape(glob[i]))
            i += 1
    return "".join(out)


def parse_rule(entry: object, prefixes: dict[str, str], where: str) -> Rule:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: a rule must be a mapping, got {entry!r}")
    unknown = sorted(set(entry) - _RULE_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_RULE_KEYS))}")
    missing = [k for k in ("package", "label", "group", "split") if not entry.get(k)]
    if missing:
        raise ConfigError(f"{where}: missing {', '.join(missing)}")
    if ("glob" in entry) == ("regex" in entry):
        raise ConfigError(f"{where}: give exactly one of glob or regex")
    if entry["split"] not in SPLITS:
        raise ConfigError(f"{where}: split must be one of {', '.join(SPLITS)}, got {entry['split']!r}")
    package = str(entry["package"])
    body = glob_to_regex(str(entry["glob"])) if "glob" in entry else str(entry["regex"])
    try:
        re.compile(body)
    except re.error as exc:
        raise ConfigError(f"{where}: invalid regex {body!r} ({exc})") from None
    label, group, split = str(entry["label"]), str(entry["group"]), str(entry["split"])
    per_file = entry.get("per_file", False)
    if not isinstance(per_file, bool):
        raise ConfigError(f"{where}: per_file must be true or false, got {per_file!r}")
    if "archive" in entry:  # the pattern is on the archive's members; the prefix goes with the archive's path
        archive = str(entry["archive"] or "")
        parts = archive.split("/")
        if not archive or archive.startswith("/") or ".." in parts or ARCHIVE_SEPARATOR in archive:
            raise ConfigError(f"{where}: archive must be a relative path inside the package, got {entry['archive']!r}")
        return Rule(package, "(?:" + body + ")", label, group, split, prefixes.get(package, "") + archive, per_file)
    return Rule(package, re.escape(prefixes.get(package, "")) + "(?:" + body + ")", label, group, split, per_file=per_file)


@dataclass(frozen=True)
class DebianSource:
    """Sounds from Debian data packages, labelled by file-name rules (see :mod:`marsctl.data.debian`)."""

    #: file-name -> label rules: {package, glob | regex, label, group, split}
    rules: list[dict] = field(default_factory=list)
    #: package -> folder prefix of its rules' paths (e.g. usr/share/games/minetest/)
    prefixes: dict[str, str] = field(default_factory=dict)
    #: a folder that already holds the .deb files (checked before the cache and the download)
    debs: Optional[str] = None
    #: where .deb files are downloaded and unpacked (null: ~/.cache/marsctl/debian)
    cache_dir: Optional[str] = None
    #: apt-get download packages that are neither in debs nor in the cache
    download: bool = True
    clip_seconds: float = 6.0
    max_windows_per_recording: int = 6
    max_sequences_per_group: int = 6
    #: silent gap between the takes of a sequence, drawn from [low, high] seconds
    gap_seconds: list[float] = field(default_factory=lambda: [0.15, 0.45])
    seed: int = 0
    workers: int = 1

    def __post_init__(self) -> None:
        parsed = self.parsed_rules()
        if not parsed:
            raise ConfigError("debian: the recipe has no rules")
        first: dict[str, Rule] = {}
        for rule in parsed:
            seen = first.setdefault(rule.group, rule)
            if (seen.label, seen.split) != (rule.label, rule.split):
                raise ConfigError(
                    f"debian: group {rule.group!r} has rules with label/split {seen.label}/{seen.split} and {rule.label}/{rule.split}"
                )
        if len(self.gap_seconds) != 2 or not 0 <= self.gap_seconds[0] <= self.gap_seconds[1]:
            raise ConfigError(f"debian.gap_seconds must be [low, high] with 0 <= low <= high, got {self.gap_seconds}")
        if not 0 < self.clip_seconds <= 600:
            raise ConfigError(f"debian.clip_seconds must be in (0, 600] seconds, got {self.clip_seconds}")
        for key in ("max_windows_per_recording", "max_sequences_per_group", "workers"):
            if not 1 <= getattr(self, key) <= 10_000:
                raise ConfigError(f"debian.{key} must be in 1..10000, got {getattr(self, key)}")
        if self.seed < 0:
            raise ConfigError(f"debian.seed must be in 0.., got {self.seed}")

    def parsed_rules(self) -> tuple[Rule, ...]:
        return tuple(parse_rule(entry, self.prefixes, f"debian.rules[{i}]") for i, entry in enumerate(self.rules))

    def packages(self) -> list[str]:
        return list(dict.fromkeys(str(entry["package"]) for entry in self.rules))

    def cache_path(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()


@dataclass(frozen=True)
class Take:
    """One file of a recording group."""

    package: str
    version: str
    path: str  # relative to the unpacked package
    file: str  # where it lies now (in the cache)
    sha256: str

    @property
    def source(self) -> str:
        return f"{self.package}={self.version}:{self.path}"


@dataclass(frozen=True)
class GroupPlan:
    group: str
    label: str
    split: str
    takes: tuple[Take, ...]


def match_rules(packages: dict[str, PackageInfo], rules: tuple[Rule, ...]) -> tuple[list[GroupPlan], list[Rule]]:
    """The recording groups (takes sorted, duplicate contents dropped) and the rules that matched nothing.

    Rules of packages not in ``packages`` are ignored (those packages were skipped). Raises
    :class:`ConfigError` when a file matches two rules, one content falls in two splits, or a
    ``per_file`` group's name is taken by a group of another label or split.
    """
    compiled = [(rule, re.compile(rule.pattern)) for rule in rules if rule.package in packages]
    takes: dict[str, list[Take]] = {}
    meta: dict[str, Rule] = {}  # recording group -> the first rule that gave it takes
    owner: dict[tuple[str, str], Rule] = {}
    split_of_content: dict[str, tuple[str, Take]] = {}
    matched: set[int] = set()
    for name, info in packages.items():
        mine = [(i, rule, pattern) for i, (rule, pattern) in enumerate(compiled) if rule.package == name]
        if not mine:
            continue
        plain = [m for m in mine if not m[1].archive]
        # (path recorded, name the patterns match, file on disk, rules that apply)
        candidates = [(rel, rel, p, plain) for p in sorted(p for p in info.root.rglob("*") if p.is_file() and not p.is_symlink())
                      for rel in [p.relative_to(info.root).as_posix()]] if plain else []
        for archive in dict.fromkeys(m[1].archive for m in mine if m[1].archive):
            inside = [m for m in mine if m[1].archive == archive]
            candidates += [(f"{archive}{ARCHIVE_SEPARATOR}{member}", member, path, inside)
                           for member, path in archive_members(info, archive, {m[1].pattern for m in inside})]
        for rel, member, path, rules_here in candidates:
            for index, rule, pattern in rules_here:
                if not pattern.fullmatch(member):
                    continue
                if (name, rel) in owner:
                    raise ConfigError(f"debian: {name}:{rel} matches two rules (groups {owner[name, rel].group} and {rule.group})")
                owner[name, rel] = rule
                matched.add(index)
                take = Take(name, info.version, rel, str(path), sha256_file(path))
                if take.sha256 in split_of_content:
                    split, first = split_of_content[take.sha256]
                    if split != rule.split:
                        raise ConfigError(
                            f"debian: {name}:{rel} ({rule.split}) has the same content as {first.package}:{first.path} ({split})"
                        )
                    continue  # an identical copy: the first one is kept
                split_of_content[take.sha256] = (rule.split, take)
                group = rule.group_of(rel)
                seen = meta.setdefault(group, rule)
                if (seen.label, seen.split) != (rule.label, rule.split):
                    raise ConfigError(f"debian: group {group!r} ({name}:{rel}) has label/split {seen.label}/{seen.split} and {rule.label}/{rule.split}")
                takes.setdefault(group, []).append(take)
    groups = [GroupPlan(g, meta[g].label, meta[g].split, tuple(found)) for g, found in takes.items()]
    unmatched = [rule for i, (rule, _) in enumerate(compiled) if i not in matched]
    return sorted(groups, key=lambda g: g.group), unmatched


def _safe_member(name: str) -> bool:
    parts = name.split("/")
    return bool(name) and not name.startswith("/") and ".." not in parts and ARCHIVE_SEPARATOR not in name and "\\" not in name


def archive_members(info: PackageInfo, archive: str, patterns: set[str]) -> list[tuple[str, Path]]:
    """The members of zip ``archive`` (in ``info``'s tree) that some pattern matches, extracted once into the cache.

    Extracted members live under ``<unpacked>.members/<archive>/`` (written atomically, so one
    already there with the member's size is complete and reused). A missing or unreadable
    archive is one warning and no members.
    """
    path = info.root / archive
    regexes = [re.compile(p) for p in patterns]
    out: list[tuple[str, Path]] = []
    try:
        with zipfile.ZipFile(path) as zf:
            for item in sorted(zf.infolist(), key=lambda i: i.filename):
                name = item.filename
                if item.is_dir() or not _safe_member(name) or not any(r.fullmatch(name) for r in regexes):
                    continue
                target = info.root.parent / f"{info.root.name}.members" / archive / name
                if not (target.is_file() and target.stat().st_size == item.file_size):
                    with atomic_path(target) as tmp, zf.open(item) as src, open(tmp, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                out.append((name, target))
    except (OSError, zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
        log.warning("debian: cannot read archive %s in %s: %s", archive, info.name, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return []
    return out


def make_clips(waves: list[np.ndarray], source: DebianSource, sample_rate: int, rng: np.random.Generator) -> list[tuple[np.ndarray, list[int]]]:
    """Clips of exactly ``clip_seconds`` from one group's takes, each with the indices of the takes in it."""
    length = int(round(source.clip_seconds * sample_rate))
    clips: list[tuple[np.ndarray, list[int]]] = []
    for index, wave in enumerate(waves):  # long recordings: consecutive windows
        if len(wave) >= length:
            windows = min(len(wave) // length, source.max_windows_per_recording)
            clips += [(wave[i * length : (i + 1) * length], [index]) for i in range(windows)]
    short = [i for i, w in enumerate(waves) if len(w) < length]  # short takes: seeded sequences
    if not short:
        return clips
    total = sum(len(waves[i]) for i in short)
    count = max(2, min(source.max_sequences_per_group, math.ceil(3 * total / length)))
    low, high = (int(g * sample_rate) for g in source.gap_seconds)
    for _ in range(count):
        pieces: list[np.ndarray] = []
        used: list[int] = []
        filled = 0
        order: list[int] = []
        while filled < length:
            if not order:
                order = [short[j] for j in rng.permutation(len(short))]
            take = order.pop()
            gap = np.zeros(int(rng.integers(low, high + 1)), dtype=np.float32)
            pieces += [waves[take], gap]
            used.append(take)
            filled += len(waves[take]) + len(gap)
        start = int(rng.integers(0, min(len(waves[short[0]]), high) + 1)) if len(short) == 1 else 0
        clip = np.concatenate(pieces)[start : start + length]
        if len(clip) < length:
            clip = np.pad(clip, (0, length - len(clip)))
        clips.append((clip.astype(np.float32), sorted(set(used))))
    return clips


def group_seed(seed: int, group: str) -> int:
    return int(hashlib.sha1(f"{seed}:{group}".encode("utf-8")).hexdigest()[:8], 16)


def apply_options(recipe: DataRecipe, options, dataset_dir: Path | None = None) -> DataRecipe:
    """A ``debs`` folder given on the command line (``FetchOptions.debs``, when the CLI has it) replaces the recipe's."""
    debs = getattr(options, "debs", None)
    if debs:
        return recipe.with_source(debs=str(Path(debs).expanduser().resolve()))
    return recipe


def obtain_packages(source: DebianSource) -> tuple[dict[str, PackageInfo], list[SkippedRow]]:
    """Every package of the rules that can be had; one skipped row (and one log line) per package that cannot."""
    debs = Path(source.debs).expanduser() if source.debs else None
    found: dict[str, PackageInfo] = {}
    skipped: list[SkippedRow] = []
    for package in source.packages():
        try:
            found[package] = obtain_package(package, source.cache_path(), debs, source.download)
        except PackageUnavailable as exc:
            log.warning("debian: skipped package %s: %s", package, exc)
            skipped.append(SkippedRow(f"debian package {package}", str(exc), "package_unavailable"))
        except OSError as exc:
            log.warning("debian: skipped package %s: %s", package, exc)
            skipped.append(SkippedRow(f"debian package {package}", f"{type(exc).__name__}: {exc}", "package_unavailable"))
    return found, skipped


def write_provenance(dataset_dir: Path, packages: dict[str, PackageInfo], groups: list[GroupPlan], source: DebianSource) -> None:
    """``provenance/debian.json`` and ``licenses/<package>.copyright`` in the dataset."""
    licences = {}
    for name, info in packages.items():
        copyright_file = info.copyright_file()
        if copyright_file is not None:
            rel = f"licenses/{safe_id(name)}.copyright"
            with atomic_path(dataset_dir / rel) as tmp:
                shutil.copyfile(copyright_file, tmp)
            licences[name] = rel
    record = {
        "packages": {n: {**i.to_dict(), "copyright": licences.get(n)} for n, i in packages.items()},
        "rules": list(source.rules),
        "prefixes": dict(source.prefixes),
        "groups": {
            g.group: {"label": g.label, "split": g.split, "takes": [{"source": t.source, "sha256": t.sha256} for t in g.takes]}
            for g in groups
        },
    }
    write_json_atomic(dataset_dir / PROVENANCE_FILE, record)


def plan_units(recipe: DataRecipe, dataset_dir: Path, options) -> tuple[list[WorkUnit], list[SkippedRow]]:
    """Get and unpack the packages, match the rules, record provenance; one unit per recording group."""
    source: DebianSource = recipe.source
    packages, skipped = obtain_packages(source)
    groups, unmatched = match_rules(packages, source.parsed_rules())
    for rule in unmatched:
        log.warning("debian: rule of group %s matches no file in %s", rule.group, rule.package)
        skipped.append(SkippedRow(f"debian rule {rule.group} ({rule.package})", "matches no file in the package", "rule_matches_nothing"))
    allowed = set(recipe.labels)
    if allowed:
        for g in [g for g in groups if g.label not in allowed]:
            skipped.append(SkippedRow(f"debian group {g.group}", f"unknown label {g.label!r} (not in the recipe's labels)", "unknown_label"))
        groups = [g for g in groups if g.label in allowed]
    write_provenance(Path(dataset_dir), packages, groups, source)
    settings = (source.clip_seconds, source.max_windows_per_recording, source.max_sequences_per_group,
                list(source.gap_seconds), source.seed, recipe.signal.sample_rate)
    units = [
        WorkUnit(
            unit_id=safe_id(f"debian-{g.group}"),
            items=[g],
            description=f"{g.group} ({g.label}, {g.split}, {len(g.takes)} files)",
            fingerprint=fingerprint(g.group, g.label, g.split, [(t.source, t.sha256) for t in g.takes], settings),
        )
        for g in groups
    ]
    return units, skipped


def run_unit(unit: WorkUnit, recipe: DataRecipe, dataset_dir: Path) -> list[ClipRecord]:
    """Cut or sequence one recording group's takes into clips (FLAC) and return their records."""
    source: DebianSource = recipe.source
    sr = recipe.signal.sample_rate
    group: GroupPlan = unit.items[0]
    slug = safe_id(group.group)  # unique per group (a hash is appended when characters had to change)
    records: list[ClipRecord] = []
    waves, used = [], []
    for take in group.takes:
        try:
            waves.append(load_audio(take.file, sr))
            used.append(take)
        except AudioError as exc:  # one unreadable file never stops the others
            records.append(ClipRecord(clip_id=safe_id(f"{slug}__{Path(take.path).name}"), label=group.label, split=group.split,
                                      source=f"debian:{take.source}", group=group.group, status="failed", reason=f"unreadable: {exc}"))
    if not waves:
        return records
    rng = np.random.default_rng(group_seed(source.seed, group.group))
    for k, (clip, indices) in enumerate(make_clips(waves, source, sr, rng)):
        clip_id = f"{slug}__{k:02d}"
        rel = f"clips/{label_dirname(group.label)}/{clip_id}.flac"
        save_audio(dataset_dir / rel, clip, sr)
        records.append(ClipRecord(
            clip_id=clip_id, label=group.label, split=group.split,
            source="debian:" + "; ".join(used[i].source for i in indices) + f" [group {group.group}]",
            audio_path=rel, duration_s=len(clip) / sr, sample_rate=sr, group=group.group,
        ))
    return records
