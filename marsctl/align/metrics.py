"""What ``marsctl align`` reports after each stage, on held-out clips.

Retrieval is class-level (a dataset's clips share their class label as text):

- ``audio_to_text_R@k``: share of clips whose class text is among the ``k`` texts most
  similar to the clip (over the texts of all held-out classes). Chance: k / classes.
- ``text_to_audio_R@k``: share of class texts whose ``k`` most similar clips include a
  clip of that class. Chance at k=1: about 1 / classes.
- ``audio_to_audio_R@k`` (leave-one-out), ``audio_to_image_R@k`` and
  ``image_to_audio_R@k`` (when the clips have frames), same definition.

Similarity gap (the reward's discriminability): every held-out clip is mixed with a
clip of another class (seeded; each source x0.5 as in the mixtures) and
``gap = cos(q, phi_a(target)) - cos(q, phi_a(mixture))``, averaged, for the query
``q`` = the class text (``gap_text``), another held-out clip of the class
(``gap_audio``) and the anchor z* fused from target audio + text (+ frame) (``gap_anchor``).

Zero-shot classification (does the encoder tell a separated source from the mixture?): each
target, its mixture and, when a separator's estimates are given (``marsctl align
--separator``), the separator's estimate of the target from that mixture (queried with the class
text) is classified as the held-out class whose text embedding is most similar:
``zero_shot_target_acc``, ``zero_shot_mixture_acc`` (the mixture counted right when it is
classified as the target's class) and ``zero_shot_estimate_acc``
(``zero_shot_estimate_minus_mixture``: the paired per-clip difference from the mixture's, and
its standard error); ``gap_text_estimate`` is
``cos(q, phi_a(estimate)) - cos(q, phi_a(mixture))`` for the class text ``q``, the reward
signal a text-query reward actually sees from this separator.

Leakage ordering (does the reward rank a cleaner estimate above a leakier one, what pathwise RL
climbs?): every target of the seeded mixtures is given its partner back at target-to-interference
ratios :data:`LEAKAGE_LADDER_DB` (clean, 20, 12, 6, 0 dB), and the reward of each rung is
computed: ``cos(q, phi_a(rung))`` for the class text (``leakage_concordance_text``) and for the
anchor z* of the target (``leakage_concordance_anchor``). The concordance is the share of the
ladder's rung pairs (10 per clip) that the reward orders as the leakage does (cleaner scores
higher), averaged over clips: 0.5 is chance, 1 a reward that always prefers the cleaner estimate.
``leakage_slope_text`` is the mean drop of the text reward from the clean rung to the 0 dB rung.

Reward ascent (:func:`marsctl.align.ascent.ascent_report`): from a partial separation of each
target (leakage 0.3, seeded mask noise), one step up the text / anchor reward's gradient in the
mask; ``ascent_si_sdr_text`` / ``ascent_si_sdr_anchor`` are the mean SI-SDR changes (dB, with
``_se``) and ``ascent_positive_*`` the shares of pairs where it rose: what pathwise RL on that
reward does to separation, locally.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from marsctl.align.ascent import ascent_report
from marsctl.align.data import HeldOut
from marsctl.models.encoders.common import ProjectedEncoder

RECALL_KS = (1, 5)
#: target-to-interference ratios (dB) of the leakage ladder, cleanest first (inf = the clean target)
LEAKAGE_LADDER_DB = (math.inf, 20.0, 12.0, 6.0, 0.0)


def _recall_at(similarity: torch.Tensor, relevant: torch.Tensor, k: int) -> float:
    k = min(k, similarity.shape[1])
    top = similarity.topk(k, dim=1).indices
    return float(relevant.gather(1, top).any(dim=1).float().mean())


def _embed_audio_batched(encoder: ProjectedEncoder, waves: list[torch.Tensor], sample_rate: int, batch: int) -> torch.Tensor:
    return torch.cat([encoder.embed_audio(waves[i : i + batch], sample_rate) for i in range(0, len(waves), batch)])


def mixture_partners(labels: list[str], seed: int) -> list[int]:
    """For each clip, a seeded clip of another class (-1 when there is none)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for label in labels:
        others = [j for j, other in enumerate(labels) if other != label]
        out.append(others[int(torch.randint(len(others), (1,), generator=gen))] if others else -1)
    return out


def same_class_partners(labels: list[str]) -> list[int]:
    """For each clip, the next held-out clip of its class (-1 when it is alone)."""
    out = []
    for i, label in enumerate(labels):
        members = [j for j, other in enumerate(labels) if other == label]
        out.append(members[(members.index(i) + 1) % len(members)] if len(members) > 1 else -1)
    return out


