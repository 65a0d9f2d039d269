"""Evaluate separated audio stored as folders against reference folders.

Layout (OmniSep/CLIPSep: the sources of one mixture are scored jointly)::

    references/<mixture>/<source>.wav      one file per source (any audio format)
    references/<mixture>/mixture.wav       optional: the mixture, for SI-SDRi
    estimates/<mixture>/<source>.wav       same relative names (the suffix may differ)
    mixtures/<mixture>.wav                 alternative place for the mixture (--mixtures)

A file directly under ``references/`` is a mixture with a single source, named by its
stem. Sources are paired by relative path; BSS-Eval runs over all sources of a mixture
at once, so SIR measures leakage of the other sources. A mixture with one reference
gets SDR/SAR/SI-SDR(i), and its SIR is reported as undefined.

An estimate (or mixture) at another rate is resampled to the references' rate, and the
sample a resampling may add or lose is trimmed or zero-padded. Problems with single files
(no estimate, no reference, unreadable, different length or rate) become
:class:`~marsctl.eval.report.Failure` entries and the run goes on. Scoring is
:func:`marsctl.eval.scoring.score_systems`: silent estimates are scored at its floor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from marsctl.audio.io import AUDIO_SUFFIXES, is_audio_path, load_audio_native
from marsctl.audio.resample import resample
from marsctl.config import SignalConfig
from marsctl.errors import AudioError, MarsctlError
from marsctl.eval.report import EvalReport, Failure, SourceScores
from marsctl.eval.scoring import SEPARATION_METRICS, fit_length, resampling_tolerance, score_systems
from marsctl.metrics.separation import silent

MIXTURE_STEM = "mixture"


@dataclass
class SourcePair:
    name: str
    reference: Path
    estimate: Path


@dataclass
class MixtureEntry:
    """One mixture to score: its sources' reference/estimate pairs and, if known, the mixture file."""

    mixture_id: str
    sources: list[SourcePair] = field(default_factory=list)
    mixture_path: Path | None = None


def _audio_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and is_audio_path(p) and not p.name.startswith("."))


def _find_with_any_suffix(base: Path) -> Path | None:
    """``base`` with its own suffix if it exists, else the same stem with any audio suffix."""
    if base.is_file():
        return base
    for suffix in sorted(AUDIO_SUFFIXES):
        candidate = base.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    return None


def discover_mixtures(
    references_dir: Path, estimates_dir: Path, mixtures_dir: Path | None = None
) -> tuple[list[MixtureEntry], list[Failure]]:
    """Pair reference and estimate files by relative path and group them into mixtures."""
    for label, folder in (("references", references_dir), ("estimates", estimates_dir), ("mixtures", mixtures_dir)):
        if folder is not None and not folder.is_dir():
            raise MarsctlError(f"{folder}: {label} directory does not exist")
    failures: list[Failure] = []
    entries: dict[str, MixtureEntry] = {}
    matched_estimates: set[Path] = set()

    for ref in _audio_files(references_dir):
        rel = ref.relative_to(references_dir)
        if rel.parent == Path("."):
            mixture_id = rel.stem
        else:
            mixture_id = rel.parent.as_posix()
            if rel.stem == MIXTURE_STEM:
                entries.setdefault(mixture_id, MixtureEntry(mixture_id)).mixture_path = ref
                continue
        entry = entries.setdefault(mixture_id, MixtureEntry(mixture_id))
        estimate = _find_with_any_suffix(estimates_dir / rel)
        if estimate is None:
            failures.append(Failure(str(estimates_dir / rel), f"no estimate for reference {ref}"))
            continue
        matched_estimates.add(estimate.resolve())
        entry.sources.append(SourcePair(rel.stem, ref, estimate))

    for est in _audio_files(estimates_dir):
        rel = est.relative_to(estimates_dir)
        if est.resolve() not in matched_estimates and not (rel.parent != Path(".") and rel.stem == MIXTURE_STEM):
            failures.append(Failure(str(est), "no matching reference file"))

    for entry in entries.values():
        if mixtures_dir is not None:
            found = _find_with_any_suffix(mixtures_dir / f"{entry.mixture_id}.wav") or _find_with_any_suffix(
                mixtures_dir / entry.mixture_id / f"{MIXTURE_STEM}.wav"
            )
            if found is not None:
                entry.mixture_path = found
            elif entry.mixture_path is None:
                failures.append(Failure(str(mixtures_dir / f"{entry.mixture_id}.wav"), "mixture not found; SI-SDRi not computed"))
    return [e for e in entries.values() if e.sources], failures


@dataclass
class LoadedMixture:
    mixture_id: str
    names: list[str]
    references: torch.Tensor  # [S, T]
    estimates: torch.Tensor  # [S, T]
    mixture: torch.Tensor | None  # [T]
    sample_rate: int
    notes: dict[str, str] = field(default_factory=dict)


