"""Evaluating a separator on a dataset's fixed test mixtures (``marsctl eval --model M --data D``).

As OmniSep/CLIPSep do, every source of every fixed test mixture is separated with its
*own* query (:meth:`marsctl.queries.QueryBuilder.source`), and scored against that source as it sits in
the mix by the scoring path of every ``marsctl eval`` (:func:`marsctl.eval.scoring.score_systems`:
BSS-Eval SDR/SIR/SAR with the sources of a mixture scored jointly, SI-SDR, SI-SDRi, STFT
distance; silent or failed estimates at the floor), plus text-audio scores: 100 * cos(text
embedding of the source's label, audio embedding of the estimate)
(:class:`marsctl.models.judge.TextAudioScorer`):

- ``reward_encoder_score``: with the encoder RL optimises: the reward encoder the model's RL run
  recorded (``config.json`` ``training.reward_encoder``) when it loads here, else the model's own query
  encoder (RL's default reward encoder): RL raises it by construction, so it is *not* an independent measure;
- ``judge_score`` (only with a judge, ``marsctl eval --judge SPEC``): with an independent
  encoder. A judge with the same weights as the model's encoder (or as the reward encoder its
  RL run recorded) is refused (:func:`check_judge`).

Two reference systems are scored on the same sources: ``mixture`` (the unprocessed mix
as the estimate) and ``oracle-irm`` (the ideal ratio mask |S_n| / sum_k |S_k| applied to
the mixture STFT, the ceiling of a mask-based separator with mixture phase).

Rows (one per system x modality x source) are summarised as mean +/- standard error per
system and modality, and per class (:func:`summarize`), never across systems.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Sequence

import numpy as np
import torch

from marsctl.audio import Spectrogram, load_audio
from marsctl.errors import MarsctlError
from marsctl.queries import SOURCE_MODALITIES as QUERY_MODALITIES
from marsctl.queries import QueryBuilder
from marsctl.eval.html import DEFAULT_HTML_MAX, Clip, ListeningMixture, SourceClips, choose_mixtures, mixture_scores, write_html_report
from marsctl.eval.report import EvalReport, SourceScores, write_report
from marsctl.eval.scoring import SEPARATION_METRICS, score_systems
from marsctl.models.encoder_base import QueryEncoder
from marsctl.models.judge import JUDGE_SCORE, REWARD_ENCODER_SCORE, TextAudioScorer, encoder_fingerprint
from marsctl.models.separator import LoadedSeparator
from marsctl.separate import SeparateOptions, separate_waveform
from marsctl.separate.queries import Query, embed_query

#: query modalities of ``eval --model``: the training ones, and ``span`` (a segment of the mixture itself)
EVAL_MODALITIES = (*QUERY_MODALITIES, "span")
#: length of the span query ``eval --query-modality span`` takes from each test mixture
SPAN_SECONDS = 1.0
#: hop between the candidate spans
SPAN_HOP_SECONDS = 0.05

#: the text-audio score columns, judge first
SCORE_COLUMNS = (JUDGE_SCORE, REWARD_ENCODER_SCORE)
METRICS = (*SEPARATION_METRICS, *SCORE_COLUMNS)
#: what the report says when no judge was given
NO_JUDGE_NOTE = ("no independent judge was given (--judge): reward_encoder_score is the model's own query/reward "
                 "encoder's score, which RL optimises, so it is not an independent measure")


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


def target_span(sources: np.ndarray, index: int, sample_rate: int, seconds: float = SPAN_SECONDS,
                hop: float = SPAN_HOP_SECONDS) -> tuple[float, float]:
    """The span ``(start, end)`` in seconds, ``seconds`` long, where source ``index`` of ``sources``
    ``[S, T]`` (as in the mix) is most active: of the windows holding at least 90 % of the target's
    largest window energy, the one where it is loudest against the other sources. The whole mixture
    when it is shorter."""
    length = sources.shape[1]
    width, step = max(1, round(seconds * sample_rate)), max(1, round(hop * sample_rate))
    if length <= width:
        return 0.0, length / sample_rate
    target = np.cumsum(np.concatenate([[0.0], sources[index].astype(np.float64) ** 2]))
    rest = np.cumsum(np.concatenate([[0.0], (np.delete(sources, index, axis=0).astype(np.float64) ** 2).sum(0)]))
    starts = np.arange(0, length - width + 1, step)
    own, other = target[starts + width] - target[starts], rest[starts + width] - rest[starts]
    active = own >= 0.9 * own.max()
    ratio = np.where(active, own / (other + 1e-12 * width), -np.inf)
    start = int(starts[int(np.argmax(ratio))])
    return start / sample_rate, (start + width) / sample_rate


def span_queries(encoder: QueryEncoder, mix: "TestMixture", sample_rate: int) -> tuple[list[torch.Tensor], list[tuple[float, float]]]:
    """Each source's span query: the mixture's audio where that source is most active (:func:`target_span`),
    embedded by the encoder's audio tower as ``marsctl separate --span`` does."""
    mixture = torch.from_numpy(mix.mixture)
    spans = [target_span(mix.sources, n, sample_rate) for n in range(len(mix.labels))]
    return [embed_query(encoder, Query(spans=(span,)), sample_rate, mixture=mixture) for span in spans], spans


