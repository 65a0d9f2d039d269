"""Recipe source ``youtube``: clips cut from online videos (VGGSound, MUSIC).

The source list comes from ``--source-list`` (a local file) or the recipe's
``source_list_url`` (downloaded once into ``state/``). For each item, yt-dlp's Python API
downloads only the needed segment (``download_ranges`` with cuts forced onto keyframes, so
the segment starts exactly at the requested second), then ffmpeg (ffmpeg-python) extracts
16 kHz mono audio and 1 fps, 224 px frames. Network-type errors are retried with
exponential backoff (``attempts``, ``backoff_s``); a dead, private or removed video fails at
once. If a ``mirror`` (a Hugging Face dataset repo) is given, an item that failed on
YouTube is looked up there under ``mirror_filename_templates`` before it is given up.
Every failure lands in ``logs/failures.jsonl`` with its reason; the rest goes on.

Rows that are malformed, have an unknown label or split, or whose video id is not a plain
id (``../``, ``/``, spaces...) are skipped with the reason and never touch the file system.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

from marsctl.data.folder import hash_split
from marsctl.data.media import extract_audio, extract_frames, probe_streams
from marsctl.data.paths import UnsafePathError, inside, label_dirname
from marsctl.data.recipe import DataRecipe, YoutubeSource
from marsctl.data.records import ClipRecord, ItemFailed, SkippedRow, WorkUnit, fingerprint
from marsctl.errors import AudioError, ConfigError
from marsctl.files import atomic_path

#: a video id as it may appear in a source list (YouTube's are 11 of these characters)
VIDEO_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: yt-dlp messages meaning that trying again will not help
PERMANENT_ERRORS = (
    "private video", "video unavailable", "has been removed", "is not available", "account associated",
    "http error 404", "http error 410", "sign in to confirm your age", "copyright", "unsupported url",
    "no video formats", "requested format is not available", "members-only",
)


def apply_options(recipe: DataRecipe, options, dataset_dir: Path | None = None) -> DataRecipe:
    """``--mirror`` and ``--cookies`` into the recipe (the card never records the cookies file)."""
    if options.mirror:
        recipe = recipe.with_source(mirror=options.mirror)
    if options.cookies:
        cookies = Path(options.cookies).expanduser()
        if not cookies.is_file():
            raise ConfigError(f"{cookies}: no such cookies file")
        recipe = recipe.with_source(cookies_file=str(cookies.resolve()))
    return recipe


def _read_source_list(recipe: DataRecipe, dataset_dir: Path, options) -> tuple[str, str]:
    """(text, where) of the source list: ``--source-list`` or the recipe URL (cached in state/)."""
    source = recipe.youtube
    assert source is not None
    if options.source_list:
        path = Path(options.source_list).expanduser()
        if not path.is_file():
            raise ConfigError(f"{path}: no such source list")
        return path.read_text(encoding="utf-8", errors="replace"), str(path)
    if not source.source_list_url:
        raise ConfigError(f"recipe {recipe.name!r} has no youtube.source_list_url; give --source-list FILE")
    cached = dataset_dir / "state" / f"source_list{Path(source.source_list_url.split('?')[0]).suffix or '.txt'}"
    if not cached.is_file():
        try:
            with urllib.request.urlopen(source.source_list_url, timeout=source.socket_timeout_s) as response:
                data = response.read()
        except OSError as exc:
            raise ConfigError(f"could not download the source list {source.source_list_url} ({exc}); give --source-list FILE") from exc
        with atomic_path(cached) as tmp:
            tmp.write_bytes(data)
    return cached.read_text(encoding="utf-8", errors="replace"), source.source_list_url


def parse_vggsound_csv(text: str, where: str, source: YoutubeSource) -> tuple[list[tuple], list[SkippedRow]]:
    """VGGSound rows ``youtube_id,start_seconds,label,split`` -> items; bad rows -> skipped."""
    items, skipped = [], []
    for line_no, line in enumerate(text.splitlines(), start=1):
        at = f"{where}:{line_no}"
        try:
            row = next(csv.reader([line]), [])
        except csv.Error as exc:
            skipped.append(SkippedRow(at, f"malformed row: {exc}", "malformed_row"))
            continue
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) < 4:
            skipped.append(SkippedRow(at, f"malformed row: expected youtube_id,start_seconds,label,split, got {len(row)} field(s)", "malformed_row"))
            continue
        ytid, start_text, label, split = (c.strip() for c in row[:4])
        if line_no == 1 and not _is_number(start_text):
            continue  # a header line
        if not _is_number(start_text) or float(start_text) < 0:
            skipped.append(SkippedRow(at, f"malformed row: start {start_text!r} is not a non-negative number", "malformed_row"))
            continue
        items.append((ytid, float(start_text), label, split, at))
    return items, skipped


def parse_music_json(text: str, where: str, source: YoutubeSource) -> tuple[list[tuple], list[SkippedRow]]:
    """MUSIC ``{"videos": {label: [ids]}}`` -> ``clips_per_video`` items per video."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{where}: not valid JSON ({exc})") from exc
    videos = data.get("videos", data) if isinstance(data, dict) else None
    if not isinstance(videos, dict):
        raise ConfigError(f"{where}: expected {{\"videos\": {{label: [youtube ids]}}}}")
    items, skipped = [], []
    for label, ids in videos.items():
        if not isinstance(ids, list):
            skipped.append(SkippedRow(f"{where}:{label}", "malformed entry: expected a list of video ids", "malformed_row"))
            continue
        for ytid in ids:
            if not isinstance(ytid, str):
                skipped.append(SkippedRow(f"{where}:{label}", f"malformed entry: video id {ytid!r} is not a string", "malformed_row"))
                continue
            split = hash_split(ytid, source.val_fraction, source.test_fraction)
            for k in range(source.clips_per_video):
                items.append((ytid, source.first_clip_start_s + k * source.clip_stride_s, str(label), split, f"{where}:{label}"))
    return items, skipped


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def plan_units(recipe: DataRecipe, dataset_dir: Path, options) -> tuple[list[WorkUnit], list[SkippedRow]]:
    source = recipe.youtube
    assert source is not None
    text, where = _read_source_list(recipe, dataset_dir, options)
    if source.source_list_format == "vggsound_csv":
        rows, skipped = parse_vggsound_csv(text, where, source)
    elif source.source_list_format == "music_json":
        rows, skipped = parse_music_json(text, where, source)
    else:
        raise ConfigError(f"youtube.source_list_format must be vggsound_csv or music_json, got {source.source_list_format!r}")
    allowed = set(recipe.labels)
    seen: set[str] = set()
    units = []
    for ytid, start, label, split, at in rows:
        label = source.label_map.get(label, label)
        if not VIDEO_ID.match(ytid):
            skipped.append(SkippedRow(at, f"invalid video id {ytid!r} (only letters, digits, '_' and '-')", "invalid_id"))
            continue
        if allowed and label not in allowed:
            skipped.append(SkippedRow(at, f"unknown label {label!r} (not in the recipe's labels)", "unknown_label"))
            continue
        try:
            label_dirname(label)
        except UnsafePathError as exc:
            skipped.append(SkippedRow(at, f"invalid label: {exc}", "invalid_label"))
            continue
        if split not in ("train", "val", "test"):
            skipped.append(SkippedRow(at, f"unknown split {split!r} (train, val or test)", "unknown_split"))
            continue
        if split == "train" and source.source_list_format == "vggsound_csv" and source.val_fraction > 0:
            split = hash_split(ytid, source.val_fraction, 0.0)
        clip_id = f"{ytid}_{int(round(start)):06d}"
        if clip_id in seen:
            skipped.append(SkippedRow(at, f"duplicate row for {clip_id}", "duplicate_row"))
            continue
        seen.add(clip_id)
        item = (ytid, start, label, split, clip_id)
        settings = (source.url_template, source.clip_duration_s, source.extract_frames, source.frame_rate,
                    source.frame_size, recipe.signal.sample_rate)
        units.append(WorkUnit(unit_id=f"yt-{clip_id}", items=[item], description=clip_id, fingerprint=fingerprint(item, settings)))
    return units, skipped


