"""Offline recipe ``soundfont``: solo-instrument clips of the MUSIC classes rendered with fluidsynth.

Real melodies come from music21's bundled corpus (ABC folk-song collections); a General-MIDI
soundfont (Debian's ``fluid-soundfont-gm``, FluidR3_GM.sf2) plays them. Melodies are split
first (train/val/test use disjoint melodies), then every clip draws, from a generator seeded
by (recipe seed, class, split, index): a melody and a start note, a transposition into the
instrument's range, a velocity (with a little per-note jitter), a tempo and an articulation.

Several soundfonts (``soundfont.soundfonts``: name, path, Debian package): each clip also
draws its soundfont, from its own generator seeded by the same (seed, class, split, index),
among those its split may use (``soundfonts_per_split``; leave-one-soundfont-out = train and
val on all but one, test on that one). The other parameters do not depend on it, so two
recipes that differ only in the soundfonts render the same melodies, notes and levels. The
clip's soundfont is in its record and the manifest's ``soundfont`` column, its melody in
``group``. Without ``soundfonts`` the single ``soundfont`` path renders exactly as before.

A unit of work is one class (one class and soundfont with several soundfonts): one fresh
synthesizer renders all of its clips in a fixed order. (A reused fluidsynth instance is not
bit-exact from one clip to the next, a fresh one is, so a build killed and resumed renders
exactly the same audio.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torchaudio.functional as AF

from marsctl.audio import save_audio
from marsctl.data.paths import label_dirname, safe_id
from marsctl.data.recipe import DEFAULT_SOUNDFONT, DataRecipe, SoundfontSource
from marsctl.data.records import ClipRecord, SkippedRow, WorkUnit, fingerprint
from marsctl.errors import ConfigError

SPLIT_ORDER = ("train", "val", "test")
#: fluidsynth renders in blocks of 64 frames; events are placed on block boundaries
BLOCK = 64
#: a melody needs at least this many notes to be used
MIN_NOTES = 8

Melody = tuple[tuple[int | None, float], ...]  # (MIDI pitch or None for a rest, length in quarter notes)


@dataclass(frozen=True)
class RenderPlan:
    clip_id: str
    label: str
    split: str
    program: int
    melody_name: str
    notes: Melody
    start_note: int
    transpose: int
    velocity: int
    tempo_bpm: float
    articulation: float
    seed: tuple[int, ...]
    loudness_lufs: float | None = None
    #: the ``SoundfontFile.name`` that renders the clip
    soundfont: str = ""
    #: whether the recipe chose among several soundfonts (then ``source`` names the soundfont)
    multi_soundfont: bool = False

    @property
    def source(self) -> str:
        return (
            f"music21:{self.melody_name} program={self.program} transpose={self.transpose:+d} "
            f"velocity={self.velocity} tempo={self.tempo_bpm:.1f} articulation={self.articulation:.2f} "
            f"start_note={self.start_note}"
            + (f" loudness={self.loudness_lufs:.1f}LUFS" if self.loudness_lufs is not None else "")
            + (f" soundfont={self.soundfont}" if self.multi_soundfont else "")
        )


@dataclass(frozen=True)
class SoundfontFile:
    """One soundfont of a recipe: a short name (recorded per clip), its file, the package installing it."""

    name: str
    path: str
    package: str = ""

    def check(self) -> None:
        """One-line ConfigError when the file is missing (naming the package to install)."""
        if not Path(self.path).is_file():
            how = f"apt-get install {self.package}" if self.package else "set its path in the recipe"
            raise ConfigError(f"{self.path}: soundfont {self.name!r} not found ({how})")


def soundfont_files(source: SoundfontSource) -> list[SoundfontFile]:
    """The recipe's soundfonts: ``soundfonts`` if given, else the single ``soundfont`` path."""
    if not source.soundfonts:
        package = "fluid-soundfont-gm" if source.soundfont == DEFAULT_SOUNDFONT else ""
        return [SoundfontFile(Path(source.soundfont).stem, source.soundfont, package)]
    files: list[SoundfontFile] = []
    for i, entry in enumerate(source.soundfonts):
        where = f"soundfont.soundfonts[{i}]"
        if not isinstance(entry, dict) or not {"name", "path", "package"} <= set(entry) or set(entry) - {"name", "path", "package"}:
            raise ConfigError(f"{where}: give exactly name, path and package (the Debian package installing the file), got {entry!r}")
        name = str(entry["name"])
        if safe_id(name) != name:
            raise ConfigError(f"{where}: name {name!r} must be a plain name (letters, digits, '_', '.', '-')")
        if name in {f.name for f in files}:
            raise ConfigError(f"{where}: name {name!r} is used twice")
        files.append(SoundfontFile(name, str(entry["path"]), str(entry["package"])))
    return files