#: the former name of :class:`~marsctl.models.judge.TextAudioScorer`
ClapScorer = TextAudioScorer


def score_mixture(mix: TestMixture, systems: Sequence[tuple[str, str, torch.Tensor]],
                  scorers: Mapping[str, Callable] | Callable, signal) -> list[dict[str, Any]]:
    """Rows of every ``(system, query_modality, estimates [S, T])`` of one test mixture, scored in one pass.

    ``scorers``: score column -> ``scorer(labels, estimates) -> [S]`` (:class:`TextAudioScorer`);
    one scorer alone is the ``reward_encoder_score`` (the model's own encoder)."""
    if callable(scorers) and not isinstance(scorers, Mapping):
        scorers = {REWARD_ENCODER_SCORE: scorers}
    unknown = [name for name in scorers if name not in SCORE_COLUMNS]
    if unknown:
        raise ValueError(f"unknown score column {unknown[0]!r}; expected one of {', '.join(SCORE_COLUMNS)}")
    scores = score_systems(torch.from_numpy(mix.sources), [est for _, _, est in systems], torch.from_numpy(mix.mixture), signal)
    rows = []
    for (system, modality, estimates), result in zip(systems, scores):
        text_audio = {name: scorer(mix.labels, estimates) for name, scorer in scorers.items()}
        for n, label in enumerate(mix.labels):
            row = {"system": system, "query_modality": modality, "mixture_id": mix.mixture_id, "source": n, "label": label}
            row.update({m: float(result.metrics[m][n]) for m in SEPARATION_METRICS})
            row.update({name: float(values[n]) for name, values in text_audio.items()})
            row["note"] = "; ".join(result.notes((n,)))
            rows.append(row)
    return rows