def _is_permanent(message: str) -> bool:
    lower = message.lower()
    return any(p in lower for p in PERMANENT_ERRORS)


def download_segment(url: str, start_s: float, duration_s: float, out_dir: Path, source: YoutubeSource, want_video: bool) -> Path:
    """Download ``[start, start+duration)`` of ``url`` with yt-dlp into ``out_dir``; returns the file."""
    import yt_dlp
    from yt_dlp.utils import DownloadError, download_range_func

    fmt = "bv*[height<=360]+ba/b[height<=360]/bv*+ba/b" if want_video else "ba/b"
    options = {
        "outtmpl": str(out_dir / "segment.%(ext)s"),
        "format": fmt,
        "download_ranges": download_range_func(None, [(start_s, start_s + duration_s)]),
        "force_keyframes_at_cuts": True,
        "quiet": True,
        "no_warnings": True,
        "noprogress": True,
        "noplaylist": True,
        "overwrites": True,
        "retries": 0,
        "socket_timeout": source.socket_timeout_s,
        "logger": _QuietLogger(),
    }
    if source.cookies_file:
        options["cookiefile"] = source.cookies_file
    try:
        with yt_dlp.YoutubeDL(options) as ydl:
            info = ydl.extract_info(url, download=True)
    except DownloadError as exc:
        message = re.sub(r"^ERROR:\s*", "", str(exc)).strip().splitlines()[0]
        if _is_permanent(message):
            raise ItemFailed(f"unavailable: {message}") from exc
        raise ItemFailed(f"download: {message}", retryable=True) from exc
    files = [Path(d["filepath"]) for d in (info or {}).get("requested_downloads", []) if d.get("filepath")]
    files = [f for f in files if f.is_file() and f.stat().st_size > 0] or sorted(p for p in out_dir.glob("segment.*") if p.is_file())
    if not files:
        raise ItemFailed("download: yt-dlp finished but wrote no file", retryable=True)
    return files[0]


