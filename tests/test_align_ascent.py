"""The reward's leakage ordering and ascent metrics, and the reward-ascent ranking term of stage 1
(marsctl.align.ascent), on small real encoders and signals the tests make."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from marsctl.align.ascent import AscentSettings, ascent_ranking_loss, ascent_step, pairwise_ranking_loss, partial_separation_masks, reward_scores
from marsctl.align.metrics import LEAKAGE_LADDER_DB, leakage_ladder, ordering_concordance
from marsctl.audio import Spectrogram
from marsctl.metrics.separation import si_sdr
from marsctl.models.encoders import BuiltinEncoder, load_encoder
from test_align import TINY, write_recipe

SR = 16_000


def tones(seconds: float = 1.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * SR)) / SR
    target = 0.3 * torch.sin(2 * math.pi * 440 * t) + 0.05 * torch.randn(len(t), generator=gen)
    interference = 0.3 * torch.sign(torch.sin(2 * math.pi * 97 * t))
    return target, interference


def trainable_encoder_and_batch() -> tuple[BuiltinEncoder, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A seeded tiny encoder with its audio tower trainable (text frozen), 4 targets, their interference and text."""
    torch.manual_seed(0)
    encoder = BuiltinEncoder(TINY)
    encoder.unfreeze_trainable()
    encoder.text_head.requires_grad_(False)
    pairs = [tones(seed=s) for s in range(4)]
    targets = torch.stack([0.5 * t for t, _ in pairs])
    interference = torch.stack([0.5 * i.roll(37 * k) for k, (_, i) in enumerate(pairs)])
    return encoder, targets, interference, encoder.embed_text(["violin"]).expand(4, -1).detach()


def test_leakage_ladder_has_the_asked_target_to_interference_ratios():
    target, interference = tones()
    ladder = leakage_ladder(target, interference)
    assert ladder.shape == (len(LEAKAGE_LADDER_DB), len(target))
    assert torch.equal(ladder[0], target)
    for rung, db in zip(ladder[1:], LEAKAGE_LADDER_DB[1:]):
        added = rung - target
        ratio = 10 * torch.log10(target.pow(2).mean() / added.pow(2).mean())
        assert float(ratio) == pytest.approx(db, abs=1e-3)


def test_ordering_concordance_counts_pairs_in_the_leakage_order():
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0], [2.0, 3.0, 4.0, 5.0], [1.0, 1.0, 1.0, 1.0], [4.0, 5.0, 3.0, 2.0]])
    assert ordering_concordance(scores).tolist() == pytest.approx([1.0, 0.0, 0.5, 5 / 6])


def test_pairwise_ranking_loss_follows_the_quality_order():
    quality = torch.tensor([[60.0, 10.0, 3.0, 0.0]])
    ordered = torch.tensor([[0.9, 0.7, 0.5, 0.3]])
    reversed_ = ordered.flip(-1)
    low, high = pairwise_ranking_loss(ordered, quality, 10.0, 0.5), pairwise_ranking_loss(reversed_, quality, 10.0, 0.5)
    assert float(low) < math.log(2) < float(high)
    # by definition: the mean over the 6 ranked pairs of softplus(-scale (s_i - s_j))
    expected = sum(math.log1p(math.exp(-10 * (ordered[0, i] - ordered[0, j]).item())) for i in range(4) for j in range(i + 1, 4)) / 6
    assert float(low) == pytest.approx(expected, rel=1e-5)
    # pairs within the margin are not ranked; none left -> 0 with a graph
    flat = pairwise_ranking_loss(ordered.requires_grad_(True), torch.zeros(1, 4), 10.0, 0.5)
    assert float(flat.detach()) == 0.0 and flat.requires_grad


def test_partial_separation_masks_leak_as_asked():
    target, interference = tones()
    spectrogram = Spectrogram()
    masks, mixture_stft = partial_separation_masks(target[None].repeat(3, 1), interference[None].repeat(3, 1), spectrogram,
                                                   torch.tensor([0.0, 0.5, 1.0]), 0.0, None)
    estimates = spectrogram.istft(masks * mixture_stft, len(target))
    quality = si_sdr(target[None].expand_as(estimates), estimates)
    assert quality[0] > quality[1] > quality[2]  # more leakage, lower SI-SDR
    assert torch.allclose(estimates[2], target + interference, atol=1e-4)  # leakage 1: the all-pass mask


def test_an_ascent_step_raises_the_reward_it_climbs():
    encoder = BuiltinEncoder(TINY).eval().requires_grad_(False)
    target, interference = tones(seed=1)
    spectrogram = Spectrogram()
    masks, mixture_stft = partial_separation_masks(target[None], interference[None], spectrogram, torch.tensor([0.3]), 0.05,
                                                   torch.Generator().manual_seed(0))
    text = encoder.embed_text(["violin"])
    before = reward_scores(encoder, spectrogram.istft(masks * mixture_stft, len(target)), text, None, SR)["text"]
    climbed = ascent_step(encoder, masks, mixture_stft, spectrogram, len(target), text, None, torch.tensor([0.01]), SR, reward="text")
    after = reward_scores(encoder, spectrogram.istft(climbed * mixture_stft, len(target)), text, None, SR)["text"]
    assert not climbed.requires_grad and climbed.min() >= 0 and climbed.max() <= 1
    assert float(after) > float(before)