@torch.no_grad()
def evaluate_separator(
    model: LoadedSeparator,
    encoder: QueryEncoder,
    dataset_dir: str | Path,
    query_modalities: Sequence[str] = ("text",),
    judge_encoder: QueryEncoder | None = None,
    split: str = "test",
    limit: int | None = None,
    references: bool = True,
    on_mixture: Callable[[str], None] | None = None,
    skip_missing_queries: bool = False,
    reward_encoder: QueryEncoder | None = None,
    only: Collection[str] | None = None,
    on_systems: Callable[[TestMixture, list[tuple[str, str, torch.Tensor]]], None] | None = None,
    options: SeparateOptions | None = None,
    score: bool = True,
) -> list[dict[str, Any]]:
    """Per-source rows for the model (each modality) and, with ``references``, the mixture and IRM oracle.

    A row: ``system``, ``query_modality`` (``-`` for the references), ``mixture_id``,
    ``source`` (index), ``label``, the metrics (NaN = undefined) and ``note``. The metrics include
    ``reward_encoder_score`` (with ``reward_encoder``, or ``encoder``, the model's own, when None) and, with ``judge_encoder``,
    ``judge_score`` (independence is :func:`check_judge`'s business).
    A mixture with a source that has no query of a modality (no other clip of its class in the
    split for audio, no frames for image) is an error, or, with ``skip_missing_queries``, left
    out of that modality's rows (the summaries' n shows how many sources were scored).
    ``only``: the mixture ids to separate (default: all); ``on_systems(mixture, systems)`` receives each
    mixture's estimates ``(system, modality, [S, T])``; ``score=False`` skips the scoring (no rows).
    """
    bad = [m for m in query_modalities if m not in EVAL_MODALITIES]
    if bad:
        raise MarsctlError(f"unknown query modality {bad[0]!r}; expected one of {', '.join(EVAL_MODALITIES)}")
    root = Path(dataset_dir)
    signal = model.model.config.signal
    mixtures = load_test_mixtures(root, split, limit)
    queries = QueryBuilder(encoder, root, signal.sample_rate, split=split)
    scorers = {REWARD_ENCODER_SCORE: TextAudioScorer(reward_encoder or encoder, signal.sample_rate)}
    if judge_encoder is not None:
        scorers = {JUDGE_SCORE: TextAudioScorer(judge_encoder, signal.sample_rate), **scorers}
    spectrogram = Spectrogram(signal).double()
    options = options or SeparateOptions()  # separate's defaults (level normalisation on)
    rows: list[dict[str, Any]] = []
    for mix in mixtures:
        if mix.sources.shape[1] == 0 or (only is not None and mix.mixture_id not in only):
            continue
        mixture = torch.from_numpy(mix.mixture)
        systems: list[tuple[str, str, torch.Tensor]] = []
        if references:
            systems.append(("mixture", "-", mixture.unsqueeze(0).expand(len(mix.labels), -1)))
            systems.append(("oracle-irm", "-", oracle_irm(mixture.double(), torch.from_numpy(mix.sources).double(), spectrogram).float()))
        for modality in query_modalities:
            if modality == "span":
                vectors = span_queries(encoder, mix, signal.sample_rate)[0]
            else:
                vectors = [queries.source(modality, label, clip_id, frames) for label, clip_id, frames in zip(mix.labels, mix.clip_ids, mix.frame_paths)]
            if any(v is None for v in vectors):
                if skip_missing_queries:
                    continue
                raise MarsctlError(
                    f"{root}: mixture {mix.mixture_id} has no {modality} query for one of its sources "
                    f"({'no video frames' if modality == 'image' else 'no other clip of the same class in the split'})"
                )
            systems.append(("model", modality, separate_waveform(model.model, mixture, torch.stack(vectors), options)))
        if on_systems is not None:
            on_systems(mix, systems)
        if score:
            rows += score_mixture(mix, systems, scorers, signal)
        if on_mixture is not None:
            on_mixture(mix.mixture_id)
    return rows


def system_name(row: dict[str, Any]) -> str:
    return row["system"] if row["query_modality"] == "-" else f"{row['system']} ({row['query_modality']} query)"


def as_report(rows: Sequence[dict[str, Any]], meta: dict[str, Any] | None = None) -> EvalReport:
    """The rows of :func:`evaluate_separator` as a report grouped by system (never summarised across systems)."""
    clean = lambda x: None if isinstance(x, float) and not math.isfinite(x) else x  # noqa: E731
    return EvalReport(
        rows=[
            SourceScores(
                mixture=r["mixture_id"], source=r["label"], **{m: clean(r.get(m)) for m in METRICS},
                group={"system": system_name(r), "query_modality": r["query_modality"], "class": r["label"]},
                note=r.get("note") or "",
            )
            for r in rows
        ],
        failures=[],
        settings=dict(meta or {}),
        single_system=False,
    )


def summarize(rows: Sequence[dict[str, Any]], by_label: bool = False) -> list[dict[str, Any]]:
    """Mean, standard error and n of every metric per (system, query modality[, label]); undefined values skipped."""
    from marsctl.eval.tables import system_entries

    return system_entries(as_report(rows), by_class=by_label)


def write_evaluation(rows: Sequence[dict[str, Any]], out_dir: str | Path, meta: dict[str, Any]) -> dict[str, Path]:
    """Write the evaluation, atomically, into ``out_dir`` with :func:`marsctl.eval.report.write_report`:
    ``report.json``, ``scores.csv``, ``summary.csv``, ``summary.md`` grouped by system
    (``model (text query)``, ``mixture``, ``oracle-irm``, ...) and class, and
    ``model_summary.json`` / ``model_summary.md`` (per system and query modality, overall and per class)."""
    return write_report(as_report(rows, meta), out_dir, group_keys=("system", "class"))


