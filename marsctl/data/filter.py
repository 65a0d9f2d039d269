"""The filter stage ("clean+"): score every fetched clip, keep or drop it, and write clips.parquet.

Checks, in order (the first that fails is the clip's ``drop_reason``, written
``check:detail``):

1. ``excluded_label`` - the label matches one of ``filter.exclude_labels`` (regular expressions;
   e.g. music-like labels in a list of interference sounds);
2. ``unreadable`` - the clip file cannot be decoded;
3. ``too_short`` - shorter than ``min_duration_s``;
4. ``silent`` - more than ``max_silence_ratio`` of its 50 ms frames are below ``silence_threshold_db``;
5. ``clipped`` - more than ``max_clip_ratio`` of its samples reach ``clip_level``;
6. ``too_quiet`` / ``too_loud`` - integrated loudness (ITU-R BS.1770, torchaudio) outside
   ``[min_loudness_lufs, max_loudness_lufs]``;
7. ``semantic`` - with ``semantic.enabled``: cos(audio, own label prompt) minus the best
   cos(audio, other label prompt) is below ``semantic.margin`` (the encoder is any
   :class:`~marsctl.models.encoder_base.QueryEncoder`).

Scores are cached per clip under ``state/scores`` (keyed by the settings they depend on)
and every score lands in the manifest, so thresholds can be changed and the stage rerun
(``marsctl data filter``) without fetching or scoring again.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchaudio.functional as AF

from marsctl.audio import load_audio
from marsctl.data.manifest import write_clips
from marsctl.data.paths import UnsafePathError, inside, safe_id
from marsctl.progress import stage_progress
from marsctl.data.recipe import DataRecipe, FilterConfig
from marsctl.data.records import ClipRecord, fingerprint
from marsctl.errors import AudioError, ConfigError
from marsctl.files import write_json_atomic

STATE_SCORES = "state/scores"
#: level reported for digital silence, instead of -inf
FLOOR_DB = -120.0
FRAME_S = 0.05


@dataclass
class FilterResult:
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def kept(self) -> int:
        return sum(1 for r in self.rows if r["keep"])

    def dropped_by_reason(self) -> Counter:
        return Counter(r["drop_reason"].split(":", 1)[0] for r in self.rows if not r["keep"])


def _db(value: float) -> float:
    return FLOOR_DB if value <= 10 ** (FLOOR_DB / 20) else max(FLOOR_DB, 20.0 * math.log10(value))


def signal_scores(wave: np.ndarray, sample_rate: int, config: FilterConfig) -> dict[str, float]:
    """Duration, silence ratio, clipping ratio, loudness (LUFS), RMS and peak level of one clip."""
    wave = np.asarray(wave, dtype=np.float32)
    frame = max(1, int(FRAME_S * sample_rate))
    n_frames = max(1, len(wave) // frame)
    frames = wave[: n_frames * frame].reshape(n_frames, -1) if len(wave) >= frame else wave[None, :]
    frame_db = 10.0 * np.log10(np.mean(frames.astype(np.float64) ** 2, axis=1) + 1e-20)
    if len(wave) >= int(0.4 * sample_rate):  # BS.1770 needs at least one 400 ms block
        lufs = float(AF.loudness(torch.from_numpy(wave)[None, :], sample_rate))
        lufs = FLOOR_DB if not math.isfinite(lufs) else max(FLOOR_DB, lufs)
    else:
        lufs = FLOOR_DB
    return {
        "duration_s": len(wave) / sample_rate,
        "silence_ratio": float(np.mean(frame_db < config.silence_threshold_db)),
        "clip_ratio": float(np.mean(np.abs(wave) >= config.clip_level)),
        "loudness_lufs": lufs,
        "rms_db": _db(float(np.sqrt(np.mean(wave.astype(np.float64) ** 2)))),
        "peak_db": _db(float(np.max(np.abs(wave), initial=0.0))),
    }


def _score_key(config: FilterConfig) -> dict[str, float]:
    return {"silence_threshold_db": config.silence_threshold_db, "clip_level": config.clip_level, "frame_s": FRAME_S}


def decide(row: dict[str, Any], config: FilterConfig, label_patterns: list[re.Pattern]) -> str:
    """The drop reason of a scored row ("" = keep)."""
    for pattern in label_patterns:
        if pattern.search(row["label"]):
            return f"excluded_label:{pattern.pattern}"
    if row.get("_error"):
        return f"unreadable:{row['_error']}"
    if row["duration_s"] < config.min_duration_s:
        return f"too_short:{row['duration_s']:.2f}s<{config.min_duration_s}s"
    if row["silence_ratio"] > config.max_silence_ratio:
        return f"silent:{row['silence_ratio']:.2f}>{config.max_silence_ratio}"
    if row["clip_ratio"] > config.max_clip_ratio:
        return f"clipped:{row['clip_ratio']:.4f}>{config.max_clip_ratio}"
    if row["loudness_lufs"] < config.min_loudness_lufs:
        return f"too_quiet:{row['loudness_lufs']:.1f}LUFS<{config.min_loudness_lufs}"
    if row["loudness_lufs"] > config.max_loudness_lufs:
        return f"too_loud:{row['loudness_lufs']:.1f}LUFS>{config.max_loudness_lufs}"
    margin = row.get("semantic_margin")
    if config.semantic.enabled and margin is not None and margin < config.semantic.margin:
        return f"semantic:{margin:.3f}<{config.semantic.margin}"
    return ""


def semantic_margins(
    encoder, waves: list[np.ndarray], labels: list[str], label_set: list[str], sample_rate: int, prompt: str, batch_size: int = 16
) -> list[float]:
    """cos(audio, own label) - max over other labels of cos(audio, that label), per clip."""
    with torch.no_grad():
        text = encoder.embed_text([prompt.format(label=label) for label in label_set]).float().cpu()
        index = {label: i for i, label in enumerate(label_set)}
        margins: list[float] = []
        for start in range(0, len(waves), batch_size):
            batch = [torch.as_tensor(w, dtype=torch.float32) for w in waves[start : start + batch_size]]
            audio = encoder.embed_audio(batch, sample_rate).float().cpu()
            sims = audio @ text.T
            for row, label in zip(sims, labels[start : start + batch_size]):
                own = index[label]
                others = torch.cat([row[:own], row[own + 1 :]])
                margins.append(float(row[own] - others.max()) if len(others) else float("inf"))
    return margins


def load_encoder_for_filter(spec: str):
    try:
        from marsctl.models.encoders import load_encoder
    except ImportError as exc:
        raise ConfigError(
            "filter.semantic.enabled needs marsctl.models.encoders.load_encoder, which this install lacks; "
            "set filter.semantic.enabled: false in the recipe"
        ) from exc
    return load_encoder(spec)


def filter_clips(
    recipe: DataRecipe,
    dataset_dir: str | Path,
    records: list[ClipRecord],
    *,
    encoder=None,
    progress: bool = True,
) -> FilterResult:
    """Score and filter the fetched clips; writes ``manifests/clips.parquet``.

    ``encoder`` (a QueryEncoder) is used for the semantic check when the recipe enables it;
    when not given, it is loaded from ``filter.semantic.encoder``.
    """
    dataset_dir = Path(dataset_dir)
    config = recipe.filter
    sr = recipe.signal.sample_rate
    try:
        label_patterns = [re.compile(p) for p in config.exclude_labels]
    except re.error as exc:
        raise ConfigError(f"filter.exclude_labels: invalid regular expression ({exc})") from exc
    base_key = _score_key(config)
    ok = [r for r in records if r.status == "ok"]
    # the semantic check compares labels: with fewer than two it has nothing to say
    semantic_on = config.semantic.enabled and len({r.label for r in ok}) >= 2
    label_set = sorted({r.label for r in ok})
    semantic_key = (
        # the margin depends on the encoder, the prompt and the competing labels
        {"encoder": config.semantic.encoder, "prompt": config.semantic.prompt, "labels": fingerprint(label_set)}
        if semantic_on else None
    )
    rows: list[dict[str, Any]] = []
    need_semantic: list[int] = []
    with stage_progress("filter: signal checks", total=len(ok), show=progress) as advance:
        for record in ok:
            cache_path = dataset_dir / STATE_SCORES / f"{safe_id(record.clip_id)}.json"
            cached = _read_cache(cache_path)
            row: dict[str, Any] = {
                "clip_id": record.clip_id,
                "label": record.label,
                "split": record.split,
                "audio_path": record.audio_path,
                "frame_paths": list(record.frame_paths),
                "sample_rate": sr,
                "source": record.source,
                "group": record.group,
                "soundfont": record.soundfont,
                "family": record.family,
            }
            key = dict(base_key, file=_file_stamp(dataset_dir, record.audio_path))
            if cached is not None and cached.get("key") == key:
                scores = cached["scores"]
            else:
                try:
                    wave = load_audio(inside(dataset_dir, record.audio_path), sr)
                    scores = signal_scores(wave, sr, config)
                except (AudioError, UnsafePathError) as exc:
                    scores = {"duration_s": record.duration_s, "silence_ratio": 1.0, "clip_ratio": 0.0,
                              "loudness_lufs": FLOOR_DB, "rms_db": FLOOR_DB, "peak_db": FLOOR_DB, "_error": str(exc)}
                old_semantic = (cached or {}).get("semantic")
                cached = {"key": key, "scores": scores}
                if old_semantic and old_semantic.get("key", {}).get("file") == key["file"]:
                    cached["semantic"] = old_semantic  # same audio: its semantic margin still holds
                write_json_atomic(cache_path, cached)
            row.update(scores)
            sem = cached.get("semantic")
            row["semantic_margin"] = None
            if semantic_key is not None and not row.get("_error"):
                if sem is not None and sem.get("key") == dict(semantic_key, file=key["file"]):
                    row["semantic_margin"] = sem["margin"]
                elif not decide(row, config, label_patterns):  # only clips that pass the signal checks
                    need_semantic.append(len(rows))
            rows.append(row)
            advance()
    if need_semantic:
        if encoder is None:
            encoder = load_encoder_for_filter(config.semantic.encoder)
        with stage_progress("filter: semantic check", total=len(need_semantic), show=progress) as advance:
            step = max(1, config.semantic.batch_size)
            for start in range(0, len(need_semantic), step):
                idx = need_semantic[start : start + step]
                # decoded again here rather than kept from the first pass: a large dataset does not fit in memory
                batch = [load_audio(inside(dataset_dir, rows[i]["audio_path"]), sr) for i in idx]
                margins = semantic_margins(encoder, batch, [rows[i]["label"] for i in idx], label_set, sr, config.semantic.prompt, step)
                for i, margin in zip(idx, margins):
                    rows[i]["semantic_margin"] = margin
                    cache_path = dataset_dir / STATE_SCORES / f"{safe_id(rows[i]['clip_id'])}.json"
                    cached = _read_cache(cache_path) or {}
                    stamp = _file_stamp(dataset_dir, rows[i]["audio_path"])
                    cached["semantic"] = {"key": dict(semantic_key, file=stamp), "margin": margin}
                    write_json_atomic(cache_path, cached)
                advance(len(idx))
    for row in rows:
        reason = decide(row, config, label_patterns)
        row.pop("_error", None)
        row["keep"] = not reason
        row["drop_reason"] = reason
    write_clips(dataset_dir, rows)
    return FilterResult(rows=rows)


def _file_stamp(dataset_dir: Path, rel: str) -> list[int] | None:
    """(size, mtime in ns) of a clip file: a re-rendered or re-fetched clip is scored again."""
    try:
        stat = inside(dataset_dir, rel).stat()
    except (OSError, UnsafePathError):
        return None
    return [stat.st_size, stat.st_mtime_ns]


def _read_cache(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
