"""The clean+ filter: signal scores, drop reasons, the semantic check, rescoring from the cache."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pytest
import soundfile as sf
import torch

from data_fixtures import SR
from marsctl.data import load_clips
from marsctl.data.filter import filter_clips, semantic_margins, signal_scores
from marsctl.data.recipe import FilterConfig, recipe_from_mapping
from marsctl.data.records import ClipRecord
from marsctl.models.encoder_base import QueryEncoder


class BandEnergyEncoder(QueryEncoder):
    """A small, transparent QueryEncoder for the semantic check: 2-D space (low band, high band).

    Audio -> the unit vector of its energy below / above 1 kHz; text "low"/"high" -> the axes.
    It implements the real interface, so the filter code under test is the code users run.
    """

    embedding_dim = 2

    def embed_text(self, texts: Sequence[str]) -> torch.Tensor:
        vecs = [[1.0, 0.2] if "low" in t else [0.2, 1.0] for t in texts]
        return torch.nn.functional.normalize(torch.tensor(vecs), dim=-1)

    def embed_audio(self, waveforms, sample_rate: int) -> torch.Tensor:
        out = []
        for w in waveforms:
            power = torch.fft.rfft(torch.as_tensor(w, dtype=torch.float32)).abs() ** 2
            freqs = torch.fft.rfftfreq(len(w), 1 / sample_rate)
            out.append(torch.stack([power[freqs < 1000].sum(), power[freqs >= 1000].sum()]))
        return torch.nn.functional.normalize(torch.stack(out), dim=-1)

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("audio/text only")


def test_signal_scores_measure_what_they_say():
    config = FilterConfig()
    t = np.arange(4 * SR) / SR
    sine = (0.1 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    scores = signal_scores(sine, SR, config)
    assert scores["duration_s"] == 4.0 and scores["silence_ratio"] == 0.0 and scores["clip_ratio"] == 0.0
    # BS.1770: a full-scale 1 kHz sine reads -3.01 LUFS, so amplitude 0.1 reads about -23 LUFS
    assert scores["loudness_lufs"] == pytest.approx(-23.0, abs=0.3)
    assert scores["rms_db"] == pytest.approx(20 * np.log10(0.1 / np.sqrt(2)), abs=0.05)
    assert scores["peak_db"] == pytest.approx(-20.0, abs=0.05)
    half = sine.copy()
    half[: 2 * SR] = 0.0
    assert signal_scores(half, SR, config)["silence_ratio"] == pytest.approx(0.5, abs=0.02)
    clipped = np.clip(sine * 30, -1, 1)
    assert signal_scores(clipped, SR, config)["clip_ratio"] > 0.3
    silent = signal_scores(np.zeros(SR, np.float32), SR, config)
    assert silent["loudness_lufs"] == -120.0 and silent["rms_db"] == -120.0


def _records(tmp_path, specs):
    records = []
    for clip_id, label, split, wave in specs:
        rel = f"clips/{label}/{clip_id}.flac"
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(tmp_path / rel), wave, SR)
        records.append(ClipRecord(clip_id, label, split, f"test:{clip_id}", audio_path=rel, duration_s=len(wave) / SR, sample_rate=SR))
    return records


def tone(freq, seconds=3.0, amplitude=0.1):
    t = np.arange(int(seconds * SR)) / SR
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_filter_keeps_scores_and_reasons_and_refilters_from_cache(tmp_path, monkeypatch):
    quiet = tone(300, amplitude=0.006)  # RMS -47 dBFS: above the silence threshold, below -40 LUFS
    gappy = tone(300)
    gappy[: int(2.5 * SR)] = 0
    records = _records(
        tmp_path,
        [
            ("good", "low", "train", tone(300)),
            ("short", "low", "train", tone(300, seconds=0.5)),
            ("gappy", "low", "train", gappy),
            ("loud", "high", "test", np.clip(tone(3000, amplitude=3.0), -1, 1)),
            ("quiet", "high", "test", quiet),
            ("music", "playing violin", "test", tone(3000)),
        ],
    )
    records.append(ClipRecord("broken", "low", "train", "test:broken", audio_path="clips/low/broken.flac"))
    (tmp_path / "clips/low/broken.flac").write_bytes(b"not flac at all")
    records.append(ClipRecord("dead", "low", "train", "youtube:x", status="failed", reason="download: 404"))
    recipe = recipe_from_mapping(
        {"name": "t", "folder": {}, "filter": {"min_duration_s": 1.0, "min_loudness_lufs": -40.0, "exclude_labels": ["^playing "]}}
    )
    result = filter_clips(recipe, tmp_path, records, progress=False)
    reasons = {r["clip_id"]: r["drop_reason"].split(":")[0] for r in result.rows}
    assert reasons == {
        "good": "", "short": "too_short", "gappy": "silent", "loud": "clipped", "quiet": "too_quiet",
        "music": "excluded_label", "broken": "unreadable",
    }  # the failed download is not a clip
    table = load_clips(tmp_path).to_pandas().set_index("clip_id")
    assert bool(table.loc["good", "keep"]) and not table.loc["gappy", "keep"]
    assert table.loc["gappy", "silence_ratio"] == pytest.approx(2.5 / 3, abs=0.02)
    assert "broken.flac" in table.loc["broken", "drop_reason"]

    # new thresholds, no audio decoded: the scores come from the cache
    import marsctl.data.filter as filter_module

    def no_decoding(*args, **kwargs):
        raise AssertionError("audio decoded although the cached scores were valid")

    monkeypatch.setattr(filter_module, "load_audio", no_decoding)
    looser = recipe_from_mapping(
        {"name": "t", "folder": {}, "filter": {"min_duration_s": 0.2, "max_silence_ratio": 0.9, "exclude_labels": []}}
    )
    result = filter_clips(looser, tmp_path, records, progress=False)
    kept = sorted(r["clip_id"] for r in result.rows if r["keep"])
    assert kept == ["gappy", "good", "music", "quiet", "short"]
    monkeypatch.undo()

    # a clip re-fetched with other audio is scored again, not served from the stale cache
    sf.write(str(tmp_path / "clips/low/gappy.flac"), tone(300), SR)
    result = filter_clips(looser, tmp_path, records, progress=False)
    assert {r["clip_id"]: r["silence_ratio"] for r in result.rows}["gappy"] == 0.0


def test_semantic_check_drops_clips_that_do_not_sound_like_their_label(tmp_path):
    encoder = BandEnergyEncoder()
    margins = semantic_margins(encoder, [tone(200), tone(4000)], ["low", "low"], ["high", "low"], SR, "{label}")
    assert margins[0] > 0.5 and margins[1] < -0.5
    records = _records(
        tmp_path,
        [("ok-low", "low", "train", tone(200)), ("ok-high", "high", "train", tone(4000)),
         ("mislabeled", "low", "train", tone(4000))],
    )
    recipe = recipe_from_mapping(
        {"name": "t", "folder": {}, "filter": {"semantic": {"enabled": True, "margin": 0.1, "prompt": "{label}"}}}
    )
    result = filter_clips(recipe, tmp_path, records, encoder=encoder, progress=False)
    by_id = {r["clip_id"]: r for r in result.rows}
    assert by_id["ok-low"]["keep"] and by_id["ok-high"]["keep"]
    assert by_id["mislabeled"]["drop_reason"].startswith("semantic:")
    assert by_id["mislabeled"]["semantic_margin"] < 0
    # cached: a stricter margin re-decides without the encoder
    stricter = recipe_from_mapping(
        {"name": "t", "folder": {}, "filter": {"semantic": {"enabled": True, "margin": 0.99, "prompt": "{label}"}}}
    )
    result = filter_clips(stricter, tmp_path, records, encoder=None, progress=False)
    assert sum(r["keep"] for r in result.rows) == 0


def test_semantic_check_loads_the_recipe_encoder_through_load_encoder(tmp_path):
    """The wiring users get: filter.semantic.encoder is loaded by marsctl.models.encoders.load_encoder.

    The built-in encoder's audio tower is untrained until 'marsctl align', so only the
    plumbing is checked here (a margin per clip, in [-2, 2], cached for the next run).
    """
    pytest.importorskip("marsctl.models.encoders")
    records = _records(tmp_path, [("a", "low", "train", tone(200)), ("b", "high", "train", tone(4000))])
    recipe = recipe_from_mapping(
        {"name": "t", "folder": {}, "filter": {"semantic": {"enabled": True, "encoder": "builtin", "margin": -2.0}}}
    )
    result = filter_clips(recipe, tmp_path, records, progress=False)
    margins = [r["semantic_margin"] for r in result.rows]
    assert all(m is not None and -2.0 <= m <= 2.0 for m in margins)
    assert all(r["keep"] for r in result.rows)
    again = filter_clips(recipe, tmp_path, records, encoder=BandEnergyEncoder(), progress=False)
    assert [r["semantic_margin"] for r in again.rows] == margins  # from the cache, not re-embedded