def soundfonts_by_split(source: SoundfontSource) -> dict[str, list[SoundfontFile]]:
    """split -> the soundfonts its clips choose from (``soundfonts_per_split``, default all)."""
    files = soundfont_files(source)
    by_name = {f.name: f for f in files}
    unknown_splits = sorted(set(source.soundfonts_per_split) - set(SPLIT_ORDER))
    if unknown_splits:
        raise ConfigError(f"soundfont.soundfonts_per_split: unknown split(s) {unknown_splits}; use {', '.join(SPLIT_ORDER)}")
    chosen: dict[str, list[SoundfontFile]] = {}
    for split in SPLIT_ORDER:
        names = source.soundfonts_per_split.get(split)
        if names is None:
            chosen[split] = files
            continue
        missing = [n for n in names if n not in by_name]
        if missing or not names:
            raise ConfigError(
                f"soundfont.soundfonts_per_split.{split}: {'unknown soundfont(s) ' + str(missing) if missing else 'empty list'}; "
                f"known: {', '.join(by_name)}"
            )
        chosen[split] = [by_name[n] for n in names]
    return chosen


def _tune_numbers(work: str) -> list[int]:
    from music21 import corpus

    try:
        path = corpus.getWork(work)
    except Exception as exc:  # music21's CorpusException (and whatever a strange name raises)
        raise ConfigError(f"soundfont.melody_works: {work!r} is not a work of music21's corpus ({type(exc).__name__})") from None
    if isinstance(path, list):
        if not path:
            raise ConfigError(f"soundfont.melody_works: {work!r} is not a work of music21's corpus")
        path = path[0]
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    return [int(m) for m in re.findall(r"^X:\s*(\d+)", text, flags=re.MULTILINE)]


@lru_cache(maxsize=4096)
def load_melody(work: str, number: int) -> Melody:
    """The first part of tune ``number`` of a music21 corpus work as (pitch, quarter length) pairs."""
    from music21 import corpus

    score = corpus.parse(work, number=number)
    notes: list[tuple[int | None, float]] = []
    for element in score.flatten().notesAndRests:
        length = float(element.quarterLength)
        if length <= 0:
            continue  # grace notes
        if element.isRest:
            notes.append((None, length))
        elif element.isNote:
            notes.append((int(element.pitch.midi), length))
        else:  # chord: its top note carries the melody
            notes.append((int(max(p.midi for p in element.pitches)), length))
    return tuple(notes)


def melody_pool(source: SoundfontSource) -> dict[str, list[tuple[str, Melody]]]:
    """Disjoint melodies per split, chosen by a seeded shuffle of every tune in ``melody_works``."""
    candidates = [(work, n) for work in source.melody_works for n in _tune_numbers(work)]
    rng = np.random.default_rng([source.seed, 7919])
    order = rng.permutation(len(candidates))
    pool: dict[str, list[tuple[str, Melody]]] = {s: [] for s in SPLIT_ORDER}
    wanted = [(s, int(source.melodies_per_split.get(s, 0))) for s in SPLIT_ORDER]
    cursor = 0
    for split, count in wanted:
        while len(pool[split]) < count and cursor < len(order):
            work, number = candidates[order[cursor]]
            cursor += 1
            try:
                notes = load_melody(work, number)
            except Exception:  # a tune music21 cannot parse is simply not used
                continue
            if sum(1 for p, _ in notes if p is not None) >= MIN_NOTES:
                pool[split].append((f"{work}#{number}", notes))
        if len(pool[split]) < count:
            raise ConfigError(
                f"soundfont: only {len(pool[split])} usable melodies left for split {split!r} "
                f"(wanted {count}); add works to soundfont.melody_works"
            )
    return pool


