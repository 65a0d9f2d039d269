"""Evaluating a separator on a dataset's fixed test mixtures (the library behind ``marsctl eval --model``).

As OmniSep/CLIPSep do, every source of every fixed test mixture is separated with its
*own* query, and scored against that source as it sits in the mix:

* BSS-Eval SDR/SIR/SAR (both sources of a mixture scored jointly, museval ``window=inf``),
  SI-SDR, SI-SDRi over the mixture, STFT distance (all from :mod:`marsctl.metrics.separation`);
* CLAP score: 100 * cos(text embedding of the source's label, audio embedding of the
  estimate), with the chosen encoder (default: the model's own query encoder).

Query modalities (``query_modality``):

* ``text``: the source's class label;
* ``audio``: another clip of the same class from the same split (never the source itself;
  the first other kept clip in manifest order, so the choice is fixed);
* ``image``: the first video frame of the source clip (needs a dataset with frames);
* ``omni``: the three fused with equal weights (those that are available).

Two reference systems are scored on the same sources: ``mixture`` (the unprocessed mix
as the estimate) and ``oracle-irm`` (the ideal ratio mask |S_n| / sum_k |S_k| applied to
the mixture STFT, the ceiling of a mask-based separator with mixture phase).

Rows (one per system x modality x source) are summarised as mean +/- standard error per
system and modality, and per class.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from marsctl.audio import Spectrogram, load_audio
from marsctl.errors import MarsctlError
from marsctl.metrics.separation import bss_eval_sources, si_sdr, si_sdr_improvement, silent, stft_distance
from marsctl.models.encoder_base import QueryEncoder
from marsctl.models.query import fuse
from marsctl.models.separator import LoadedSeparator
from marsctl.separation import SeparateOptions, load_image, separate_waveform

QUERY_MODALITIES = ("text", "audio", "image", "omni")
METRICS = ("sdr", "sir", "sar", "si_sdr", "si_sdri", "stft_distance", "clap_score")


@dataclasses.dataclass
class TestMixture:
    mixture_id: str
    mixture: np.ndarray  # [T]
    sources: np.ndarray  # [S, T] as in the mix
    labels: list[str]
    clip_ids: list[str]
    frame_paths: list[list[str]]


def load_test_mixtures(dataset_dir: str | Path, split: str = "test", limit: int | None = None) -> list[TestMixture]:
    from marsctl.data.manifest import load_mixtures

    root = Path(dataset_dir)
    table = load_mixtures(root, split=split)
    if len(table) == 0:
        raise MarsctlError(f"{root}: no fixed '{split}' mixtures in manifests/mixtures.parquet")
    out = []
    for i in range(len(table) if limit is None else min(limit, len(table))):
        row = table[i]
        mixture = load_audio(root / row["mixture_path"], None)
        sources = np.stack([load_audio(root / p, None) for p in row["source_paths"]])
        n = min(len(mixture), sources.shape[1])
        out.append(TestMixture(row["mixture_id"], mixture[:n], sources[:, :n], list(row["source_labels"]),
                               list(row["source_clip_ids"]), [list(p) for p in row["source_frame_paths"]]))
    return out


def oracle_irm(mixture: torch.Tensor, sources: torch.Tensor, spectrogram: Spectrogram) -> torch.Tensor:
    """Ideal ratio mask estimates: iSTFT(|S_n| / sum_k |S_k| * X) for each source, ``[S, T]``."""
    X = spectrogram.stft(mixture)
    S = spectrogram.stft(sources).abs()
    mask = S / S.sum(0, keepdim=True).clamp_min(1e-12)
    return spectrogram.istft(mask * X, mixture.shape[-1])


class QueryMaker:
    """Query vectors of the sources of a mixture for one modality (see the module docstring)."""

    def __init__(self, encoder: QueryEncoder, dataset_dir: Path, split: str, sample_rate: int):
        from marsctl.data.manifest import load_clips

        self.encoder, self.root, self.sample_rate = encoder, dataset_dir, sample_rate
        clips = load_clips(dataset_dir, kept_only=True, split=split)
        self.by_label: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for clip_id, label, path in zip(clips["clip_id"], clips["label"], clips["audio_path"]):
            self.by_label[label].append((clip_id, path))
        self._cache: dict[tuple, torch.Tensor] = {}

    @torch.no_grad()
    def text(self, label: str) -> torch.Tensor:
        key = ("text", label)
        if key not in self._cache:
            self._cache[key] = self.encoder.embed_text([label])[0].float().cpu()
        return self._cache[key]

    @torch.no_grad()
    def audio(self, label: str, clip_id: str) -> torch.Tensor | None:
        other = next((p for c, p in self.by_label.get(label, []) if c != clip_id), None)
        if other is None:
            return None
        key = ("audio", other)
        if key not in self._cache:
            wave = torch.from_numpy(load_audio(self.root / other, self.sample_rate))
            self._cache[key] = self.encoder.embed_audio([wave.to(self.encoder.device)], self.sample_rate)[0].float().cpu()
        return self._cache[key]

    @torch.no_grad()
    def image(self, frame_paths: Sequence[str]) -> torch.Tensor | None:
        if not frame_paths:
            return None
        key = ("image", frame_paths[0])
        if key not in self._cache:
            image = load_image(self.root / frame_paths[0])[None].to(self.encoder.device)
            self._cache[key] = self.encoder.embed_image(image)[0].float().cpu()
        return self._cache[key]

    def __call__(self, modality: str, label: str, clip_id: str, frame_paths: Sequence[str]) -> torch.Tensor | None:
        if modality == "text":
            return self.text(label)
        if modality == "audio":
            return self.audio(label, clip_id)
        if modality == "image":
            return self.image(frame_paths)
        parts = {"text": self.text(label)}
        for name, emb in (("audio", self.audio(label, clip_id)), ("image", self.image(frame_paths))):
            if emb is not None:
                parts[name] = emb
        return fuse(parts)


def _score(system: str, modality: str, mix: TestMixture, estimates: torch.Tensor, clap_text: torch.Tensor,
           clap_audio: torch.Tensor, signal) -> list[dict[str, Any]]:
    refs = torch.from_numpy(mix.sources).double()
    mixture = torch.from_numpy(mix.mixture).double()
    est = estimates.double()
    defined = ~(silent(refs) | silent(est))
    bss = bss_eval_sources(refs, est) if bool(defined.all()) else None
    sisdr, sisdri = si_sdr(refs, est), si_sdr_improvement(refs, est, mixture)
    dist = stft_distance(refs, est, signal)
    clap = (clap_text * clap_audio).sum(-1) * 100.0
    rows = []
    for n, label in enumerate(mix.labels):
        ok = bool(defined[n])
        rows.append({
            "system": system, "query_modality": modality, "mixture_id": mix.mixture_id, "source": n, "label": label,
            "sdr": float(bss.sdr[n]) if bss is not None else math.nan,
            "sir": float(bss.sir[n]) if bss is not None else math.nan,
            "sar": float(bss.sar[n]) if bss is not None else math.nan,
            "si_sdr": float(sisdr[n]) if ok else math.nan,
            "si_sdri": float(sisdri[n]) if ok else math.nan,
            "stft_distance": float(dist[n]),
            "clap_score": float(clap[n]),
        })
    return rows


@torch.no_grad()
def evaluate_separator(
    model: LoadedSeparator,
    encoder: QueryEncoder,
    dataset_dir: str | Path,
    query_modalities: Sequence[str] = ("text",),
    clap_encoder: QueryEncoder | None = None,
    split: str = "test",
    limit: int | None = None,
    references: bool = True,
    on_mixture: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Per-source rows for the model (each modality) and, with ``references``, the mixture and IRM oracle."""
    bad = [m for m in query_modalities if m not in QUERY_MODALITIES]
    if bad:
        raise MarsctlError(f"unknown query modality {bad[0]!r}; expected one of {', '.join(QUERY_MODALITIES)}")
    root = Path(dataset_dir)
    signal = model.model.config.signal
    mixtures = load_test_mixtures(root, split, limit)
    queries = QueryMaker(encoder, root, split, signal.sample_rate)
    clap = clap_encoder or encoder
    clap_texts: dict[str, torch.Tensor] = {}
    spectrogram = Spectrogram(signal).double()
    options = SeparateOptions()
    rows: list[dict[str, Any]] = []

    def clap_scores_of(mix: TestMixture, estimates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for label in mix.labels:
            if label not in clap_texts:
                clap_texts[label] = clap.embed_text([label])[0].float().cpu()
        text = torch.stack([clap_texts[label] for label in mix.labels])
        audio = clap.embed_audio([e.float().to(clap.device) for e in estimates], signal.sample_rate).float().cpu()
        return text, audio

    for mix in mixtures:
        if mix.sources.shape[1] == 0:
            continue
        mixture = torch.from_numpy(mix.mixture)
        if references:
            for system, estimates in (
                ("mixture", mixture.unsqueeze(0).expand(len(mix.labels), -1)),
                ("oracle-irm", oracle_irm(mixture.double(), torch.from_numpy(mix.sources).double(), spectrogram).float()),
            ):
                rows += _score(system, "-", mix, estimates, *clap_scores_of(mix, estimates), signal)
        for modality in query_modalities:
            vectors = [queries(modality, label, clip_id, frames) for label, clip_id, frames in zip(mix.labels, mix.clip_ids, mix.frame_paths)]
            if any(v is None for v in vectors):
                raise MarsctlError(
                    f"{root}: mixture {mix.mixture_id} has no {modality} query for one of its sources "
                    f"({'no video frames' if modality == 'image' else 'no other clip of the same class in the split'})"
                )
            estimates = separate_waveform(model.model, mixture, torch.stack(vectors), options)
            rows += _score("model", modality, mix, estimates, *clap_scores_of(mix, estimates), signal)
        if on_mixture is not None:
            on_mixture(mix.mixture_id)
    return rows


def summarize(rows: Sequence[dict[str, Any]], by_label: bool = False) -> list[dict[str, Any]]:
    """Mean and standard error of every metric per (system, query modality[, label]); NaNs skipped
    (statistics from :func:`marsctl.metrics.report.summarize`)."""
    from marsctl.metrics.report import summarize as mean_and_se

    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        key = (row["system"], row["query_modality"]) + ((row["label"],) if by_label else ())
        groups[key].append(row)
    out = []
    for key, members in groups.items():
        entry: dict[str, Any] = {"system": key[0], "query_modality": key[1], "n": len(members)}
        if by_label:
            entry["label"] = key[2]
        for metric in METRICS:
            stats = mean_and_se(m[metric] for m in members)
            entry[f"{metric}_mean"], entry[f"{metric}_se"] = stats.mean, stats.standard_error
        out.append(entry)
    order = {"mixture": 0, "model": 1, "oracle-irm": 2}
    return sorted(out, key=lambda e: (order.get(e["system"], 9), e["query_modality"], e.get("label", "")))


def markdown_table(summary: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of mean +/- SE (dB; CLAP score x100)."""
    head = ["system", "query", *(["class"] if summary and "label" in summary[0] else []), "n", "SDR", "SIR", "SAR", "SI-SDR", "SI-SDRi", "STFT dist", "CLAP"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in summary:
        cells = [e["system"], e["query_modality"], *([e["label"]] if "label" in e else []), str(e["n"])]
        for metric in METRICS:
            mean, se = e[f"{metric}_mean"], e[f"{metric}_se"]
            digits = 4 if metric == "stft_distance" else 2
            cells.append("n/a" if mean is None else f"{mean:.{digits}f}" + ("" if se is None else f" ± {se:.{digits}f}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def system_name(row: dict[str, Any]) -> str:
    return row["system"] if row["query_modality"] == "-" else f"{row['system']} ({row['query_modality']} query)"


def write_evaluation(rows: Sequence[dict[str, Any]], out_dir: str | Path, meta: dict[str, Any]) -> dict[str, Path]:
    """Write the evaluation, atomically, into ``out_dir``:

    * the standard report of ``marsctl eval`` (:func:`marsctl.metrics.report.write_report`:
      ``report.json``, ``scores.csv``, ``summary.csv``, ``summary.md``), grouped by system
      (``model (text query)``, ``mixture``, ``oracle-irm``, ...) and by class;
    * ``model_summary.json`` / ``model_summary.md``: mean ± SE per system and query modality,
      overall and per class, including the CLAP score (which the folder report has no column for).
    """
    from marsctl.files import write_json_atomic, write_text_atomic
    from marsctl.metrics.report import EvalReport, SourceScores, write_report

    out_dir = Path(out_dir)
    clean = lambda x: None if isinstance(x, float) and not math.isfinite(x) else x  # noqa: E731
    report = EvalReport(
        rows=[
            SourceScores(
                mixture=r["mixture_id"], source=r["label"],
                **{m: clean(r[m]) for m in ("sdr", "sir", "sar", "si_sdr", "si_sdri", "stft_distance")},
                group={"system": system_name(r), "class": r["label"]},
                note=f"clap_score={r['clap_score']:.2f}",
            )
            for r in rows
        ],
        failures=[],
        settings=meta,
    )
    paths = write_report(report, out_dir, group_keys=("system", "class"))
    overall, per_class = summarize(rows), summarize(rows, by_label=True)
    paths["model_summary_json"] = out_dir / "model_summary.json"
    write_json_atomic(paths["model_summary_json"], {"meta": meta, "overall": overall, "per_class": per_class})
    paths["model_summary_md"] = out_dir / "model_summary.md"
    write_text_atomic(
        paths["model_summary_md"],
        f"# Evaluation of {meta.get('model', 'model')} on {meta.get('data', 'data')}\n\n"
        "Mean ± standard error over sources (dB; CLAP score = 100 × text–audio cosine).\n\n"
        + markdown_table(overall) + "\n## Per class\n\n" + markdown_table(per_class),
    )
    return paths


def evaluate_model_on_dataset(
    model_spec: str | Path | None,
    dataset: str | Path,
    out_dir: str | Path,
    query_modalities: Sequence[str] = ("text",),
    split: str = "test",
    limit: int | None = None,
    clap_encoder: str | None = None,
    device: str | None = None,
    on_mixture: Callable[[str], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """``marsctl eval --model M --data D``: load, evaluate, write the report; returns (rows, paths).

    ``model_spec`` None uses the embedded default; ``dataset`` may be a Hub dataset id.
    """
    from marsctl.models.encoders import load_encoder
    from marsctl.separation import load_model_and_encoder

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    data_dir = Path(dataset)
    if not data_dir.exists():
        from marsctl.hub import resolve_artifact

        data_dir = Path(resolve_artifact(str(dataset), "dataset"))
    model, encoder = load_model_and_encoder(model_spec, device=device)
    clap = load_encoder(clap_encoder, device=device) if clap_encoder else None
    rows = evaluate_separator(model, encoder, data_dir, query_modalities, clap_encoder=clap, split=split, limit=limit, on_mixture=on_mixture)
    meta = {
        "model": str(model.directory), "data": str(data_dir), "split": split, "query_modalities": list(query_modalities),
        "encoder": model.encoder, "clap_encoder": clap_encoder or model.encoder,
    }
    return rows, write_evaluation(rows, out_dir, meta)


def summary_rich_table(summary: Sequence[dict[str, Any]], title: str = "Evaluation"):
    """A rich table of mean ± SE per system and query modality (for the CLI)."""
    from rich.table import Table

    table = Table(title=title)
    for column in ("system", "query", "n", "SDR", "SIR", "SAR", "SI-SDRi", "CLAP"):
        table.add_column(column, justify="left" if column in ("system", "query") else "right")
    for e in summary:
        cells = []
        for metric in ("sdr", "sir", "sar", "si_sdri", "clap_score"):
            mean, se = e[f"{metric}_mean"], e[f"{metric}_se"]
            cells.append("n/a" if mean is None else f"{mean:.2f}" + ("" if se is None else f" ± {se:.2f}"))
        table.add_row(e["system"], e["query_modality"], str(e["n"]), *cells)
    return table
