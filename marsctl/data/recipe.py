"""Dataset recipes: one typed, frozen config per dataset, loaded from ``recipes/data/<name>.yaml``.

A recipe says where clips come from (exactly one of ``soundfont``, ``folder``, ``youtube``),
which labels exist, every filter threshold and how fixed mixtures are drawn. Recipes hold
data only; unknown keys are errors (see :func:`marsctl.config.from_mapping`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

import marsctl
from marsctl.config import SignalConfig, from_mapping, to_mapping
from marsctl.errors import ConfigError

#: where the recipes shipped with marsctl live (the repository's ``recipes/data``)
RECIPES_DIR = Path(marsctl.__file__).resolve().parents[1] / "recipes" / "data"

DEFAULT_SOUNDFONT = "/usr/share/sounds/sf2/FluidR3_GM.sf2"


@dataclass(frozen=True)
class SoundfontSource:
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
    clip_duration_s: float = 6.0
    soundfont: str = DEFAULT_SOUNDFONT
    #: random shift (semitones, +-) around the centre of the instrument's range
    transpose_semitones: int = 5
    velocity_range: list[int] = field(default_factory=lambda: [60, 120])
    tempo_bpm_range: list[float] = field(default_factory=lambda: [70.0, 150.0])
    #: sounding fraction of each written note (0.5 staccato .. 1.0 legato)
    articulation_range: list[float] = field(default_factory=lambda: [0.5, 1.0])
    #: synth output gain (fluidsynth's master gain)
    gain: float = 0.8
    #: each clip is levelled to a loudness drawn from this range (LUFS); [] keeps the synth's level
    loudness_lufs_range: list[float] = field(default_factory=lambda: [-32.0, -20.0])
    seed: int = 0


@dataclass(frozen=True)
class FolderSource:
    """Clips from a labeled folder tree: ``<root>/<label>/**/<file>`` (label = first-level subfolder).

    Every audio or video file becomes one clip (converted to 16 kHz mono FLAC; frames are
    extracted from video files). A file's split comes from a subfolder named
    ``train``/``val``/``test`` below the label if there is one, else from a stable hash of
    its path with the ratios below.
    """

    root: Optional[str] = None
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    #: longer files are cut to this length (None keeps them whole)
    max_duration_s: Optional[float] = None
    extract_frames: bool = True


@dataclass(frozen=True)
class YoutubeSource:
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
    clip_duration_s: float = 10.0
    clips_per_video: int = 1
    first_clip_start_s: float = 0.0
    clip_stride_s: float = 10.0
    val_fraction: float = 0.05
    test_fraction: float = 0.1
    extract_frames: bool = True
    frame_rate: float = 1.0
    frame_size: int = 224
    workers: int = 4
    #: attempts per item for errors that may pass (network); dead/private videos fail at once
    attempts: int = 3
    backoff_s: float = 2.0
    socket_timeout_s: float = 30.0
    #: a Netscape-format cookies file for yt-dlp (YouTube may ask to sign in); never logged
    cookies_file: Optional[str] = None
    #: a Hugging Face dataset repo holding copies of videos that are gone from YouTube
    mirror: Optional[str] = None
    #: file names tried in the mirror repo, in order
    mirror_filename_templates: list[str] = field(
        default_factory=lambda: ["{clip_id}.mp4", "{youtube_id}.mp4", "{clip_id}.flac", "{clip_id}.wav"]
    )


@dataclass(frozen=True)
class SemanticFilter:
    """The clip's audio must match its own label better than every other label by ``margin``."""

    enabled: bool = False
    #: encoder spec for marsctl.models.encoders.load_encoder (a directory, "builtin", "laion-clap:...")
    encoder: str = "builtin"
    margin: float = 0.0
    #: text prompt for a label
    prompt: str = "the sound of {label}"
    batch_size: int = 16