def plan_units(recipe: DataRecipe, dataset_dir: Path | None = None, options=None) -> tuple[list[WorkUnit], list[SkippedRow]]:
    """One unit per class (per class and soundfont with several); every clip's parameters fixed here.

    ``dataset_dir`` and ``options`` are unused (the signature every source kind shares).
    """
    source = recipe.soundfont
    assert source is not None
    labels = recipe.labels or sorted(source.programs)
    skipped: list[SkippedRow] = []
    pool = melody_pool(source)
    choices = soundfonts_by_split(source)
    multi = bool(source.soundfonts)
    for split in SPLIT_ORDER:
        if int(source.clips_per_class.get(split, 0)) > 0:
            for file in choices[split]:
                file.check()
    units: list[WorkUnit] = []
    for label_index, label in enumerate(labels):
        if label not in source.programs:
            skipped.append(SkippedRow(f"class {label!r}", "no General-MIDI program for this label in soundfont.programs", "no_program"))
            continue
        program = int(source.programs[label])
        low, high = source.ranges.get(label, [48, 84])
        plans = []
        for split_index, split in enumerate(SPLIT_ORDER):
            for k in range(int(source.clips_per_class.get(split, 0))):
                seed = (source.seed, label_index, split_index, k)
                rng = np.random.default_rng(list(seed))
                # the soundfont has its own stream: the other parameters do not depend on it
                allowed = choices[split]
                font = allowed[int(np.random.default_rng(list(seed) + [2]).integers(len(allowed)))]
                name, notes = pool[split][int(rng.integers(len(pool[split])))]
                pitches = np.array([p for p, _ in notes if p is not None])
                centre = (low + high) / 2
                transpose = int(round(centre - np.median(pitches))) + int(
                    rng.integers(-source.transpose_semitones, source.transpose_semitones + 1)
                )
                # shift by octaves until the melody fits the range as well as it can
                while pitches.max() + transpose > high and pitches.min() + transpose - 12 >= low - 2:
                    transpose -= 12
                while pitches.min() + transpose < low and pitches.max() + transpose + 12 <= high + 2:
                    transpose += 12
                plans.append(
                    RenderPlan(
                        clip_id=safe_id(f"{label}-{split}-{k:04d}".replace(" ", "_")),
                        label=label,
                        split=split,
                        program=program,
                        melody_name=name,
                        notes=notes,
                        # start on a sounding note, never on a rest
                        start_note=int(rng.choice([j for j, (n, _) in enumerate(notes) if n is not None])),
                        transpose=transpose,
                        velocity=int(rng.integers(source.velocity_range[0], source.velocity_range[1] + 1)),
                        tempo_bpm=float(rng.uniform(*source.tempo_bpm_range)),
                        articulation=float(rng.uniform(*source.articulation_range)),
                        seed=seed,
                        loudness_lufs=(
                            float(rng.uniform(*source.loudness_lufs_range)) if source.loudness_lufs_range else None
                        ),
                        soundfont=font.name,
                        multi_soundfont=multi,
                    )
                )
        fonts = {f.name: f for files in choices.values() for f in files}
        for name in sorted({p.soundfont for p in plans}):
            items = [p for p in plans if p.soundfont == name]
            settings = (source.clip_duration_s, fonts[name].path, source.gain, recipe.signal.sample_rate)
            unit_id = f"soundfont-{label}-{name}" if multi else f"soundfont-{label}"
            units.append(
                WorkUnit(
                    unit_id=safe_id(unit_id.replace(" ", "_")),
                    items=items,
                    description=f"{label} ({name})" if multi else label,
                    fingerprint=fingerprint(items, settings),
                )
            )
    return units, skipped


def _new_synth(font: SoundfontFile, gain: float, sample_rate: int, lazy_samples: bool = False):
    """A fresh synthesizer with ``font`` loaded; ``lazy_samples`` decodes only the samples of the
    presets used (an .sf3 is otherwise decompressed whole: ~20-40 s; the audio is the same)."""
    try:
        import fluidsynth
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ConfigError("the soundfont recipe needs pyfluidsynth and libfluidsynth: pip install 'marsctl[music]' and apt-get install fluidsynth") from exc
    font.check()
    synth = fluidsynth.Synth(
        gain=float(gain),
        samplerate=float(sample_rate),
        **{"synth.reverb.active": 0, "synth.chorus.active": 0},
        **({"synth.dynamic-sample-loading": 1} if lazy_samples else {}),
    )
    sfid = synth.sfload(font.path)
    if sfid < 0:
        synth.delete()
        raise ConfigError(f"{font.path}: fluidsynth could not load this soundfont")
    return synth, sfid


