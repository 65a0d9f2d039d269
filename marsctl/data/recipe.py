"""Dataset recipes: one typed, frozen config per dataset, loaded from ``recipes/data/<name>.yaml``.

A recipe says where clips come from (exactly one source section, named by a kind registered in
:mod:`marsctl.data.sources`: ``soundfont``, ``folder``, ``youtube``, ...),
which labels exist, every filter threshold and how fixed mixtures are drawn. Recipes hold
data only; unknown keys are errors (see :func:`marsctl.config.from_mapping`).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from marsctl.config import SignalConfig, ValidatedConfig, from_mapping, read_yaml_file, setting, to_mapping
from marsctl.data.sources import get_source, source_kinds
from marsctl.errors import ConfigError
from marsctl.recipe_paths import find_recipe, list_recipes

DEFAULT_SOUNDFONT = "/usr/share/sounds/sf2/FluidR3_GM.sf2"
SPLITS = ("train", "val", "test")
#: a music21 corpus work: path parts of letters, digits, '_', '-', '.' (no '..', no leading '/')
_CORPUS_WORK = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-][A-Za-z0-9_.\-]*)*$")


def check_pair(value: list, name: str, low: float | None = None, high: float | None = None, empty_ok: bool = False) -> None:
    """``value`` is ``[lo, hi]`` with ``low <= lo <= hi <= high`` (or ``[]`` when ``empty_ok``)."""
    if empty_ok and len(value) == 0:
        return
    bounds = f"{low if low is not None else '-inf'}..{high if high is not None else 'inf'}"
    if len(value) != 2 or value[0] > value[1] or (low is not None and value[0] < low) or (high is not None and value[1] > high):
        raise ConfigError(f"{name} must be [low, high] with {bounds.replace('..', ' <= low <= high <= ')}{' (or [])' if empty_ok else ''}, got {list(value)}")


def check_split_counts(counts: dict, name: str) -> None:
    """A ``{train: n, val: n, test: n}`` mapping: known splits, whole numbers >= 0."""
    unknown = sorted(set(counts) - set(SPLITS))
    if unknown:
        raise ConfigError(f"{name}: unknown split(s) {', '.join(map(str, unknown))}; use {', '.join(SPLITS)}")
    for split, count in counts.items():
        if count < 0:
            raise ConfigError(f"{name}.{split} must be >= 0, got {count}")


@dataclass(frozen=True)
class SoundfontSource(ValidatedConfig):
    """Solo-instrument clips rendered from a General-MIDI soundfont with music21 corpus melodies.

    Melodies are assigned to splits first, so train, val and test never share a melody.
    Each clip draws a melody, a start note, a transposition into the instrument's range, a
    velocity, a tempo and an articulation (note-length factor) from a seeded generator.
    """

    #: label -> General MIDI program number (0-based, as fluidsynth takes it)
    programs: dict[str, int] = field(default_factory=dict)
    #: label -> [lowest, highest] MIDI note the instrument plays comfortably
    ranges: dict[str, list[int]] = field(default_factory=dict)
    #: music21 corpus works holding ABC tunes (each file is an opus of many melodies)
    melody_works: list[str] = field(default_factory=lambda: ["essenFolksong/altdeu10"])
    #: distinct melodies per split (disjoint sets)
    melodies_per_split: dict[str, int] = field(default_factory=lambda: {"train": 24, "val": 4, "test": 8})
    #: rendered clips per class and split
    clips_per_class: dict[str, int] = field(default_factory=lambda: {"train": 16, "val": 4, "test": 6})
    clip_duration_s: float = setting(6.0, gt=0, le=600)
    soundfont: str = DEFAULT_SOUNDFONT
    #: several soundfonts, each ``{name: ..., path: ..., package: <Debian package installing it>}``;
    #: when given, each clip draws one of them (seeded per clip) and ``soundfont`` is not used
    soundfonts: list[dict[str, str]] = field(default_factory=list)
    #: split -> the ``soundfonts`` names its clips may use (a split not listed may use all), e.g.
    #: leave-one-soundfont-out: ``{train: [a, b], val: [a, b], test: [c]}``
    soundfonts_per_split: dict[str, list[str]] = field(default_factory=dict)
    #: random shift (semitones, +-) around the centre of the instrument's range
    transpose_semitones: int = setting(5, ge=0, le=48)
    velocity_range: list[int] = field(default_factory=lambda: [60, 120])
    tempo_bpm_range: list[float] = field(default_factory=lambda: [70.0, 150.0])
    #: sounding fraction of each written note (0.5 staccato .. 1.0 legato)
    articulation_range: list[float] = field(default_factory=lambda: [0.5, 1.0])
    #: synth output gain (fluidsynth's master gain, 0..10)
    gain: float = setting(0.8, ge=0, le=10)
    #: each clip is levelled to a loudness drawn from this range (LUFS); [] keeps the synth's level
    loudness_lufs_range: list[float] = field(default_factory=lambda: [-32.0, -20.0])
    seed: int = setting(0, ge=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        for label, program in self.programs.items():
            if not 0 <= program <= 127:
                raise ConfigError(f"programs.{label} must be a General MIDI program in 0..127, got {program}")
        for label, pair in self.ranges.items():
            check_pair(pair, f"ranges.{label}", 0, 127)
        if not self.melody_works:
            raise ConfigError("melody_works must name at least one music21 corpus work (e.g. essenFolksong/altdeu10)")
        for work in self.melody_works:
            if not _CORPUS_WORK.match(work) or ".." in work.split("/"):
                raise ConfigError(f"melody_works: {work!r} must be a plain music21 corpus name like essenFolksong/altdeu10 (no path)")
        check_split_counts(self.melodies_per_split, "melodies_per_split")
        check_split_counts(self.clips_per_class, "clips_per_class")
        check_pair(self.velocity_range, "velocity_range", 1, 127)
        check_pair(self.tempo_bpm_range, "tempo_bpm_range", 1, 1000)
        if len(self.articulation_range) == 2 and self.articulation_range[0] <= 0:
            raise ConfigError(f"articulation_range must be [low, high] with 0 < low <= high <= 1, got {self.articulation_range}")
        check_pair(self.articulation_range, "articulation_range", 0, 1)
        check_pair(self.loudness_lufs_range, "loudness_lufs_range", -70, 0, empty_ok=True)


@dataclass(frozen=True)
class FolderSource(ValidatedConfig):
    """Clips from a labeled folder tree: ``<root>/<label>/**/<file>`` (label = first-level subfolder).

    Every audio or video file becomes one clip (converted to 16 kHz mono FLAC; frames are
    extracted from video files). A file's split comes from a subfolder named
    ``train``/``val``/``test`` below the label if there is one, else from a stable hash of
    its path with the ratios below.
    """

    root: Optional[str] = None
    val_fraction: float = setting(0.1, ge=0, le=1)
    test_fraction: float = setting(0.1, ge=0, le=1)
    #: longer files are cut to this length (None keeps them whole)
    max_duration_s: Optional[float] = setting(None, gt=0)
    extract_frames: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.val_fraction + self.test_fraction > 1:
            raise ConfigError(f"val_fraction + test_fraction must be <= 1, got {self.val_fraction} + {self.test_fraction}")


@dataclass(frozen=True)
class YoutubeSource(ValidatedConfig):
    """Clips cut from online videos with yt-dlp (only the needed segment) and ffmpeg.

    ``source_list_format``:
    - ``vggsound_csv``: rows ``youtube_id,start_seconds,label,split`` (VGGSound's vggsound.csv);
      ``test`` rows stay test, a stable hash moves ``val_fraction`` of train rows to val.
    - ``music_json``: ``{"videos": {"<label>": ["<youtube_id>", ...]}}`` (MUSIC's
      MUSIC_solo_videos.json / MUSIC_duet_videos.json; duet labels are "a b"); each video gives
      ``clips_per_video`` clips; splits by a stable hash of the video id.
    """

    source_list_url: Optional[str] = None
    source_list_format: str = "vggsound_csv"
    #: rename labels of the source list (e.g. acoustic_guitar -> acoustic guitar)
    label_map: dict[str, str] = field(default_factory=dict)
    #: how a video's URL is made; tests point this at http://127.0.0.1
    url_template: str = "https://www.youtube.com/watch?v={youtube_id}"
    clip_duration_s: float = setting(10.0, gt=0, le=600)
    clips_per_video: int = setting(1, ge=1)
    first_clip_start_s: float = setting(0.0, ge=0)
    clip_stride_s: float = setting(10.0, gt=0)
    val_fraction: float = setting(0.05, ge=0, le=1)
    test_fraction: float = setting(0.1, ge=0, le=1)
    extract_frames: bool = True
    frame_rate: float = setting(1.0, gt=0, le=60)
    frame_size: int = setting(224, ge=1, le=4096)
    workers: int = setting(4, ge=1, le=256)
    #: attempts per item for errors that may pass (network); dead/private videos fail at once
    attempts: int = setting(3, ge=1)
    backoff_s: float = setting(2.0, ge=0)
    socket_timeout_s: float = setting(30.0, gt=0)
    #: a Netscape-format cookies file for yt-dlp (YouTube may ask to sign in); never logged
    cookies_file: Optional[str] = None
    #: a Hugging Face dataset repo holding copies of videos that are gone from YouTube
    mirror: Optional[str] = None
    #: file names tried in the mirror repo, in order
    mirror_filename_templates: list[str] = field(
        default_factory=lambda: ["{clip_id}.mp4", "{youtube_id}.mp4", "{clip_id}.flac", "{clip_id}.wav"]
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.val_fraction + self.test_fraction > 1:
            raise ConfigError(f"val_fraction + test_fraction must be <= 1, got {self.val_fraction} + {self.test_fraction}")

    def for_card(self) -> "YoutubeSource":
        """What the dataset card records: a cookies file's location is left out."""
        return dataclasses.replace(self, cookies_file=None)


@dataclass(frozen=True)
class SemanticFilter(ValidatedConfig):
    """The clip's audio must match its own label better than every other label by ``margin``."""

    enabled: bool = False
    #: encoder spec for marsctl.models.encoders.load_encoder (a directory, "builtin", "laion-clap:...")
    encoder: str = "builtin"
    margin: float = 0.0
    #: text prompt for a label
    prompt: str = "the sound of {label}"
    batch_size: int = setting(16, ge=1)


@dataclass(frozen=True)
class FilterConfig(ValidatedConfig):
    """Signal checks (the "clean+" step). A clip failing any check is kept in the manifest with keep=false."""

    min_duration_s: float = setting(2.0, ge=0)
    #: a 50 ms frame quieter than this (dBFS RMS) counts as silent
    silence_threshold_db: float = setting(-50.0, le=0)
    max_silence_ratio: float = setting(0.5, ge=0, le=1)
    #: a sample at or above this magnitude counts as clipped
    clip_level: float = setting(0.999, gt=0, le=1)
    max_clip_ratio: float = setting(0.001, ge=0, le=1)
    min_loudness_lufs: float = -50.0
    max_loudness_lufs: float = -3.0
    #: regular expressions; a clip whose label matches one is dropped ("excluded_label"),
    #: e.g. music-like labels in a list used for interference sounds
    exclude_labels: list[str] = field(default_factory=list)
    semantic: SemanticFilter = field(default_factory=SemanticFilter)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.min_loudness_lufs > self.max_loudness_lufs:
            raise ConfigError(f"min_loudness_lufs ({self.min_loudness_lufs}) must be <= max_loudness_lufs ({self.max_loudness_lufs})")
        for pattern in self.exclude_labels:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"exclude_labels: {pattern!r} is not a regular expression ({exc})") from None