def check_judge(judge_spec: str, judge: QueryEncoder, model: LoadedSeparator, encoder: QueryEncoder,
                device: str | torch.device = "cpu", reward_encoder: QueryEncoder | None = None) -> dict[str, Any]:
    """Refuse a judge with the same weights as the model's query encoder or as the reward
    encoder its RL run recorded (:func:`recorded_reward_encoder`, compared by weights when it
    :func:`loads_here`; ``reward_encoder``, when given, is that encoder already loaded by
    :func:`reward_encoder_of`). Returns what the report records: the judge's, the query encoder's and the
    reward encoder's fingerprints (None when the recorded reward encoder does not load here; the query
    encoder's when the model was not trained against another one) and what was compared."""
    judge_print, query_print = encoder_fingerprint(judge), encoder_fingerprint(encoder)
    reward_print: str | None = query_print
    compared = [f"query encoder {model.encoder}"]
    same = judge_print == query_print
    reward_spec = recorded_reward_encoder(model)
    if not same and reward_spec and reward_spec != model.encoder:
        if loads_here(reward_spec):
            if reward_encoder is None:
                from marsctl.models.encoders import load_encoder

                reward_encoder = load_encoder(reward_spec, device=device)
            reward_print = encoder_fingerprint(reward_encoder)
            same = reward_print == judge_print
            compared.append(f"reward encoder {reward_spec}")
        elif reward_spec == judge_spec:
            same = True
        else:
            reward_print = None
            compared.append(f"not the reward encoder {reward_spec} (not a local directory here)")
    if same:
        raise MarsctlError(
            f"--judge {judge_spec}: same weights as the model's query/reward encoder (fingerprint {judge_print[:12]}), "
            "so not an independent judge; give another encoder, or leave out --judge"
        )
    return {"judge_fingerprint": judge_print, "query_encoder_fingerprint": query_print, "reward_encoder_fingerprint": reward_print,
            "judge_compared_with": compared}


def recorded_reward_encoder(model: LoadedSeparator) -> str:
    """The reward encoder spec the model's RL run recorded (``config.json`` ``training.reward_encoder``); '' if none.
    A path is recorded relative to the model folder (or as ``~/...``, :mod:`marsctl.recorded_paths`): it is read so."""
    spec = str((model.config.get("training") or {}).get("reward_encoder") or "")
    if spec.startswith("~") or (spec and not Path(spec).is_absolute() and (Path(model.directory) / spec).exists()):
        local = Path(spec).expanduser() if spec.startswith("~") else Path(model.directory) / spec
        return os.path.normpath(local) if local.exists() else spec  # run/../encoder reads as encoder
    return spec


def loads_here(encoder_spec: str) -> bool:
    """Whether an encoder spec recorded by a run loads without a download: a local folder, or ``default``
    (the shipped separator's encoder)."""
    return Path(encoder_spec).is_dir() or encoder_spec == "default"


def reward_encoder_of(model: LoadedSeparator, encoder: QueryEncoder, device: str | torch.device = "cpu") -> tuple[QueryEncoder, str, str]:
    """``(encoder, spec, role)``: the encoder whose score is the report's ``reward_encoder_score``, and what
    the report says it is. The reward encoder the model's RL run recorded (``training.reward_encoder``) when it is
    another encoder that loads here (a local folder, or ``default``); else the model's own query encoder (what a
    supervised model's RL run would optimise by default), saying so when the recorded one could not be used."""
    reward_spec = recorded_reward_encoder(model)
    if not reward_spec or reward_spec == model.encoder:
        return encoder, model.encoder, "the model's own query encoder"
    if loads_here(reward_spec):
        from marsctl.models.encoders import load_encoder

        return load_encoder(reward_spec, device=device), reward_spec, "the reward encoder its RL run optimised"
    return encoder, model.encoder, f"the model's query encoder: its RL run's reward encoder {reward_spec} is not a local folder here"