def render_clip(synth, sfid: int, plan: RenderPlan, duration_s: float, sample_rate: int) -> np.ndarray:
    """Render one clip (mono float32, exactly ``duration_s``) with an already loaded synthesizer."""
    total = int(round(duration_s * sample_rate))
    total_blocks = -(-total // BLOCK)
    rng = np.random.default_rng(list(plan.seed) + [1])
    seconds_per_quarter = 60.0 / plan.tempo_bpm
    events: list[tuple[int, int, int, int]] = []  # (block, order, pitch, velocity); order: offs first
    t = 0.0
    i = plan.start_note
    n = len(plan.notes)
    while True:
        pitch, quarters = plan.notes[i % n]
        length = quarters * seconds_per_quarter
        start_block = int(round(t * sample_rate / BLOCK))
        if start_block >= total_blocks:
            break
        if pitch is not None:
            key = min(127, max(0, pitch + plan.transpose))
            velocity = int(np.clip(plan.velocity + rng.integers(-8, 9), 1, 127))
            end_block = max(start_block + 1, int(round((t + length * plan.articulation) * sample_rate / BLOCK)))
            events.append((start_block, 1, key, velocity))
            events.append((end_block, 0, key, 0))
        t += length
        i += 1
    events.sort()
    synth.program_select(0, sfid, 0, plan.program)
    chunks = []
    block = 0
    for at, _, key, velocity in events:
        at = min(at, total_blocks)
        if at > block:
            chunks.append(synth.get_samples((at - block) * BLOCK))
            block = at
        if velocity:
            synth.noteon(0, key, velocity)
        else:
            synth.noteoff(0, key)
    if block < total_blocks:
        chunks.append(synth.get_samples((total_blocks - block) * BLOCK))
    synth.all_notes_off(0)
    synth.all_sounds_off(0)
    synth.get_samples(BLOCK * 64)  # let the released voices die before the next clip
    stereo = np.concatenate(chunks).astype(np.float32).reshape(-1, 2)
    wave = stereo.mean(axis=1)[:total] / 32768.0
    if plan.loudness_lufs is not None and np.any(wave):
        # level the clip to its drawn loudness (ITU-R BS.1770), as recorded datasets are levelled
        current = float(AF.loudness(torch.from_numpy(wave)[None, :], sample_rate))
        if np.isfinite(current):
            wave = wave * np.float32(10 ** ((plan.loudness_lufs - current) / 20))
    peak = float(np.abs(wave).max(initial=0.0))
    if peak > 0.98:
        wave *= 0.98 / peak
    return wave.astype(np.float32)


def run_unit(unit: WorkUnit, recipe: DataRecipe, dataset_dir: Path) -> list[ClipRecord]:
    """Render every clip of one unit (one class, one soundfont) with one fresh synthesizer (deterministic)."""
    source = recipe.soundfont
    assert source is not None
    sr = recipe.signal.sample_rate
    fonts = {f.name: f for f in soundfont_files(source)}
    names = {plan.soundfont for plan in unit.items}
    if len(names) != 1:
        raise ValueError(f"unit {unit.unit_id}: clips of several soundfonts {sorted(names)} in one unit")
    synth, sfid = _new_synth(fonts[names.pop()], source.gain, sr, lazy_samples=bool(source.soundfonts))
    records = []
    try:
        for plan in unit.items:
            record = ClipRecord(plan.clip_id, plan.label, plan.split, plan.source, group=plan.melody_name, soundfont=plan.soundfont)
            if synth.sfpreset_name(sfid, 0, plan.program) is None:  # it would render silence
                record.status, record.reason = "failed", f"no_preset: soundfont {plan.soundfont} has no bank-0 program {plan.program}"
                records.append(record)
                continue
            wave = render_clip(synth, sfid, plan, source.clip_duration_s, sr)
            record.audio_path = f"clips/{label_dirname(plan.label)}/{plan.clip_id}.flac"
            save_audio(dataset_dir / record.audio_path, wave, sr)
            record.duration_s, record.sample_rate = len(wave) / sr, sr
            records.append(record)
    finally:
        synth.delete()
    return records
