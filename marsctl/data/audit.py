"""Label audit of a built dataset: duplicates, encoder disagreement, kNN disagreement, spectral sanity.

``marsctl data audit DATASET`` reads ``manifests/clips.parquet`` (kept clips), reads every clip
and writes, in the dataset folder:

- ``audit/labels.jsonl``: one record per clip (id, label, split, group, content hash, the
  spectral statistics, the nearest clip of another group, the encoder's verdict, the kNN
  verdict and the ``flags`` raised);
- ``audit/summary.json`` and ``audit/summary.md``: counts per flag, per class agreement, the
  exact and near duplicates across groups (those across splits first).

It reports; it never drops a clip (fix or drop in the recipe what the audit shows is wrong).

The checks:

- **exact duplicates**: SHA-256 of the decoded samples; two clips of different recording
  groups with the same content (``exact_duplicate``; ``..._cross_split`` when their splits
  differ, which is a leak);
- **near duplicates**: clips of different groups whose log-mel statistics (mean and standard
  deviation of each of 64 log-mel bands over time, minus the dataset's mean) have a cosine of at
  least ``candidate_threshold`` are compared frame by frame: the largest normalised
  cross-correlation over time lags of their log-mel spectrograms (each band minus its mean, so
  a gain change or an EQ tilt is no disguise) at or above ``near_threshold`` makes them near
  duplicates (``near_duplicate`` / ``near_duplicate_cross_split``). Two different recordings of
  the same kind of noise share statistics but not their frames;
- **encoder disagreement**: the clip's nearest label under a :class:`QueryEncoder`
  (``cos(audio, "the sound of <label>")`` over the dataset's labels) is not its own
  (``encoder_disagrees``; the record keeps the top labels and the own label's rank);
- **kNN disagreement**: none of the ``knn_k`` nearest clips of *other* groups (cosine of the
  log-mel statistics) has the clip's label, and most of them agree on one other label
  (``knn_disagrees``): a clip that sounds like another class's material;
- **spectral sanity**: ``near_silence`` (peak below ``silence_peak_db`` or fewer than
  ``min_active_ratio`` of 50 ms frames above ``active_db``), ``dc_offset``, ``clipping``
  (samples at full scale), ``narrowband`` (most power within a few bins of the three
  strongest spectral peaks: a tone, a hum or a beep), ``low_bandwidth`` (99 % of the power
  below ``low_bandwidth_hz``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from marsctl.audio import load_audio
from marsctl.data.manifest import load_clips
from marsctl.data.paths import inside
from marsctl.errors import AudioError, ConfigError
from marsctl.files import atomic_path, write_json_atomic
from marsctl.progress import stage_progress

log = logging.getLogger(__name__)

AUDIT_DIR = "audit"
LABELS_FILE = f"{AUDIT_DIR}/labels.jsonl"
SUMMARY_FILE = f"{AUDIT_DIR}/summary.json"
SUMMARY_MD = f"{AUDIT_DIR}/summary.md"
N_MELS = 64


@dataclass(frozen=True)
class AuditConfig:
    #: encoder spec for the disagreement check (``load_encoder``: "default", "aisfx", a folder); None skips it
    encoder: Optional[str] = "default"
    prompt: str = "the sound of {label}"
    #: cosine of centred log-mel statistics at or above which two clips of different groups are compared frame by frame
    candidate_threshold: float = 0.9
    #: aligned log-mel correlation at or above which they are near duplicates
    near_threshold: float = 0.9
    knn_k: int = 5
    silence_peak_db: float = -40.0
    active_db: float = -50.0
    min_active_ratio: float = 0.05
    dc_offset: float = 0.02
    clip_level: float = 0.999
    max_clip_ratio: float = 0.005
    narrowband_ratio: float = 0.9
    low_bandwidth_hz: float = 1000.0
    batch_size: int = 16

    def __post_init__(self) -> None:
        for name in ("near_threshold", "candidate_threshold"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ConfigError(f"audit: {name} must be in (0, 1], got {getattr(self, name)}")
        if self.knn_k < 1:
            raise ConfigError(f"audit: knn_k must be at least 1, got {self.knn_k}")


@dataclass
class AuditSummary:
    clips: int
    flags: dict[str, int]
    flagged_clips: int
    exact_duplicates: list[dict[str, Any]] = field(default_factory=list)
    near_duplicates: list[dict[str, Any]] = field(default_factory=list)
    encoder: Optional[str] = None
    encoder_agreement: Optional[float] = None
    knn_agreement: float = 0.0
    classes: dict[str, dict[str, Any]] = field(default_factory=dict)
    unreadable: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- per-clip statistics


def spectral_stats(wave: np.ndarray, sr: int, config: AuditConfig) -> dict[str, float]:
    """Level, DC, clipping, and power-spectrum shape of one clip."""
    from scipy.signal import welch

    x = np.asarray(wave, dtype=np.float64)
    eps = 1e-12
    peak = float(np.max(np.abs(x))) if len(x) else 0.0
    rms = float(np.sqrt(np.mean(x**2))) if len(x) else 0.0
    frame = max(1, int(0.05 * sr))
    n = len(x) // frame
    frames = x[: n * frame].reshape(n, frame) if n else x[None, :]
    frame_db = 10 * np.log10(np.mean(frames**2, axis=1) + eps)
    freqs, psd = welch(x - x.mean(), fs=sr, nperseg=min(2048, max(16, len(x))))
    total = float(psd.sum()) + eps
    cumulative = np.cumsum(psd) / total
    rolloff99 = float(freqs[min(int(np.searchsorted(cumulative, 0.99)), len(freqs) - 1)])
    # power within +-3 bins of the three strongest peaks (a peak's neighbours are masked out first)
    remaining = psd.copy()
    near_peaks = 0.0
    for _ in range(3):
        k = int(np.argmax(remaining))
        lo, hi = max(0, k - 3), min(len(psd), k + 4)
        near_peaks += float(remaining[lo:hi].sum())
        remaining[lo:hi] = 0.0
    return {
        "peak_db": 20 * np.log10(peak + eps),
        "rms_db": 20 * np.log10(rms + eps),
        "active_ratio": float(np.mean(frame_db > config.active_db)),
        "dc": float(x.mean()) if len(x) else 0.0,
        "clip_ratio": float(np.mean(np.abs(x) >= config.clip_level)) if len(x) else 0.0,
        "narrowband_ratio": near_peaks / total,
        "rolloff99_hz": rolloff99,
    }


def spectral_flags(stats: dict[str, float], config: AuditConfig) -> list[str]:
    flags = []
    if stats["peak_db"] < config.silence_peak_db or stats["active_ratio"] < config.min_active_ratio:
        flags.append("near_silence")
    if abs(stats["dc"]) > config.dc_offset:
        flags.append("dc_offset")
    if stats["clip_ratio"] > config.max_clip_ratio:
        flags.append("clipping")
    if stats["narrowband_ratio"] > config.narrowband_ratio:
        flags.append("narrowband")
    if stats["rolloff99_hz"] < config.low_bandwidth_hz:
        flags.append("low_bandwidth")
    return flags


def logmel(wave: np.ndarray, sr: int) -> np.ndarray:
    """64 log-mel bands (dB, floored 80 dB below the clip's peak) x frames."""
    import librosa

    mel = librosa.feature.melspectrogram(y=np.asarray(wave, dtype=np.float32), sr=sr, n_fft=1024, hop_length=256, n_mels=N_MELS)
    db = 10 * np.log10(mel + 1e-10)
    return np.maximum(db, db.max() - 80.0)


def logmel_stats(db: np.ndarray) -> np.ndarray:
    """Mean and standard deviation over time of each log-mel band: a 128-dim fingerprint."""
    return np.concatenate([db.mean(axis=1), db.std(axis=1)]).astype(np.float64)


class _Aligned:
    """Time-lag spectra of band-centred log-mel spectrograms, computed once per clip, for :meth:`correlation`."""

    def __init__(self, spectrograms: list[np.ndarray]):
        longest = max(s.shape[1] for s in spectrograms)
        self.size = 1 << (2 * longest - 2).bit_length()
        self.spectra: dict[int, np.ndarray] = {}
        self.norms: dict[int, float] = {}
        self.spectrograms = spectrograms

    def _spectrum(self, i: int) -> np.ndarray:
        if i not in self.spectra:
            centred = self.spectrograms[i] - self.spectrograms[i].mean(axis=1, keepdims=True)
            self.norms[i] = float(np.linalg.norm(centred))
            self.spectra[i] = np.fft.rfft(centred, self.size, axis=1).astype(np.complex64)  # ~0.26 MB a clip
        return self.spectra[i]

    def correlation(self, i: int, k: int) -> float:
        """The largest normalised cross-correlation over time lags of clips ``i`` and ``k``."""
        product = (self._spectrum(i) * np.conj(self._spectrum(k))).sum(axis=0)
        norm = self.norms[i] * self.norms[k]
        return float(np.fft.irfft(product, self.size).max() / norm) if norm > 1e-12 else 0.0


def aligned_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """The largest normalised cross-correlation over time lags of two log-mel spectrograms, each band minus its mean."""
    return _Aligned([a, b]).correlation(0, 1)


def content_hash(wave: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(wave, dtype=np.float32).tobytes()).hexdigest()


def _unit_rows(features: np.ndarray) -> np.ndarray:
    centred = features - features.mean(axis=0, keepdims=True)
    norms = np.linalg.norm(centred, axis=1, keepdims=True)
    return centred / np.maximum(norms, 1e-12)


def encoder_verdicts(encoder, waves: list[np.ndarray], labels: list[str], label_set: list[str], sr: int,
                     prompt: str, batch_size: int) -> list[dict[str, Any]]:
    """Per clip: the encoder's top labels, the own label's rank (1 = nearest) and margin."""
    import torch

    index = {label: i for i, label in enumerate(label_set)}
    out: list[dict[str, Any]] = []
    with torch.no_grad():
        text = encoder.embed_text([prompt.format(label=label) for label in label_set]).float().cpu()
        for start in range(0, len(waves), batch_size):
            batch = [torch.as_tensor(w, dtype=torch.float32) for w in waves[start : start + batch_size]]
            sims = (encoder.embed_audio(batch, sr).float().cpu() @ text.T).numpy()
            for row, label in zip(sims, labels[start : start + batch_size]):
                order = np.argsort(-row)
                own = index[label]
                others = np.delete(row, own)
                out.append({
                    "top": [label_set[i] for i in order[:3]],
                    "own_rank": int(np.where(order == own)[0][0]) + 1,
                    "margin": float(row[own] - others.max()) if len(others) else float("inf"),
                })
    return out


# ---------------------------------------------------------------- the audit


def audit_dataset(dataset_dir: str | Path, config: AuditConfig = AuditConfig(), *, encoder=None,
                  progress: bool = True) -> AuditSummary:
    """Audit the kept clips of ``dataset_dir`` and write ``audit/`` (see the module docstring).

    ``encoder`` (a QueryEncoder) replaces loading ``config.encoder``.
    """
    dataset_dir = Path(dataset_dir)
    table = load_clips(dataset_dir).to_pandas()
    table = table[table["keep"]].reset_index(drop=True)
    if table.empty:
        raise ConfigError(f"{dataset_dir}: no kept clips to audit")
    sr = int(table["sample_rate"].iloc[0])
    records: list[dict[str, Any]] = []
    waves: list[np.ndarray] = []
    features: list[np.ndarray] = []
    spectrograms: list[np.ndarray] = []
    unreadable: list[str] = []
    with stage_progress("audit: reading clips", total=len(table), show=progress) as advance:
        for row in table.itertuples(index=False):
            try:
                wave = load_audio(inside(dataset_dir, row.audio_path), sr)
            except (AudioError, OSError, ValueError) as exc:
                log.warning("audit: %s: unreadable (%s)", row.clip_id, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                unreadable.append(row.clip_id)
                advance()
                continue
            stats = spectral_stats(wave, sr, config)
            records.append({
                "clip_id": row.clip_id, "label": row.label, "split": row.split, "group": row.group or row.clip_id,
                "audio_path": row.audio_path, "sha256": content_hash(wave),
                "spectral": {k: round(v, 6) for k, v in stats.items()}, "flags": spectral_flags(stats, config),
            })
            waves.append(wave)
            spectrograms.append(logmel(wave, sr))
            features.append(logmel_stats(spectrograms[-1]))
            advance()
    if not records:
        raise ConfigError(f"{dataset_dir}: none of the kept clips could be read")

    exact = _exact_duplicates(records)
    unit = _unit_rows(np.stack(features))
    cos = unit @ unit.T
    near = _near_duplicates(records, cos, spectrograms, config)
    knn_agree = _knn_verdicts(records, cos, config.knn_k)

    encoder_name = None
    encoder_agree = None
    if encoder is not None or config.encoder:
        if encoder is None:
            from marsctl.models.encoders import load_encoder

            encoder = load_encoder(config.encoder)
        encoder_name = config.encoder if config.encoder else type(encoder).__name__
        label_set = sorted({r["label"] for r in records})
        verdicts = encoder_verdicts(encoder, waves, [r["label"] for r in records], label_set, sr, config.prompt, config.batch_size)
        for record, verdict in zip(records, verdicts):
            record["encoder"] = verdict
            if verdict["own_rank"] != 1:
                record["flags"].append("encoder_disagrees")
        encoder_agree = float(np.mean([v["own_rank"] == 1 for v in verdicts]))

    summary = _summarise(records, exact, near, knn_agree, encoder_name, encoder_agree, unreadable)
    _write(dataset_dir, records, summary, config)
    return summary


def _exact_duplicates(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        by_hash[record["sha256"]].append(i)
    found = []
    for members in by_hash.values():
        groups = {records[i]["group"] for i in members}
        if len(groups) < 2:
            continue  # copies inside one recording group are the group's business
        splits = {records[i]["split"] for i in members}
        flag = "exact_duplicate_cross_split" if len(splits) > 1 else "exact_duplicate"
        for i in members:
            records[i]["flags"].append(flag)
            records[i]["exact_duplicates"] = [records[j]["clip_id"] for j in members if j != i]
        found.append({"clips": [records[i]["clip_id"] for i in members], "splits": sorted(splits), "cross_split": len(splits) > 1})
    return sorted(found, key=lambda d: (not d["cross_split"], d["clips"]))


def _near_duplicates(records: list[dict[str, Any]], cos: np.ndarray, spectrograms: list[np.ndarray],
                     config: AuditConfig) -> list[dict[str, Any]]:
    groups = np.array([r["group"] for r in records])
    masked = np.where(groups[:, None] != groups[None, :], cos, -np.inf)
    aligned: dict[tuple[int, int], float] = {}
    lags = _Aligned(spectrograms)
    for i, k in zip(*np.nonzero(np.triu(masked >= config.candidate_threshold, 1))):
        aligned[int(i), int(k)] = aligned[int(k), int(i)] = lags.correlation(int(i), int(k))
    found = []
    for i, record in enumerate(records):
        j = int(np.argmax(masked[i]))
        if not np.isfinite(masked[i, j]):
            continue
        record["nearest_other_group"] = {"clip_id": records[j]["clip_id"], "label": records[j]["label"], "split": records[j]["split"],
                                         "cosine": round(float(cos[i, j]), 5), "aligned": round(aligned.get((i, j), float("nan")), 5)}
        close = [k for k in np.where(masked[i] >= config.candidate_threshold)[0] if aligned[i, int(k)] >= config.near_threshold]
        if not close:
            continue
        cross = any(records[k]["split"] != record["split"] for k in close)
        record["flags"].append("near_duplicate_cross_split" if cross else "near_duplicate")
        record["near_duplicates"] = [records[k]["clip_id"] for k in close]
        for k in close:
            if i < k:
                found.append({"a": record["clip_id"], "b": records[k]["clip_id"], "cosine": round(float(cos[i, k]), 5),
                              "aligned": round(aligned[i, int(k)], 5), "labels": [record["label"], records[k]["label"]],
                              "splits": [record["split"], records[k]["split"]], "cross_split": record["split"] != records[k]["split"]})
    return sorted(found, key=lambda d: (not d["cross_split"], -d["aligned"]))


def _knn_verdicts(records: list[dict[str, Any]], cos: np.ndarray, k: int) -> float:
    """Flag clips whose k nearest clips of other groups never share their label and mostly agree on another."""
    groups = np.array([r["group"] for r in records])
    labels = [r["label"] for r in records]
    agree = []
    for i, record in enumerate(records):
        candidates = np.where(groups != groups[i])[0]
        if len(candidates) == 0:
            continue
        nearest = candidates[np.argsort(-cos[i, candidates])[:k]]
        votes = Counter(labels[j] for j in nearest)
        top, count = votes.most_common(1)[0]
        record["knn"] = {"labels": [labels[j] for j in nearest], "majority": top}
        has_own = record["label"] in votes
        agree.append(has_own)
        if not has_own and count > len(nearest) / 2:
            record["flags"].append("knn_disagrees")
    return float(np.mean(agree)) if agree else 0.0


def _summarise(records, exact, near, knn_agree, encoder_name, encoder_agree, unreadable) -> AuditSummary:
    flags = Counter(flag for r in records for flag in r["flags"])
    classes: dict[str, dict[str, Any]] = {}
    for label in sorted({r["label"] for r in records}):
        mine = [r for r in records if r["label"] == label]
        entry: dict[str, Any] = {"clips": len(mine), "flagged": sum(bool(r["flags"]) for r in mine)}
        if encoder_agree is not None:
            entry["encoder_top1"] = round(float(np.mean([r["encoder"]["own_rank"] == 1 for r in mine])), 3)
            entry["encoder_nearest"] = Counter(r["encoder"]["top"][0] for r in mine).most_common(1)[0][0]
        entry["knn_disagrees"] = sum("knn_disagrees" in r["flags"] for r in mine)
        classes[label] = entry
    return AuditSummary(
        clips=len(records), flags=dict(sorted(flags.items())), flagged_clips=sum(bool(r["flags"]) for r in records),
        exact_duplicates=exact, near_duplicates=near, encoder=encoder_name,
        encoder_agreement=None if encoder_agree is None else round(encoder_agree, 4),
        knn_agreement=round(knn_agree, 4), classes=classes, unreadable=unreadable,
    )


def _write(dataset_dir: Path, records: list[dict[str, Any]], summary: AuditSummary, config: AuditConfig) -> None:
    with atomic_path(dataset_dir / LABELS_FILE) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record, sort_keys=True) + "\n")
    write_json_atomic(dataset_dir / SUMMARY_FILE, {"config": asdict(config), **asdict(summary)})
    lines = [f"# Label audit ({summary.clips} clips)", "",
             f"Flagged clips: {summary.flagged_clips}. kNN agreement (own label among the {config.knn_k} nearest clips "
             f"of other groups): {summary.knn_agreement:.3f}."]
    if summary.encoder is not None:
        lines.append(f"Encoder `{summary.encoder}` top-1 agreement with the label: {summary.encoder_agreement:.3f}.")
    lines += ["", "| flag | clips |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in summary.flags.items()]
    cross = [d for d in summary.near_duplicates if d["cross_split"]]
    lines += ["", f"Exact duplicates across groups: {len(summary.exact_duplicates)} sets "
              f"({sum(d['cross_split'] for d in summary.exact_duplicates)} across splits). "
              f"Near duplicates (aligned log-mel correlation >= {config.near_threshold}): {len(summary.near_duplicates)} pairs, "
              f"{len(cross)} across splits."]
    if cross:
        lines += ["", "| clip | clip | aligned correlation | labels | splits |", "|---|---|---:|---|---|"]
        lines += [f"| {d['a']} | {d['b']} | {d['aligned']:.3f} | {' / '.join(d['labels'])} | {'/'.join(d['splits'])} |" for d in cross[:100]]
    header = "| class | clips | flagged | kNN disagrees |" + (" encoder top-1 | encoder's nearest |" if summary.encoder else "")
    lines += ["", header, "|---|---:|---:|---:|" + ("---:|---|" if summary.encoder else "")]
    for label, entry in summary.classes.items():
        row = f"| {label} | {entry['clips']} | {entry['flagged']} | {entry['knn_disagrees']} |"
        if summary.encoder:
            row += f" {entry['encoder_top1']:.2f} | {entry['encoder_nearest']} |"
        lines.append(row)
    with atomic_path(dataset_dir / SUMMARY_MD) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n", encoding="utf-8")
