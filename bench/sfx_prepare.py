"""Prepare the environmental-sound half of the offline benchmark from Debian game data packages.

Real recorded sound effects ship inside three Debian ``main`` packages (free licences, see
``licenses/`` in the output):

* ``minetest-data``  (Minetest game: fire, water, footsteps on ten surfaces, wood chopping; CC-BY-SA 3.0 / CC0)
* ``megaglest-data`` (MegaGlest: rain, farm animals, wood harvesting, water splashes; CC-BY-SA 3.0)
* ``freedink-data``  (FreeDink: fire, burning, axe; GPL-3+ / free-art)

This script downloads them (``apt-get download``; or give ``--debs DIR`` with the ``.deb``
files), unpacks them with ``dpkg-deb -x`` into a cache, applies the **file-name -> label
rules** in :data:`RULES` and lays the audio out as the ``folder`` recipe wants it::

    <out>/audio/<label>/<split>/<group>__<k>.flac     # 16 kHz mono, 6 s clips
    <out>/provenance.json                            # package versions, .deb sha256, rules, clip -> source files
    <out>/licenses/<package>.copyright               # each package's Debian copyright file

then ``marsctl data build recipes/data/debian-sfx.yaml --root <out>/audio --out data/debian-sfx``.

Splits are kept apart by **recording group**: every rule names a group (one recording, or the
numbered takes of one effect, e.g. ``megaglest:pig_die`` = ``pig_die1..4.wav``) and a split;
all clips made from a group go to that group's split, so no recording is heard in both train
and test. Identical files (MegaGlest ships the same ``rain.ogg`` in several tilesets) are
de-duplicated by content hash before anything else; the script refuses to write a layout in
which one file's content would land in two splits.

Clips: most game effects are short one-shots (a footstep is 0.2 s, a cluck 1 s). Each clip is
``clip_seconds`` long: a recording at least that long is cut into consecutive windows (at most
``max_windows_per_recording``); shorter takes of one group are played one after another in a
seeded random order with seeded silent gaps (the way a game plays them: a walk, a flock), as
many sequences per group as its material supports (at most ``max_sequences_per_group``).
Everything is seeded (``--seed``): a rerun writes the same files. Existing clips are kept
(resumable); writes are atomic.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from marsctl.audio import load_audio, save_audio  # noqa: E402
from marsctl.errors import AudioError, MarsctlError  # noqa: E402
from marsctl.files import write_json_atomic  # noqa: E402

SAMPLE_RATE = 16_000
PACKAGES = ("minetest-data", "megaglest-data", "freedink-data")

# Where each package keeps its sounds (prefix of the paths the rules match).
_MT = "usr/share/games/minetest/games/minetest_game/mods/"
_MG = "usr/share/games/megaglest/"
_FD = "usr/share/games/dink/dink/Sound/"


@dataclass(frozen=True)
class Rule:
    """Files of ``package`` whose path (relative to the unpacked package) fully matches ``pattern``
    are takes of recording ``group`` with class ``label``; the group goes to ``split``."""

    package: str
    pattern: str
    label: str
    group: str
    split: str


def _mt(stem: str, label: str, group: str, split: str) -> Rule:
    # minetest_game sounds: mods/<mod>/sounds/<stem>[.N].ogg (N = take number)
    return Rule("minetest-data", _MT + r"[a-z_]+/sounds/" + stem + r"(\.\d+)?\.ogg", label, "minetest:" + group, split)


def _mg(path_regex: str, label: str, group: str, split: str) -> Rule:
    return Rule("megaglest-data", _MG + path_regex, label, "megaglest:" + group, split)


def _fd(name: str, label: str, split: str) -> Rule:
    return Rule("freedink-data", _FD + re.escape(name), label, "freedink:" + name.rsplit(".", 1)[0], split)


_ANIMALS = _MG + r"techs/megapack/"
#: The file-name -> label rules. One line per recording group; the split is the group's.
RULES: tuple[Rule, ...] = (
    # fire: crackling fires
    _mt("fire_fire", "fire", "fire_fire", "train"),
    _mt("fire_large", "fire", "fire_large", "train"),
    _fd("burn.wav", "fire", "val"),
    _mt("fire_small", "fire", "fire_small", "test"),
    _fd("fire.wav", "fire", "test"),
    # water: streams and splashing
    _mt(r"env_sounds_water\.[123]", "water", "env_sounds_water_123", "train"),
    _mt(r"env_sounds_water\.4", "water", "env_sounds_water_4", "val"),
    _mt("default_water_footstep", "water", "water_footstep", "test"),
    _mg(r"data/core/water_sounds/water\d\.wav", "water", "water_splash", "test"),
    # rain: four distinct recordings (the tilesets share files; the duplicates are dropped by hash)
    _mg(r"tilesets/birch_forest/sounds/rain\.ogg", "rain", "rain_birch_forest", "train"),
    _mg(r"tilesets/autumn/sounds/rain\.ogg", "rain", "rain_autumn", "train"),
    _mg(r"tilesets/dark_forest/sounds/rain\.ogg", "rain", "rain_dark_forest", "val"),
    _mg(r"tilesets/desert2/sounds/rain\.wav", "rain", "rain_desert", "test"),
    # footsteps: one group per surface
    *(_mt(f"default_{s}_footstep", "footsteps", f"{s}_footstep", "train") for s in ("grass", "gravel", "sand", "snow", "dirt", "hard")),
    _mt("default_ice_footstep", "footsteps", "ice_footstep", "val"),
    *(_mt(f"default_{s}_footstep", "footsteps", f"{s}_footstep", "test") for s in ("wood", "metal", "glass")),
    # wood chopping: an axe on wood
    _mt("default_dig_choppy", "wood chopping", "dig_choppy", "train"),
    _fd("axe.wav", "wood chopping", "val"),
    _mg(r"techs/megapack/commondata/sounds/worker_harvest_wood\d\.wav", "wood chopping", "harvest_wood", "test"),
    # farm animals (MegaGlest units: ack/select/die/standing takes are separate recording groups)
    _mg(r"techs/megapack/factions/egypt/units/chicken/sounds/chicken_(ack|select)\d\.wav", "chicken", "chicken_ack_select", "train"),
    _mg(r"tilesets/autumn/sounds/rooster\.ogg", "chicken", "rooster", "train"),
    _mg(r"techs/megapack/factions/egypt/units/chicken/sounds/chicken_standing\d\.wav", "chicken", "chicken_standing", "val"),
    _mg(r"techs/megapack/factions/egypt/units/chicken/sounds/chicken_die\d\.wav", "chicken", "chicken_die", "test"),
    _mg(r"tilesets/birch_forest/sounds/chicken\.wav", "chicken", "chicken_tileset", "test"),
    _mg(r"techs/megapack/factions/persian/units/sheep/sounds/sheep\d+\.wav", "sheep", "sheep", "train"),
    _mg(r"techs/megapack/factions/persian/units/sheep/sounds/sheep_die\d\.wav", "sheep", "sheep_die", "test"),
    _mg(r"techs/megapack/commondata/sounds/pig_(ack|select)\d\.wav", "pig", "pig_ack_select", "train"),
    _mg(r"techs/megapack/commondata/sounds/pig_die\d\.wav", "pig", "pig_die", "test"),
    _mg(r"techs/megapack/commondata/sounds/cow_(ack|select)\d\.wav", "cow", "cow_ack_select", "train"),
    _mg(r"techs/megapack/factions/indian/units/bull/sounds/bull_\w+\d\.wav", "cow", "bull", "train"),
    _mg(r"techs/megapack/commondata/sounds/cow_die\d\.wav", "cow", "cow_die", "test"),
    _mg(r"tilesets/pine_peat/sounds/mudchute_cow_1\.ogg", "cow", "mudchute_cow", "test"),
)
LABELS = tuple(dict.fromkeys(r.label for r in RULES))


@dataclass(frozen=True)
class ClipSettings:
    clip_seconds: float = 6.0
    max_windows_per_recording: int = 6
    max_sequences_per_group: int = 6
    gap_seconds: tuple[float, float] = (0.15, 0.45)
    seed: int = 0


# --------------------------------------------------------------------------- fetching


def _run(args: list[str], cwd: Path | None = None) -> None:
    try:
        subprocess.run(args, cwd=cwd, check=True, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise MarsctlError(f"{args[0]}: command not found (this script needs Debian's apt-get and dpkg-deb)") from exc
    except subprocess.CalledProcessError as exc:
        last = (exc.stderr or exc.stdout or "").strip().splitlines()[-1:] or ["no output"]
        raise MarsctlError(f"{' '.join(args[:2])} failed (exit {exc.returncode}): {last[0]}") from exc


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_packages(cache: Path, debs: Path | None = None, packages: tuple[str, ...] = PACKAGES) -> dict[str, dict]:
    """Download (unless found in ``debs`` or the cache) and unpack each package; returns
    ``{package: {"deb": path, "version": ..., "sha256": ..., "root": unpacked dir}}``."""
    cache.mkdir(parents=True, exist_ok=True)
    info: dict[str, dict] = {}
    for package in packages:
        found = sorted((debs or cache).glob(f"{package}_*.deb")) or sorted(cache.glob(f"{package}_*.deb"))
        if not found:
            _run(["apt-get", "download", package], cwd=cache)
            found = sorted(cache.glob(f"{package}_*.deb"))
            if not found:
                raise MarsctlError(f"apt-get download {package} wrote no .deb into {cache}")
        deb = found[-1]
        version = deb.name.split("_")[1].replace("%3a", ":")
        unpacked = cache / "unpacked" / f"{package}_{deb.stem.split('_')[1]}"
        if not (unpacked / ".complete").is_file():
            if unpacked.exists():
                shutil.rmtree(unpacked)
            staging = Path(tempfile.mkdtemp(prefix=f".{package}-", dir=cache))
            _run(["dpkg-deb", "-x", str(deb), str(staging)])
            (staging / ".complete").write_text(deb.name + "\n", encoding="utf-8")
            unpacked.parent.mkdir(parents=True, exist_ok=True)
            staging.rename(unpacked)
        info[package] = {"deb": deb.name, "version": version, "sha256": _sha256(deb), "root": unpacked}
    return info


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Take:
    package: str
    path: str  # relative to the unpacked package
    sha1: str


def match_rules(roots: dict[str, Path], rules: tuple[Rule, ...] = RULES) -> dict[Rule, list[Take]]:
    """The takes of every rule (sorted, de-duplicated by content). Raises if a rule matches nothing,
    a file matches two rules, or one content hash falls in two splits."""
    compiled = [(rule, re.compile(rule.pattern)) for rule in rules]
    takes: dict[Rule, list[Take]] = {rule: [] for rule in rules}
    owner_of_file: dict[tuple[str, str], Rule] = {}
    split_of_hash: dict[str, tuple[str, Take]] = {}
    for package, root in roots.items():
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            rel = path.relative_to(root).as_posix()
            for rule, pattern in compiled:
                if rule.package != package or not pattern.fullmatch(rel):
                    continue
                if (package, rel) in owner_of_file:
                    raise MarsctlError(f"{package}:{rel} matches two rules ({owner_of_file[package, rel].group}, {rule.group})")
                owner_of_file[package, rel] = rule
                sha1 = hashlib.sha1(path.read_bytes()).hexdigest()
                take = Take(package, rel, sha1)
                if sha1 in split_of_hash:
                    split, first = split_of_hash[sha1]
                    if split != rule.split:
                        raise MarsctlError(f"{package}:{rel} has the same content as {first.package}:{first.path} but another split")
                    continue  # a duplicate file: keep the first copy only
                split_of_hash[sha1] = (rule.split, take)
                takes[rule].append(take)
    empty = [rule.group for rule, found in takes.items() if not found]
    if empty:
        raise MarsctlError(f"no file matches the rule(s) {', '.join(empty)}: is this the package version the rules were written for?")
    return takes


# --------------------------------------------------------------------------- clips


def make_clips(waves: list[np.ndarray], settings: ClipSettings, rng: np.random.Generator) -> list[np.ndarray]:
    """Clips of exactly ``clip_seconds`` from one recording group's takes (see the module docstring)."""
    length = int(round(settings.clip_seconds * SAMPLE_RATE))
    clips: list[np.ndarray] = []
    for wave in (w for w in waves if len(w) >= length):  # long recordings: consecutive windows
        windows = min(len(wave) // length, settings.max_windows_per_recording)
        clips += [wave[i * length : (i + 1) * length] for i in range(windows)]
    waves = [w for w in waves if len(w) < length]  # short takes: seeded sequences
    if not waves:
        return clips
    total = sum(len(w) for w in waves)
    count = max(2, min(settings.max_sequences_per_group, math.ceil(3 * total / length)))
    low, high = (int(g * SAMPLE_RATE) for g in settings.gap_seconds)
    for _ in range(count):
        pieces, filled = [], 0
        order: list[int] = []
        while filled < length:
            if not order:
                order = list(rng.permutation(len(waves)))
            take = waves[order.pop()]
            gap = np.zeros(int(rng.integers(low, high + 1)), dtype=np.float32)
            pieces += [take, gap]
            filled += len(take) + len(gap)
        start = int(rng.integers(0, min(len(waves[0]), high) + 1)) if len(waves) == 1 else 0
        clips.append(np.concatenate(pieces)[start : start + length])
        if len(clips[-1]) < length:
            clips[-1] = np.pad(clips[-1], (0, length - len(clips[-1])))
    return clips


def group_slug(group: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", group.lower()).strip("_")


def prepare(out: Path, cache: Path, debs: Path | None = None, settings: ClipSettings = ClipSettings(), progress: bool = True,
            rules: tuple[Rule, ...] = RULES) -> dict:
    """Fetch, match, cut and write the layout; returns the provenance record (also written)."""
    from rich.progress import Progress

    packages = fetch_packages(cache, debs, tuple(dict.fromkeys(r.package for r in rules)))
    takes = match_rules({name: meta["root"] for name, meta in packages.items()}, rules)
    audio_root = out / "audio"
    clips_record: list[dict] = []
    failures: list[str] = []
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("cutting clips", total=len(takes))
        for index, (rule, group_takes) in enumerate(takes.items()):
            waves, used = [], []
            for take in group_takes:
                path = packages[take.package]["root"] / take.path
                try:
                    waves.append(load_audio(path, SAMPLE_RATE))
                    used.append(take)
                except AudioError as exc:  # one unreadable file never stops the others
                    failures.append(str(exc))
            if waves:
                group_seed = int(hashlib.sha1(f"{settings.seed}:{rule.group}".encode()).hexdigest()[:8], 16)
                for k, clip in enumerate(make_clips(waves, settings, np.random.default_rng(group_seed))):
                    rel = Path(rule.label) / rule.split / f"{group_slug(rule.group)}__{k:02d}.flac"
                    target = audio_root / rel
                    if not target.is_file():
                        save_audio(target, clip.astype(np.float32), SAMPLE_RATE)
                    clips_record.append({
                        "path": rel.as_posix(), "label": rule.label, "split": rule.split, "group": rule.group,
                        "sources": [f"{t.package}:{t.path}" for t in used],
                    })
            bar.advance(task)
    licenses = out / "licenses"
    licenses.mkdir(parents=True, exist_ok=True)
    for name, meta in packages.items():
        copyright_file = meta["root"] / "usr/share/doc" / name / "copyright"
        if copyright_file.is_file():
            shutil.copyfile(copyright_file, licenses / f"{name}.copyright")
    record = {
        "packages": {n: {k: v for k, v in m.items() if k != "root"} for n, m in packages.items()},
        "settings": {**settings.__dict__, "gap_seconds": list(settings.gap_seconds), "sample_rate": SAMPLE_RATE},
        "rules": [r.__dict__ for r in rules],
        "groups": {r.group: {"label": r.label, "split": r.split, "takes": [f"{t.package}:{t.path}" for t in ts]} for r, ts in takes.items()},
        "clips": clips_record,
        "failures": failures,
    }
    write_json_atomic(out / "provenance.json", record)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring for the rules.")
    parser.add_argument("--out", type=Path, default=Path("bench_work/debian-sfx"), help="output folder (audio/ goes below it)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "marsctl" / "debian-sfx", help="where .deb files are downloaded and unpacked")
    parser.add_argument("--debs", type=Path, default=None, help="folder that already holds the .deb files (no download)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clip-seconds", type=float, default=6.0)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    try:
        record = prepare(args.out, args.cache, args.debs, ClipSettings(clip_seconds=args.clip_seconds, seed=args.seed), progress=not args.quiet)
    except MarsctlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    counts: dict[tuple[str, str], int] = {}
    for clip in record["clips"]:
        counts[clip["label"], clip["split"]] = counts.get((clip["label"], clip["split"]), 0) + 1
    for label in LABELS:
        print(f"{label:15s} " + "  ".join(f"{s}={counts.get((label, s), 0)}" for s in ("train", "val", "test")))
    print(f"{len(record['clips'])} clips under {args.out / 'audio'}; provenance in {args.out / 'provenance.json'}")
    for failure in record["failures"]:
        print(f"failed: {failure}", file=sys.stderr)
    return 1 if record["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