def load_mixture(entry: MixtureEntry, failures: list[Failure]) -> LoadedMixture | None:
    """Load one mixture's files at the references' rate; problems are appended to ``failures``."""
    names, refs, ests, notes = [], [], [], {}
    rate: int | None = None
    for pair in entry.sources:
        try:
            ref, ref_sr = load_audio_native(pair.reference)
        except AudioError as exc:
            failures.append(Failure(exc.path, exc.problem))
            continue
        if rate is None:
            rate = ref_sr
        elif ref_sr != rate:
            failures.append(Failure(str(pair.reference), f"sample rate {ref_sr} Hz differs from the mixture's other references ({rate} Hz)"))
            continue
        try:  # NaN/Inf samples are a failed separation: scored at the floor, with its partners scored jointly
            est, est_sr = load_audio_native(pair.estimate, allow_nonfinite=True)
        except AudioError as exc:
            failures.append(Failure(exc.path, exc.problem))
            continue
        est = torch.from_numpy(est)
        if est_sr != ref_sr:
            est = resample(est, est_sr, ref_sr)
            notes[pair.name] = f"estimate resampled {est_sr}->{ref_sr} Hz"
        fitted = fit_length(est, len(ref), resampling_tolerance(est_sr, ref_sr))
        if fitted is None:
            failures.append(
                Failure(str(pair.estimate), f"length mismatch: estimate has {est.shape[-1]} samples, reference {pair.reference} has {len(ref)}")
            )
            continue
        est = fitted
        if refs and len(ref) != refs[0].shape[-1]:
            failures.append(Failure(str(pair.reference), f"length {len(ref)} differs from the mixture's other references ({refs[0].shape[-1]})"))
            continue
        if bool(silent(torch.from_numpy(ref))):
            failures.append(Failure(str(pair.reference), "reference is silent; BSS-Eval and SI-SDR are undefined"))
            continue
        names.append(pair.name)
        refs.append(torch.from_numpy(ref))
        ests.append(est)
    if not names:
        return None
    skipped = [p.name for p in entry.sources if p.name not in names]
    if skipped and len(entry.sources) > 1:
        for name in names:
            notes[name] = "; ".join(filter(None, [notes.get(name), f"scored without {', '.join(skipped)}"]))
    mixture = None
    if entry.mixture_path is not None:
        try:
            mix, mix_sr = load_audio_native(entry.mixture_path)
            mix = resample(torch.from_numpy(mix), mix_sr, rate)
            fitted = fit_length(mix, refs[0].shape[-1], resampling_tolerance(mix_sr, rate))
            if fitted is None:
                failures.append(
                    Failure(str(entry.mixture_path), f"length mismatch: mixture has {mix.shape[-1]} samples, references {refs[0].shape[-1]}; SI-SDRi not computed")
                )
            else:
                mixture = fitted
        except AudioError as exc:
            failures.append(Failure(exc.path, f"{exc.problem}; SI-SDRi not computed"))
    assert rate is not None
    return LoadedMixture(entry.mixture_id, names, torch.stack(refs), torch.stack(ests), mixture, rate, notes)


def score_mixtures(batch: list[LoadedMixture]) -> list[SourceScores]:
    """Score mixtures of identical shape ``[S, T]`` in one batched call of the scoring path."""
    references = torch.stack([m.references for m in batch])
    estimates = torch.stack([m.estimates for m in batch])
    mixtures = torch.stack([m.mixture for m in batch]) if batch[0].mixture is not None else None
    (scores,) = score_systems(references, [estimates], mixtures, SignalConfig(sample_rate=batch[0].sample_rate))
    rows: list[SourceScores] = []
    for b, mix in enumerate(batch):
        for s, name in enumerate(mix.names):
            row = SourceScores(mixture=mix.mixture_id, source=name)
            for metric in SEPARATION_METRICS:
                value = float(scores.metrics[metric][b, s])
                setattr(row, metric, value if math.isfinite(value) else None)
            notes = [mix.notes.get(name, ""), *scores.notes((b, s))]
            if len(mix.names) == 1:
                notes.append("single source: SIR undefined")
            row.note = "; ".join(n for n in notes if n)
            rows.append(row)
    return rows


def evaluate_folders(
    estimates_dir: str | Path,
    references_dir: str | Path,
    mixtures_dir: str | Path | None = None,
    progress: Callable[[Iterable, int, str], Iterable] | None = None,
    batch_size: int = 32,
) -> EvalReport:
    """Pair, load and score every mixture under the two folders; never stops at a bad file.

    ``progress(iterable, total, description)`` wraps the loops (e.g. a rich progress bar).
    """
    estimates_dir, references_dir = Path(estimates_dir), Path(references_dir)
    mixtures_path = Path(mixtures_dir) if mixtures_dir is not None else None
    entries, failures = discover_mixtures(references_dir, estimates_dir, mixtures_path)
    if not entries and not failures:
        raise MarsctlError(f"{references_dir}: no audio files found")
    wrap = progress or (lambda it, total, desc: it)

    rows: list[SourceScores] = []
    pending: dict[tuple[int, int, int, bool], list[LoadedMixture]] = {}

    def flush(key: tuple[int, int, int, bool]) -> None:
        rows.extend(score_mixtures(pending.pop(key)))

    for entry in wrap(entries, len(entries), "Scoring mixtures"):
        loaded = load_mixture(entry, failures)
        if loaded is None:
            continue
        key = (*loaded.references.shape, loaded.sample_rate, loaded.mixture is not None)
        pending.setdefault(key, []).append(loaded)
        if len(pending[key]) >= batch_size:
            flush(key)
    for key in list(pending):
        flush(key)
    rows.sort(key=lambda r: (r.mixture, r.source))
    settings = {
        "estimates": str(estimates_dir),
        "references": str(references_dir),
        "mixtures": str(mixtures_path) if mixtures_path else None,
        "bss_eval": "v3 sources, 512-tap filters, full-length window (museval window=inf), sources of a mixture scored jointly",
    }
    return EvalReport(rows=rows, failures=failures, settings=settings)