def heldout_mixtures(heldout: HeldOut, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The seeded two-class mixtures the gap and zero-shot metrics use: for every held-out clip,
    its target ``0.5 * clip`` and the mixture ``0.5 * clip + 0.5 * partner`` (cut to the shorter)."""
    targets, mixtures = [], []
    for i, j in enumerate(mixture_partners([clip.label for clip in heldout.clips], seed)):
        if j < 0:  # one class only: no mixture (the metrics are undefined then)
            continue
        length = min(heldout.waves[i].shape[-1], heldout.waves[j].shape[-1])
        target = 0.5 * heldout.waves[i][:length]
        targets.append(target)
        mixtures.append(target + 0.5 * heldout.waves[j][:length])
    return targets, mixtures


def leakage_ladder(target: torch.Tensor, interference: torch.Tensor, ratios_db=LEAKAGE_LADDER_DB) -> torch.Tensor:
    """``[rungs, T]``: ``target + g_k * interference`` with ``g_k`` such that the target-to-interference
    energy ratio is ``ratios_db[k]`` (``inf``: the target alone)."""
    target_rms = target.pow(2).mean().sqrt()
    interference_rms = interference.pow(2).mean().sqrt() + 1e-8
    rungs = [target if math.isinf(db) else target + interference * (target_rms / interference_rms) * 10 ** (-db / 20)
             for db in ratios_db]
    return torch.stack(rungs)


def ordering_concordance(scores: torch.Tensor) -> torch.Tensor:
    """Per row of ``[N, rungs]`` scores (cleanest rung first): the share of rung pairs i < j with
    ``scores[i] > scores[j]`` (ties count half)."""
    i, j = torch.triu_indices(scores.shape[1], scores.shape[1], offset=1)
    difference = scores[:, i] - scores[:, j]
    return ((difference > 0).double() + 0.5 * (difference == 0).double()).mean(-1)


@torch.no_grad()
def separate_heldout_mixtures(separator: str | Path, heldout: HeldOut, sample_rate: int, seed: int,
                              device: str | torch.device = "cpu", advance: Callable[[], None] | None = None) -> list[torch.Tensor]:
    """A separator's estimate of every target of :func:`heldout_mixtures`, queried with the
    target's class text through the separator's own query encoder; at ``sample_rate``."""
    from torchaudio.functional import resample

    from marsctl.separate.api import load_model_and_encoder
    from marsctl.separate.apply import SeparateOptions, separate_waveform

    loaded, query_encoder = load_model_and_encoder(str(separator), device=device)
    model_rate = loaded.model.config.signal.sample_rate
    _, mixtures = heldout_mixtures(heldout, seed)
    labels = [clip.label for clip in heldout.clips]
    queries = {label: query_encoder.embed_text([label])[0] for label in sorted(set(labels))}
    options = SeparateOptions()
    estimates = []
    for label, mixture in zip(labels, mixtures):
        wave = mixture if model_rate == sample_rate else resample(mixture, sample_rate, model_rate)
        estimate = separate_waveform(loaded.model, wave.to(device), queries[label][None], options)[0]
        if model_rate != sample_rate:
            estimate = resample(estimate, model_rate, sample_rate)
        estimates.append(estimate[: mixture.shape[-1]].cpu())
        if advance is not None:
            advance()
    return estimates


@torch.no_grad()
def evaluate_alignment(
    encoder: ProjectedEncoder, heldout: HeldOut, sample_rate: int, batch_size: int = 32, seed: int = 0,
    estimates: Sequence[torch.Tensor] | None = None,
) -> dict[str, Any]:
    """The module's metrics for ``encoder`` on ``heldout``; ``estimates``: a separator's estimates
    of :func:`heldout_mixtures`' targets (:func:`separate_heldout_mixtures`), for the estimate rows
    (default: ``heldout.estimates``)."""
    if estimates is None:
        estimates = heldout.estimates
    was_training = encoder.training
    encoder.eval()
    try:
        return _evaluate(encoder, heldout, sample_rate, batch_size, seed, estimates)
    finally:
        encoder.train(was_training)


def _evaluate(encoder: ProjectedEncoder, heldout: HeldOut, sample_rate: int, batch_size: int, seed: int,
              estimates: Sequence[torch.Tensor] | None) -> dict[str, Any]:
    labels = [clip.label for clip in heldout.clips]
    classes = sorted(set(labels))
    metrics: dict[str, Any] = {"split": heldout.split, "clips": len(labels), "classes": len(classes)}
    if len(classes) < 2:
        metrics["note"] = "fewer than two held-out classes: retrieval and gap are undefined"
        return metrics
    label_index = torch.tensor([classes.index(label) for label in labels])
    audio = _embed_audio_batched(encoder, heldout.waves, sample_rate, batch_size).cpu()
    text = encoder.embed_text(classes).cpu()
    audio_text = audio @ text.T
    same_class = label_index[:, None] == label_index[None, :]
    is_label = label_index[:, None] == torch.arange(len(classes))[None, :]
    for k in RECALL_KS:
        metrics[f"audio_to_text_R@{k}"] = _recall_at(audio_text, is_label, k)
        metrics[f"text_to_audio_R@{k}"] = _recall_at(audio_text.T, is_label.T, k)
        leave_one_out = (audio @ audio.T).fill_diagonal_(-float("inf"))
        metrics[f"audio_to_audio_R@{k}"] = _recall_at(leave_one_out, same_class.clone().fill_diagonal_(False), k)
    metrics["chance_R@1"] = 1 / len(classes)

    with_frames = [i for i, frame in enumerate(heldout.frames) if frame is not None]
    image = None
    if len(with_frames) == len(labels):
        frames = torch.stack([heldout.frames[i] for i in with_frames])  # type: ignore[misc]
        image = torch.cat([encoder.embed_image(frames[i : i + batch_size]) for i in range(0, len(frames), batch_size)]).cpu()
        for k in RECALL_KS:
            metrics[f"audio_to_image_R@{k}"] = _recall_at(audio @ image.T, same_class, k)
            metrics[f"image_to_audio_R@{k}"] = _recall_at(image @ audio.T, same_class, k)

    # target-vs-mixture similarity gap
    targets, mixtures = heldout_mixtures(heldout, seed)
    target_emb = _embed_audio_batched(encoder, targets, sample_rate, batch_size).cpu()
    mixture_emb = _embed_audio_batched(encoder, mixtures, sample_rate, batch_size).cpu()

    def gap(query: torch.Tensor, rows: torch.Tensor | None = None) -> float:
        t, m = target_emb, mixture_emb
        if rows is not None:
            t, m = t[rows], m[rows]
        return float(((query * t).sum(-1) - (query * m).sum(-1)).mean())

    metrics["gap_text"] = gap(text[label_index])
    peers = same_class_partners(labels)
    rows = torch.tensor([i for i, p in enumerate(peers) if p >= 0], dtype=torch.long)
    if len(rows):
        metrics["gap_audio"] = gap(audio[torch.tensor([peers[i] for i in rows.tolist()])], rows)
    if encoder.anchor_fusion is not None:
        device = encoder.device
        anchor = encoder.anchor_fusion(
            audio=target_emb.to(device), text=text[label_index].to(device), image=None if image is None else image.to(device)
        ).cpu()
        metrics["gap_anchor"] = gap(anchor)
        metrics["anchor_target_cos"] = float((anchor * target_emb).sum(-1).mean())
    metrics["target_mixture_cos"] = float(F.cosine_similarity(target_emb, mixture_emb).mean())

    # leakage ordering: does the reward prefer the cleaner of two estimates of one target?
    rungs = [rung for target, mixture in zip(targets, mixtures) for rung in leakage_ladder(target, mixture - target)]
    ladder_emb = _embed_audio_batched(encoder, rungs, sample_rate, batch_size).cpu().view(len(targets), len(LEAKAGE_LADDER_DB), -1)
    text_scores = (ladder_emb * text[label_index][:, None]).sum(-1)
    metrics["leakage_concordance_text"] = float(ordering_concordance(text_scores).mean())
    metrics["leakage_slope_text"] = float((text_scores[:, 0] - text_scores[:, -1]).mean())
    if encoder.anchor_fusion is not None:
        metrics["leakage_concordance_anchor"] = float(ordering_concordance((ladder_emb * anchor[:, None]).sum(-1)).mean())

    # reward ascent: does one step up the text / anchor reward raise SI-SDR? (marsctl.align.ascent)
    metrics.update(ascent_report(encoder, targets, mixtures, text[label_index].to(encoder.device),
                                 None if encoder.anchor_fusion is None else anchor.to(encoder.device), sample_rate, seed))

    # zero-shot classification over the held-out classes' texts
    def zero_shot_correct(embeddings: torch.Tensor) -> torch.Tensor:
        return ((embeddings @ text.T).argmax(dim=1) == label_index).double()

    mixture_correct = zero_shot_correct(mixture_emb)
    metrics["zero_shot_target_acc"] = float(zero_shot_correct(target_emb).mean())
    metrics["zero_shot_mixture_acc"] = float(mixture_correct.mean())
    if estimates is not None:
        if len(estimates) != len(mixtures):
            raise ValueError(f"{len(estimates)} estimates for {len(mixtures)} held-out mixtures")
        estimate_emb = _embed_audio_batched(encoder, list(estimates), sample_rate, batch_size).cpu()
        estimate_correct = zero_shot_correct(estimate_emb)
        gain = estimate_correct - mixture_correct  # paired, per held-out clip
        metrics["zero_shot_estimate_acc"] = float(estimate_correct.mean())
        metrics["zero_shot_estimate_minus_mixture"] = float(gain.mean())
        metrics["zero_shot_estimate_minus_mixture_se"] = float(gain.std() / len(gain) ** 0.5) if len(gain) > 1 else math.nan
        query = text[label_index]
        metrics["gap_text_estimate"] = float(((query * estimate_emb).sum(-1) - (query * mixture_emb).sum(-1)).mean())
    return metrics
