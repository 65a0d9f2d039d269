"""Perfect and failed estimates count honestly (issue 32, items 6 and 7): every dB score is held to
[-60, +60] dB, a perfect estimate is scored at the ceiling and kept in n, an estimate with one NaN
sample is scored at the floor and kept in the mean, and its partner is still scored jointly."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from marsctl.eval import evaluate_folders, score
from marsctl.metrics.separation import DB_CEILING, DB_FLOOR, bounded_si_sdr_improvement, si_sdr

SR = 16_000


def _write(path: Path, wave: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.asarray(wave, dtype=np.float32), SR, subtype="FLOAT")


def _sources(rng: np.random.Generator, length: int = 8000) -> np.ndarray:
    a = np.convolve(rng.standard_normal(length), np.hanning(16), "same") * 0.1
    b = 0.2 * np.sin(2 * np.pi * 330 * np.arange(length) / SR)
    return np.stack([a, b]).astype(np.float32)


def test_a_perfect_estimate_scores_the_ceiling_on_every_metric():
    refs = torch.from_numpy(_sources(np.random.default_rng(0)))
    scores = score(refs.clone(), refs, mixture=refs.sum(0))
    for metric in ("sdr", "sir", "sar", "si_sdr"):
        assert scores[metric].tolist() == [DB_CEILING, DB_CEILING], metric
    mixture_si_sdr = si_sdr(refs, refs.sum(0).expand_as(refs))
    assert torch.allclose(scores["si_sdri"], DB_CEILING - mixture_si_sdr.double())
    single = score(refs[:1].clone(), refs[:1])
    assert single["sdr"].item() == DB_CEILING and single["si_sdr"].item() == DB_CEILING and math.isnan(single["sir"].item())


def test_perfect_and_nan_estimates_stay_in_n_and_the_partner_is_scored_jointly(tmp_path):
    rng = np.random.default_rng(1)
    refs, ests = tmp_path / "refs", tmp_path / "ests"
    for i in range(3):
        sources = _sources(rng)
        for name, ref in zip(("noise", "tone"), sources):
            _write(refs / f"m{i}" / f"{name}.wav", ref)
            _write(ests / f"m{i}" / f"{name}.wav", ref + 0.3 * sources.sum(0))
        _write(refs / f"m{i}" / "mixture.wav", sources.sum(0))
    _write(ests / "m0" / "noise.wav", sf.read(refs / "m0" / "noise.wav")[0])  # perfect
    broken = sf.read(ests / "m1" / "tone.wav")[0].astype(np.float32)
    broken[123] = np.nan  # one NaN sample: a failed separation
    _write(ests / "m1" / "tone.wav", broken)
    partner_alone = sf.read(ests / "m1" / "noise.wav")[0]

    report = evaluate_folders(ests, refs)
    assert report.failures == []
    rows = {(r.mixture, r.source): r for r in report.rows}
    perfect, failed, partner = rows[("m0", "noise")], rows[("m1", "tone")], rows[("m1", "noise")]
    assert (perfect.sdr, perfect.sir, perfect.sar, perfect.si_sdr) == (DB_CEILING,) * 4 and "ceiling" in perfect.note
    assert (failed.sdr, failed.sir, failed.sar, failed.si_sdr) == (DB_FLOOR,) * 4 and "floor" in failed.note
    assert partner.sir is not None and "scored without" not in partner.note  # scored with its NaN partner's reference
    joint = score(np.stack([partner_alone, np.zeros_like(partner_alone)]),
                  [refs / "m1" / "noise.wav", refs / "m1" / "tone.wav"], mixture=refs / "m1" / "mixture.wav")
    assert partner.sir == float(joint["sir"][0]) and partner.sdr == float(joint["sdr"][0])
    summary = report.summary()
    assert all(summary[m].count == 6 for m in ("sdr", "sir", "sar", "si_sdr", "si_sdri"))


def test_validation_si_sdri_floors_silent_and_failed_estimates():
    refs = torch.from_numpy(_sources(np.random.default_rng(2))).double()
    mixture = refs.sum(0)
    estimates = torch.stack([torch.zeros_like(refs[0]), refs[1].clone()])
    estimates_nan = torch.stack([refs[0] + 0.1 * refs[1], refs[1].clone()])
    estimates_nan[0, 5] = math.nan
    for ests in (estimates, estimates_nan):
        improvement = bounded_si_sdr_improvement(refs, ests, mixture)
        assert torch.isfinite(improvement).all()
        assert improvement[0] < DB_FLOOR + 10 and improvement[1] > DB_CEILING - 10