class _QuietLogger:
    def debug(self, msg):
        pass

    def info(self, msg):
        pass

    def warning(self, msg):
        pass

    def error(self, msg):
        pass


def _from_mirror(source: YoutubeSource, ytid: str, clip_id: str, out_dir: Path) -> tuple[Path, bool]:
    """(file, is_whole_video) from the mirror dataset repo, trying each filename template."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError

    tried = []
    for template in source.mirror_filename_templates:
        filename = template.format(clip_id=clip_id, youtube_id=ytid)
        try:
            path = hf_hub_download(repo_id=source.mirror, filename=filename, repo_type="dataset", local_dir=str(out_dir))
            return Path(path), "{clip_id}" not in template
        except (EntryNotFoundError,):
            tried.append(filename)
        except RepositoryNotFoundError as exc:
            raise ItemFailed(f"mirror: dataset repo {source.mirror} not found or private") from exc
        except (HfHubHTTPError, OSError) as exc:
            raise ItemFailed(f"mirror: {str(exc).splitlines()[0]}", retryable=True) from exc
    raise ItemFailed(f"mirror: none of {', '.join(tried)} in {source.mirror}")


def run_unit(unit: WorkUnit, recipe: DataRecipe, dataset_dir: Path) -> list[ClipRecord]:
    source = recipe.youtube
    assert source is not None
    ytid, start, label, split, clip_id = unit.items[0]
    record = ClipRecord(clip_id=clip_id, label=label, split=split, source=f"youtube:{ytid}@{start:g}s")
    url = source.url_template.format(youtube_id=ytid)
    work = dataset_dir / "state" / "tmp"
    work.mkdir(parents=True, exist_ok=True)
    failure = ""
    for attempt in range(1, max(1, source.attempts) + 1):
        record.attempts = attempt
        tmp = Path(tempfile.mkdtemp(prefix=f"{clip_id}.", dir=work))
        try:
            media = download_segment(url, start, source.clip_duration_s, tmp, source, source.extract_frames)
            _extract(record, media, 0.0, recipe, dataset_dir)
            return [record]
        except ItemFailed as exc:
            failure = exc.reason
            if not exc.retryable or attempt == source.attempts:
                break
            time.sleep(source.backoff_s * 2 ** (attempt - 1))
        except (AudioError, UnsafePathError) as exc:
            failure = f"extract: {exc}"
            break
        except Exception as exc:  # anything else about this one item: log it, try again, go on
            failure = f"error: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            if attempt < source.attempts:
                time.sleep(source.backoff_s * 2 ** (attempt - 1))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if source.mirror:
        tmp = Path(tempfile.mkdtemp(prefix=f"{clip_id}.mirror.", dir=work))
        try:
            media, whole = _from_mirror(source, ytid, clip_id, tmp)
            _extract(record, media, start if whole else 0.0, recipe, dataset_dir)
            record.source += f" (mirror {source.mirror})"
            return [record]
        except ItemFailed as exc:
            failure = f"{failure}; {exc.reason}"
        except (AudioError, UnsafePathError) as exc:
            failure = f"{failure}; mirror extract: {exc}"
        except Exception as exc:
            failure = f"{failure}; mirror error: {type(exc).__name__}: {exc}"
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    record.status = "failed"
    record.reason = failure
    return [record]


def _extract(record: ClipRecord, media: Path, start_s: float, recipe: DataRecipe, dataset_dir: Path) -> None:
    """Audio (and frames) of ``media`` from ``start_s`` for the clip duration, into the dataset."""
    source = recipe.youtube
    sr = recipe.signal.sample_rate
    has_audio, has_video, _ = probe_streams(media)
    if not has_audio:
        raise AudioError(media.name, "the video has no audio stream")
    rel = f"clips/{label_dirname(record.label)}/{record.clip_id}.flac"
    frames_rel = f"frames/{label_dirname(record.label)}/{record.clip_id}"
    frame_names: list[str] = []
    if source.extract_frames and has_video:
        frame_names = extract_frames(media, inside(dataset_dir, frames_rel), source.frame_rate, source.frame_size, start_s, source.clip_duration_s)
    n = extract_audio(media, inside(dataset_dir, rel), sr, start_s, source.clip_duration_s)
    record.audio_path, record.duration_s, record.sample_rate = rel, n / sr, sr
    record.frame_paths = [f"{frames_rel}/{name}" for name in frame_names]