def test_the_ranking_term_trains_the_reward_to_prefer_what_separates_better():
    """A few optimizer steps on the term alone (tiny encoder, fixed batch): the rewards come to order the
    clean target, partial separations, their ascent step and the mixture by SI-SDR."""
    encoder, targets, interference, text = trainable_encoder_and_batch()
    optimizer = torch.optim.Adam(encoder.trainable_parameters(), lr=3e-3)
    losses = []
    for step in range(12):
        loss = ascent_ranking_loss(encoder, targets, interference, text, None, torch.tensor(10.0), SR, AscentSettings(),
                                   torch.Generator().manual_seed(step % 2))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.05, losses


def test_a_stage_with_the_ascent_terms_logs_them_reports_ascent_and_selects_on_it(tmp_path):
    from marsctl.align.config import load_align_config
    from marsctl.align.trainer import Reporter, run_alignment, selection_score
    from marsctl.models.encoders import save_encoder
    from test_align import make_dataset

    dataset = make_dataset(tmp_path / "ds", per_split=(4, 2, 2), with_frames=False)
    encoder = save_encoder(BuiltinEncoder(TINY), tmp_path / "enc")
    recipe = write_recipe(tmp_path / "r.yaml", steps=6, freeze_text=True)
    data = yaml.safe_load(recipe.read_text())
    data["stage1"] = dict(data["stage1"], ascent_ranking_weight=1.0, ascent_agreement_weight=0.5, eval_every=3)
    recipe.write_text(yaml.safe_dump(data))
    config = load_align_config(recipe, {"encoder": str(encoder), "stages": [1]})
    summary = run_alignment(config, dataset, tmp_path / "run", reporter=Reporter(log=lambda line: None))
    log = [yaml.safe_load(line) for line in (tmp_path / "run" / "stage1" / "log.jsonl").read_text().splitlines()]
    assert all(record["ascent_ranking"] >= 0 and 0 <= record["ascent_agreement"] <= 2 for record in log)
    assert all(math.isclose(r["total"], r["info_nce_audio_text"] + 0.5 * r["anchor"] + r["ascent_ranking"] + 0.5 * r["ascent_agreement"],
                            rel_tol=1e-4) for r in log)
    report = summary["stages"]["1"]["report"]
    for key in ("ascent_si_sdr_text", "ascent_si_sdr_anchor", "ascent_positive_text", "leakage_concordance_text", "leakage_concordance_anchor"):
        assert key in report and math.isfinite(report[key]), key
    select = summary["stages"]["1"]["select"]
    assert summary["stages"]["1"]["select_score"] == pytest.approx(selection_score(1, select, (1,), ascent=True))
    assert selection_score(1, select, (1,), ascent=True) != selection_score(1, select, (1,))


def test_the_default_encoder_spec_is_the_shipped_aligned_encoder():
    from marsctl.pretrained import DEFAULT_SEPARATOR_DIR

    encoder = load_encoder("default")
    shipped = load_encoder(DEFAULT_SEPARATOR_DIR / "encoder")
    assert encoder.anchor_fusion is not None
    assert torch.equal(encoder.embed_text(["dog barking"]), shipped.embed_text(["dog barking"]))


def test_the_agreement_term_turns_the_reward_gradient_toward_the_si_sdr_gradient():
    """A few optimizer steps on the agreement term alone (tiny encoder, fixed batch): it falls, and the
    text reward's gradient in the mask agrees more with SI-SDR's (measured without the term's own code)."""
    from marsctl.align.ascent import ascent_agreement_loss

    encoder, targets, interference, text = trainable_encoder_and_batch()
    spectrogram = Spectrogram()

    def agreement() -> float:
        masks, mixture_stft = partial_separation_masks(targets, interference, spectrogram, torch.full((4,), 0.3), 0.1,
                                                       torch.Generator().manual_seed(5))
        masks.requires_grad_(True)
        estimates = spectrogram.istft(masks * mixture_stft, targets.shape[-1])
        (g_s,) = torch.autograd.grad(si_sdr(targets, estimates).sum(), masks, retain_graph=True)
        (g_r,) = torch.autograd.grad(reward_scores(encoder, estimates, text, None, SR, differentiable=True)["text"].sum(), masks)
        return float(torch.nn.functional.cosine_similarity(g_r.flatten(1), g_s.flatten(1).float(), dim=1).mean())

    before = agreement()
    optimizer = torch.optim.Adam(encoder.trainable_parameters(), lr=3e-3)
    losses = []
    for step in range(10):
        loss = ascent_agreement_loss(encoder, targets, interference, text, None, SR, AscentSettings(), torch.Generator().manual_seed(step % 2))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0], losses
    after = agreement()
    assert after > before + 0.05