def evaluate_model_on_dataset(
    model_spec: str | Path | None,
    dataset: str | Path,
    out_dir: str | Path,
    query_modalities: Sequence[str] = ("text",),
    split: str = "test",
    limit: int | None = None,
    judge: str | None = None,
    device: str | None = None,
    on_mixture: Callable[[str], None] | None = None,
    html_max: int = DEFAULT_HTML_MAX,
) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """``marsctl eval --model M --data D [--judge SPEC]``: load, evaluate, write the report; returns (rows, paths).

    ``model_spec`` None uses the embedded default; ``dataset`` may be a Hub id; ``judge`` is any
    spec :func:`~marsctl.models.encoders.load_encoder` accepts (refused by :func:`check_judge`
    when it has the model's encoder's weights). Without it the report says that no independent
    judge was given. ``report.html`` holds at most ``html_max`` of the mixtures (:mod:`marsctl.eval.html`),
    separated again once chosen (the mode decode is deterministic) rather than all kept in memory.
    """
    from marsctl.models.encoders import load_encoder
    from marsctl.separate import load_model_and_encoder

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    data_dir = Path(dataset)
    if not data_dir.exists():
        from marsctl.hub import resolve_artifact

        data_dir = Path(resolve_artifact(str(dataset), "dataset"))
    model, encoder = load_model_and_encoder(model_spec, device=device)
    reward_encoder, reward_spec, reward_role = reward_encoder_of(model, encoder, device)
    meta: dict[str, Any] = {
        "model": str(model.directory), "data": str(data_dir), "split": split, "query_modalities": list(query_modalities),
        "encoder": model.encoder, "reward_encoder": reward_spec, "reward_encoder_role": reward_role,
        "reward_encoder_score": f"100 x cos(label text, estimate audio) by {reward_spec} ({reward_role})",
        "judge": judge,
    }
    if "span" in query_modalities:
        meta["span_query"] = (f"the mixture's {SPAN_SECONDS:g} s where the source is most active against the others "
                              "(marsctl.eval.model.target_span), embedded by the audio tower")
    judge_encoder = None
    if judge:
        judge_encoder = load_encoder(judge, device=device)
        meta.update(check_judge(judge, judge_encoder, model, encoder, device, reward_encoder=reward_encoder))
        meta["judge_score"] = f"100 x cos(label text, estimate audio) by the independent judge {judge}"
    else:
        meta["judge_note"] = NO_JUDGE_NOTE
    rows = evaluate_separator(model, encoder, data_dir, query_modalities, judge_encoder=judge_encoder, split=split, limit=limit,
                              on_mixture=on_mixture, reward_encoder=reward_encoder)
    paths = write_evaluation(rows, out_dir, meta)
    report = as_report(rows, meta)
    model_system = next((r.group["system"] for r in report.rows if r.group["query_modality"] != "-"), None)
    chosen = choose_mixtures(mixture_scores(report, model_system), html_max)
    captured: dict[str, tuple[TestMixture, list]] = {}
    if chosen:
        evaluate_separator(model, encoder, data_dir, query_modalities, split=split, limit=limit, only={m for m, _ in chosen},
                           on_systems=lambda mix, systems: captured.__setitem__(mix.mixture_id, (mix, systems)), score=False)
    listening = model_listening(report, [(m, reason, *captured[m]) for m, reason in chosen if m in captured], signal_rate(model))
    paths["html"] = write_html_report(report, out_dir, listening, title=f"Evaluation of {model.directory} on {data_dir} ({split})")
    return rows, paths


def signal_rate(model: LoadedSeparator) -> int:
    return model.model.config.signal.sample_rate


def model_listening(report: EvalReport, chosen: Sequence[tuple[str, str, TestMixture, list[tuple[str, str, torch.Tensor]]]],
                    sample_rate: int) -> list[ListeningMixture]:
    """The page's clips of each chosen ``(id, reason, mixture, systems)``: per source its reference, every
    estimate (the model per query modality, the IRM oracle) and the residual of the first model estimate."""
    rows: dict[tuple[str, str], list[SourceScores]] = {}
    for r in report.rows:
        rows.setdefault((r.mixture, r.source), []).append(r)
    out = []
    for mixture_id, reason, mix, systems in chosen:
        sources = []
        for n, label in enumerate(mix.labels):
            clips = [Clip("reference", mix.sources[n])]
            residual = None
            for system, modality, estimates in systems:
                if system == "mixture":
                    continue
                name = system_name({"system": system, "query_modality": modality})
                clips.append(Clip(f"estimate, {name}", estimates[n].numpy()))
                if residual is None and modality != "-":
                    residual = Clip(f"residual, {name}", mix.mixture - estimates[n].numpy())
            clips += [residual] if residual is not None else []
            sources.append(SourceClips(label, clips, rows.get((mixture_id, label), [])))
        out.append(ListeningMixture(mixture_id, sample_rate, mix.mixture, sources, reason))
    return out


def count_test_mixtures(dataset: str | Path, split: str = "test", limit: int | None = None) -> int | None:
    """How many mixtures :func:`evaluate_model_on_dataset` will separate (for a progress count); None if unknown."""
    from marsctl.data.manifest import load_mixtures

    try:
        n = len(load_mixtures(Path(dataset), split=split))
    except Exception:  # a Hub id not yet downloaded, or a broken manifest the evaluation itself reports
        return None
    return n if limit is None else min(n, limit)