@dataclass(frozen=True)
class MixConfig(ValidatedConfig):
    """Fixed, seeded mixtures (for evaluation) and the defaults of dynamic training mixtures."""

    num_sources: int = setting(2, ge=1, le=16)
    #: "omnisep": each source times signal.mix_source_gain (0.5) and summed;
    #: "snr": the second..last sources are scaled to a random SNR against the first
    mode: str = setting("omnisep", choices=("omnisep", "snr"))
    snr_db_range: list[float] = field(default_factory=lambda: [-5.0, 5.0])
    mixtures_per_split: dict[str, int] = field(default_factory=lambda: {"val": 20, "test": 100})
    seed: int = setting(1234, ge=0)
    #: datasets with families (a union): ``{within: p, across: q}``, the shares of mixtures whose
    #: sources all come from one family / from different families; {} = labels drawn regardless of
    #: family. Dynamic training mixtures of the dataset follow it too (marsctl.data.mixing).
    pairing: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_pair(self.snr_db_range, "snr_db_range", -100, 100)
        check_split_counts(self.mixtures_per_split, "mixtures_per_split")
        shares = [v for v in self.pairing.values() if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0]
        if set(self.pairing) - {"within", "across"} or len(shares) != len(self.pairing) or (shares and sum(shares) <= 0):
            raise ConfigError(f"mix.pairing must be like {{within: 0.5, across: 0.5}} (shares >= 0, not all 0), got {self.pairing!r}")


