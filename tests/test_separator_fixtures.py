"""Helpers shared by the separator/training/separate tests (no tests here).

``make_tone_dataset`` writes a tiny dataset directory that follows the shared contract
(clips/, manifests/clips.parquet, mixtures/ + manifests/mixtures.parquet) with three
spectrally distinct synthetic classes. ``LabelTestEncoder`` is a small real
:class:`QueryEncoder` for tests: text -> a fixed random unit vector per label (seeded by
the label's hash), audio -> normalised log band energies, image -> mean colour.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from marsctl.audio import save_audio
from marsctl.data.manifest import write_clips, write_mixtures
from marsctl.models.encoder_base import QueryEncoder
from marsctl.models.query import normalize

SR = 16_000
CLASSES = ("low hum", "high whistle", "noise hiss")


def synth(label: str, seconds: float, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    if label == "low hum":
        f0 = rng.uniform(110, 220)
        wave = sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6)) / k for k in range(1, 5))
    elif label == "high whistle":
        f0 = rng.uniform(2500, 3500)
        wave = np.sin(2 * np.pi * f0 * t + 3 * np.sin(2 * np.pi * rng.uniform(3, 6) * t))
    else:
        spectrum = np.fft.rfft(rng.standard_normal(len(t)))
        freqs = np.fft.rfftfreq(len(t), 1 / SR)
        spectrum[(freqs < 5500) | (freqs > 7500)] = 0
        wave = np.fft.irfft(spectrum, n=len(t))
    envelope = 0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t + rng.uniform(0, 6))
    wave = wave * envelope
    return (0.5 * wave / np.abs(wave).max()).astype(np.float32)


COLOURS = {"low hum": (200, 30, 30), "high whistle": (30, 200, 30), "noise hiss": (30, 30, 200)}


def write_frame(path: Path, label: str) -> None:
    from torchvision.io import write_jpeg

    path.parent.mkdir(parents=True, exist_ok=True)
    image = torch.tensor(COLOURS[label], dtype=torch.uint8).view(3, 1, 1).expand(3, 32, 32).contiguous()
    write_jpeg(image, str(path))


def make_tone_dataset(root: Path, clips_per_class=(6, 2, 2), seconds: float = 1.0, mixtures_per_split: int = 3, frames: bool = False) -> Path:
    rng = np.random.default_rng(123)
    rows = []
    waves = {}
    for split, count in zip(("train", "val", "test"), clips_per_class):
        for label in CLASSES:
            for i in range(count):
                clip_id = f"{label.replace(' ', '_')}_{split}_{i}"
                rel = f"clips/{label}/{clip_id}.flac"
                wave = synth(label, seconds, rng)
                save_audio(root / rel, wave, SR)
                waves[clip_id] = wave
                frame_paths = []
                if frames:
                    frame_paths = [f"frames/{label}/{clip_id}/000.jpg"]
                    write_frame(root / frame_paths[0], label)
                rows.append(dict(
                    clip_id=clip_id, label=label, split=split, audio_path=rel, frame_paths=frame_paths, duration_s=seconds,
                    sample_rate=SR, source="synthetic", keep=True, drop_reason="", silence_ratio=0.0, clip_ratio=0.0,
                    loudness_lufs=-20.0, rms_db=-12.0, peak_db=-6.0, semantic_margin=None,
                ))
    write_clips(root, rows)
    mixture_rows = []
    for split in ("val", "test"):
        split_rows = [r for r in rows if r["split"] == split]
        for m in range(mixtures_per_split):
            a, b = split_rows[m % len(split_rows)], None
            for r in split_rows[::-1]:
                if r["label"] != a["label"]:
                    b = r
                    break
            mixture_id = f"{split}-{m:03d}"
            base = Path("mixtures") / split / mixture_id
            sources = [waves[a["clip_id"]] * 0.5, waves[b["clip_id"]] * 0.5]
            save_audio(root / base / "mixture.wav", sources[0] + sources[1], SR)
            paths = []
            for row, src in zip((a, b), sources):
                save_audio(root / base / f"{row['label']}.wav", src, SR)
                paths.append(str(base / f"{row['label']}.wav"))
            mixture_rows.append(dict(
                mixture_id=mixture_id, split=split, mixture_path=str(base / "mixture.wav"),
                source_clip_ids=[a["clip_id"], b["clip_id"]], source_labels=[a["label"], b["label"]],
                source_paths=paths, source_frame_paths=[a["frame_paths"], b["frame_paths"]], source_offsets=[0, 0], gains=[0.5, 0.5],
                snr_db=None, seed=m,
            ))
    write_mixtures(root, mixture_rows)
    return root


class LabelTestEncoder(QueryEncoder):
    """A deterministic test encoder (not a learned model): see the module docstring."""

    def __init__(self, embedding_dim: int = 16):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.register_buffer("anchor", torch.zeros(1))

    def embed_text(self, texts):
        vectors = []
        for text in texts:
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
            vectors.append(torch.randn(self.embedding_dim, generator=torch.Generator().manual_seed(seed)))
        return normalize(torch.stack(vectors))

    def embed_audio(self, waveforms, sample_rate, *, differentiable=False):
        waves = [torch.as_tensor(w, dtype=torch.float32) for w in waveforms]
        if not differentiable:  # the QueryEncoder contract: no graph back to the waveforms unless asked
            waves = [w.detach() for w in waves]
        out = []
        for w in waves:
            power = torch.fft.rfft(w).abs() ** 2
            bands = torch.stack([b.sum() for b in torch.tensor_split(power, self.embedding_dim)])
            out.append(torch.log1p(bands))
        return normalize(torch.stack(out))

    def embed_image(self, images):
        colour = images.float().mean(dim=(-2, -1))
        return normalize(torch.nn.functional.pad(colour, (0, self.embedding_dim - 3)) + 1e-3)