@dataclass(frozen=True)
class FilterConfig:
    """Signal checks (the "clean+" step). A clip failing any check is kept in the manifest with keep=false."""

    min_duration_s: float = 2.0
    #: a 50 ms frame quieter than this (dBFS RMS) counts as silent
    silence_threshold_db: float = -50.0
    max_silence_ratio: float = 0.5
    #: a sample at or above this magnitude counts as clipped
    clip_level: float = 0.999
    max_clip_ratio: float = 0.001
    min_loudness_lufs: float = -50.0
    max_loudness_lufs: float = -3.0
    #: regular expressions; a clip whose label matches one is dropped ("excluded_label"),
    #: e.g. music-like labels in a list used for interference sounds
    exclude_labels: list[str] = field(default_factory=list)
    semantic: SemanticFilter = field(default_factory=SemanticFilter)


@dataclass(frozen=True)
class MixConfig:
    """Fixed, seeded mixtures (for evaluation) and the defaults of dynamic training mixtures."""

    num_sources: int = 2
    #: "omnisep": each source times signal.mix_source_gain (0.5) and summed;
    #: "snr": the second..last sources are scaled to a random SNR against the first
    mode: str = "omnisep"
    snr_db_range: list[float] = field(default_factory=lambda: [-5.0, 5.0])
    mixtures_per_split: dict[str, int] = field(default_factory=lambda: {"val": 20, "test": 100})
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.mode not in ("omnisep", "snr"):
            raise ConfigError(f"mix.mode must be 'omnisep' or 'snr', got {self.mode!r}")
        if self.num_sources < 1:
            raise ConfigError(f"mix.num_sources must be at least 1, got {self.num_sources}")


@dataclass(frozen=True)
class DataRecipe:
    """A dataset recipe."""

    name: str
    description: str = ""
    #: the class list; items with other labels are skipped as "unknown label" ([] = any label)
    labels: list[str] = field(default_factory=list)
    signal: SignalConfig = field(default_factory=SignalConfig)
    soundfont: Optional[SoundfontSource] = None
    folder: Optional[FolderSource] = None
    youtube: Optional[YoutubeSource] = None
    filter: FilterConfig = field(default_factory=FilterConfig)
    mix: MixConfig = field(default_factory=MixConfig)

    def __post_init__(self) -> None:
        given = [k for k in ("soundfont", "folder", "youtube") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError(f"recipe {self.name!r}: give exactly one source (soundfont, folder or youtube), got {given or 'none'}")

    @property
    def source_kind(self) -> str:
        return next(k for k in ("soundfont", "folder", "youtube") if getattr(self, k) is not None)

    def replace(self, **changes: Any) -> "DataRecipe":
        return dataclasses.replace(self, **changes)

    def to_mapping(self) -> dict[str, Any]:
        """Plain data for the dataset card; a cookies file's location is not recorded."""
        data = to_mapping(self)
        if data.get("youtube"):
            data["youtube"]["cookies_file"] = None
        return {k: v for k, v in data.items() if v is not None}


def recipe_from_mapping(data: dict[str, Any], where: str = "recipe") -> DataRecipe:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a recipe must be a mapping, got {type(data).__name__}")
    return from_mapping(DataRecipe, data, where)


def load_recipe(spec: str | Path) -> DataRecipe:
    """A recipe by name (``soundfont`` -> ``recipes/data/soundfont.yaml``) or by YAML file path."""
    path = Path(spec)
    if not path.suffix and not path.exists():
        candidates = [d / f"{spec}.yaml" for d in _recipe_dirs()]
        path = next((c for c in candidates if c.is_file()), candidates[0])
        if not path.is_file():
            known = available_recipes()
            raise ConfigError(f"unknown recipe {str(spec)!r}; known recipes: {', '.join(known) or 'none'} (or give a YAML path)")
    if not path.is_file():
        raise ConfigError(f"{path}: no such recipe file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    return recipe_from_mapping(data, str(path))


def _recipe_dirs() -> list[Path]:
    """The repository's recipes/data (editable installs), then ./recipes/data."""
    dirs = [RECIPES_DIR, Path.cwd() / "recipes" / "data"]
    return [d for i, d in enumerate(dirs) if d not in dirs[:i]]


def available_recipes() -> list[str]:
    return sorted({p.stem for d in _recipe_dirs() if d.is_dir() for p in d.glob("*.yaml")})