@dataclass(frozen=True)
class DataRecipe:
    """A dataset recipe: general settings plus one source section (see :mod:`marsctl.data.sources`)."""

    #: a plain name (letters, digits, ``_ . -``); the default output is ``data/<name>``
    name: str
    #: the registered source kind, also the recipe's section key (``soundfont``, ``folder``, ...)
    source_kind: str
    #: the parsed source section (the kind's config dataclass)
    source: Any
    description: str = ""
    #: the class list; items with other labels are skipped as "unknown label" ([] = any label)
    labels: list[str] = field(default_factory=list)
    signal: SignalConfig = field(default_factory=SignalConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    mix: MixConfig = field(default_factory=MixConfig)

    def __post_init__(self) -> None:
        check_recipe_name(self.name, "recipe")
        if any(not label.strip() for label in self.labels) or len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"labels must be a list of distinct, non-empty class names, got {_short_list(self.labels)}")
        expected = get_source(self.source_kind, f"recipe {self.name!r}").config_class()
        if not isinstance(self.source, expected):
            raise ConfigError(f"recipe {self.name!r}: the {self.source_kind} section must be a {expected.__name__}")

    # read-only conveniences: the section if the recipe is of that kind, else None
    @property
    def soundfont(self) -> Optional[SoundfontSource]:
        return self.source if self.source_kind == "soundfont" else None

    @property
    def folder(self) -> Optional[FolderSource]:
        return self.source if self.source_kind == "folder" else None

    @property
    def youtube(self) -> Optional[YoutubeSource]:
        return self.source if self.source_kind == "youtube" else None

    def replace(self, **changes: Any) -> "DataRecipe":
        return dataclasses.replace(self, **changes)

    def with_source(self, **changes: Any) -> "DataRecipe":
        """The recipe with some settings of its source section changed."""
        return dataclasses.replace(self, source=dataclasses.replace(self.source, **changes))

    def to_mapping(self) -> dict[str, Any]:
        """Plain data in the recipe YAML's shape (for the dataset card); private settings left out."""
        for_card = getattr(self.source, "for_card", None)
        source = for_card() if callable(for_card) else self.source
        data: dict[str, Any] = {"name": self.name, "description": self.description, "labels": list(self.labels)}
        data["signal"] = to_mapping(self.signal)
        data[self.source_kind] = to_mapping(source)
        data["filter"] = to_mapping(self.filter)
        data["mix"] = to_mapping(self.mix)
        return data


def _short_list(items: list, limit: int = 8) -> str:
    shown = ", ".join(repr(i) for i in items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}]"


_GENERAL_KEYS = ("name", "description", "labels", "signal", "filter", "mix")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


def check_recipe_name(name: Any, where: str) -> None:
    """A recipe name must be usable as one folder name under ``data/`` (no ``/``, ``..``, hidden names)."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or len(name) > 120:
        raise ConfigError(f"{where}: name {name!r} must be a plain name (letters, digits, '_', '.', '-'; not starting with '.')")


def recipe_from_mapping(data: dict[str, Any], where: str = "recipe") -> DataRecipe:
    """A recipe from parsed YAML: the general keys plus exactly one registered source section."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a recipe must be a mapping, got {type(data).__name__}")
    data = dict(data)
    known_kinds = source_kinds()
    sections = [k for k in data if k not in _GENERAL_KEYS]
    unknown = [str(k) for k in sections if k not in known_kinds]
    if unknown:
        raise ConfigError(
            f"{where}: unknown source kind or key {', '.join(map(repr, unknown))}; "
            f"known kinds: {', '.join(known_kinds)}; other keys: {', '.join(_GENERAL_KEYS)}"
        )
    given = [k for k in sections if data[k] is not None]
    if len(given) != 1:
        raise ConfigError(f"{where}: give exactly one source section ({', '.join(known_kinds)}), got {', '.join(given) or 'none'}")
    if "name" not in data:
        raise ConfigError(f"{where}: the recipe has no name")
    check_recipe_name(data["name"], where)
    kind = given[0]
    section = data[kind]
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: the {kind} section must be a mapping, got {type(section).__name__}")
    source = from_mapping(get_source(kind, where).config_class(), section, f"{where}.{kind}")
    general = {k: v for k, v in data.items() if k in _GENERAL_KEYS}
    return from_mapping(DataRecipe, {**general, "source_kind": kind, "source": source}, where)


def load_recipe(spec: str | Path) -> DataRecipe:
    """A recipe by name (``soundfont`` -> the shipped ``recipes/data/soundfont.yaml``) or by YAML file path."""
    path = find_recipe("data", spec)
    data = read_yaml_file(path)
    recipe = recipe_from_mapping(data, str(path))
    relative_to = getattr(recipe.source, "relative_to", None)
    if callable(relative_to) and Path(spec).is_file():  # paths in a recipe file: relative to that file
        recipe = recipe.replace(source=relative_to(path.resolve().parent))
    return recipe


def available_recipes() -> list[str]:
    """The names of the shipped data recipes (and those in ./recipes/data)."""
    return list_recipes("data")
