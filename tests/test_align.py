"""Alignment (`marsctl align`) on a small dataset the test synthesizes, following the shared
dataset contract: distinct synthetic timbres per class (two of them acoustically close),
a colored-pattern "video frame" per clip, clips.parquet written by marsctl.data.manifest.write_clips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import typer
import yaml
from typer.testing import CliRunner

from marsctl.align.config import load_align_config
from marsctl.align.trainer import Reporter, run_alignment
from marsctl.cli import align as align_cli
from marsctl.models.encoders import (
    AudioCnnConfig,
    BuiltinEncoder,
    BuiltinEncoderConfig,
    ImageTowerConfig,
    load_encoder,
    save_encoder,
)

SR = 16_000
LABELS = ("violin", "flute", "dog barking", "car engine idling", "bird chirping", "rain on a roof")
COLORS = {
    "violin": (200, 80, 40), "flute": (220, 200, 60), "dog barking": (120, 70, 30),
    "car engine idling": (90, 90, 100), "bird chirping": (60, 180, 70), "rain on a roof": (50, 90, 200),
}


def synth_clip(label: str, rng: np.random.Generator, seconds: float = 2.0) -> np.ndarray:
    """A clip whose timbre identifies its class; pitch, timing and noise vary per clip."""
    t = np.arange(int(seconds * SR)) / SR
    if label == "violin":  # bright harmonic tone with vibrato
        f0 = rng.uniform(300, 600) * (1 + 0.01 * np.sin(2 * np.pi * 5.5 * t))
        phase = 2 * np.pi * np.cumsum(f0) / SR
        wave = sum(np.sin(k * phase) / k for k in range(1, 12))
    elif label == "flute":  # nearly pure tone plus breath noise (close to violin in pitch)
        f0 = rng.uniform(300, 600)
        wave = np.sin(2 * np.pi * f0 * t) + 0.1 * np.sin(4 * np.pi * f0 * t) + 0.05 * rng.standard_normal(t.size)
    elif label == "dog barking":  # short band-limited noise bursts
        wave = np.zeros_like(t)
        for start in rng.uniform(0, seconds - 0.25, size=4):
            burst = (t >= start) & (t < start + 0.15)
            f = rng.uniform(500, 900)
            wave[burst] = np.sin(2 * np.pi * f * t[burst]) * rng.standard_normal(burst.sum()) * 2
    elif label == "car engine idling":  # low rumble with amplitude modulation
        f0 = rng.uniform(30, 60)
        wave = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 6)) * (1 + 0.5 * np.sin(2 * np.pi * 8 * t))
    elif label == "bird chirping":  # fast upward sweeps, 2-5 kHz
        wave = np.zeros_like(t)
        for start in np.arange(rng.uniform(0, 0.2), seconds - 0.1, rng.uniform(0.25, 0.4)):
            chirp = (t >= start) & (t < start + 0.08)
            tt = t[chirp] - start
            wave[chirp] = np.sin(2 * np.pi * (2000 * tt + 0.5 * 30000 * tt**2))
    else:  # rain: steady high-passed noise
        noise = rng.standard_normal(t.size)
        wave = noise - np.convolve(noise, np.ones(8) / 8, mode="same")
    wave = wave + 0.01 * rng.standard_normal(t.size)
    return (0.5 * wave / (np.abs(wave).max() + 1e-9)).astype(np.float32)


def synth_frame(label: str, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    base = np.array(COLORS[label], dtype=np.float32)
    image = np.tile(base, (size, size, 1)) + rng.normal(0, 20, (size, size, 3))
    stripe = LABELS.index(label) + 2
    image[:, ::stripe] *= 0.5
    return np.clip(image, 0, 255).astype(np.uint8)


def make_dataset(root: Path, per_split=(8, 3, 3), with_frames: bool = True, seed: int = 0) -> Path:
    """A dataset directory following the shared contract (clips, frames, manifests/clips.parquet)."""
    from PIL import Image

    from marsctl.data.manifest import write_clips

    rng = np.random.default_rng(seed)
    rows = []
    for label in LABELS:
        slug = label.replace(" ", "_")
        n = 0
        for split, count in zip(("train", "val", "test"), per_split):
            for _ in range(count):
                clip_id = f"{slug}_{n:03d}"
                n += 1
                audio_rel = f"clips/{slug}/{clip_id}.flac"
                (root / audio_rel).parent.mkdir(parents=True, exist_ok=True)
                sf.write(root / audio_rel, synth_clip(label, rng), SR, subtype="PCM_24")
                frames = []
                if with_frames:
                    for k in range(2):
                        rel = f"frames/{slug}/{clip_id}/{k:03d}.jpg"
                        (root / rel).parent.mkdir(parents=True, exist_ok=True)
                        Image.fromarray(synth_frame(label, rng)).save(root / rel)
                        frames.append(rel)
                rows.append({
                    "clip_id": clip_id, "label": label, "split": split, "audio_path": audio_rel,
                    "frame_paths": frames, "duration_s": 2.0, "sample_rate": SR, "source": "synthetic",
                    "keep": True, "drop_reason": "", "silence_ratio": 0.0, "clip_ratio": 0.0,
                    "loudness_lufs": -15.0, "rms_db": -12.0, "peak_db": -6.0, "semantic_margin": None,
                })
    # one dropped row: alignment must ignore it
    rows.append(dict(rows[0], clip_id="dropped_000", audio_path="clips/missing.flac", keep=False, drop_reason="silence"))
    write_clips(root, rows)
    (root / "dataset.json").write_text(json.dumps({"recipe": "test-synthetic", "schema_version": 1, "clips": len(rows)}))
    return root


# --------------------------------------------------------------------------- the runs

TINY = BuiltinEncoderConfig(audio=AudioCnnConfig(n_mels=32, channels=(8, 16, 32)),
                            image=ImageTowerConfig(image_size=32, channels=(8, 16, 32)))


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> Path:
    """The built-in encoder (real packaged MiniLM text tower) with small audio/image CNNs."""
    return save_encoder(BuiltinEncoder(TINY), tmp_path_factory.mktemp("enc") / "tiny")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("ds"))


def write_recipe(path: Path, steps: int = 40, **top) -> Path:
    stage = {"steps": steps, "batch_size": 16, "crop_seconds": 1.0, "learning_rate": 3e-3,
             "eval_every": steps // 2, "checkpoint_every": 10}
    recipe = {"stage1": stage, "stage2": stage, "stage3": stage, "eval": {"max_seconds": 2.0}, **top}
    path.write_text(yaml.safe_dump(recipe))
    return path


def invoke(*args: str):
    app = typer.Typer()
    align_cli.register(app)

    @app.callback()
    def _root() -> None:
        """marsctl (test)"""

    return CliRunner().invoke(app, list(args))


def test_three_stage_alignment_learns_and_reports(tiny_encoder, tmp_path):
    data = make_dataset(tmp_path / "ds")
    bad_clip = data / "clips" / "violin" / "violin_000.flac"  # a training clip
    bad_clip.write_bytes(b"this is not audio")
    for frame in (data / "frames" / "flute" / "flute_000").iterdir():  # a training clip's frames
        frame.write_bytes(b"not a jpeg")
    out = tmp_path / "run"
    result = invoke("align", "--encoder", str(tiny_encoder), "--data", str(data), "--stages", "1,2,3",
                    "--recipe", str(write_recipe(tmp_path / "r.yaml")), "--out", str(out), "--device", "cpu", "-q")
    # the unreadable clip is skipped, the run finishes, and the exit status says something was skipped
    assert result.exit_code == 1, result.output
    assert "could not be read" in result.output and "violin_000" in result.output
    assert "text_to_audio_R@1" in result.output and "gap_text" in result.output  # per-stage tables

    metrics = json.loads((out / "metrics.json").read_text())
    initial, stages = metrics["initial"], metrics["stages"]
    first = stages["1"]["report"]
    assert first["split"] == "test" and first["classes"] == len(LABELS)
    chance = first["chance_R@1"]
    # after stage 1, retrieval is far above chance and the target-vs-mixture gap has grown
    assert first["text_to_audio_R@1"] >= chance + 0.3
    assert first["audio_to_text_R@1"] >= chance + 0.3
    assert initial["audio_to_text_R@1"] < first["audio_to_text_R@1"]
    assert first["gap_text"] > initial["gap_text"] + 0.05
    assert first["gap_anchor"] > initial["gap_anchor"] + 0.05
    # stage 3 aligns images: audio->image retrieval beyond its (untrained) starting point
    third = stages["3"]["report"]
    assert third["audio_to_image_R@1"] >= initial["audio_to_image_R@1"] + 0.2
    assert third["gap_text"] > initial["gap_text"] + 0.05
    assert "violin_000" in stages["1"]["skipped_clips"]
    assert "not a readable image" in stages["3"]["skipped_clips"]["flute_000"]
    assert (out / "stage1" / "metrics.json").is_file() and (out / "stage2" / "best" / "model.safetensors").is_file()

    # every loss term is logged; stage 2 replays stage 1 on some steps
    log = [json.loads(line) for line in (out / "stage2" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 41))
    own = [r for r in log if r["objective"] == "audio-audio"]
    assert own and all({"info_nce_audio_audio", "triplet", "consistency", "anchor", "total"} <= set(r) for r in own)
    assert any(r["objective"] == "audio-text" and r["replay"] for r in log)

    final = load_encoder(out / "encoder")
    assert final.anchor_fusion is not None and final.anchor_fusion.modalities == ("audio", "text", "image")
    assert "Alignment" in (out / "encoder" / "README.md").read_text()

    # running the same command again finds every stage done
    again = invoke("align", "--encoder", str(tiny_encoder), "--data", str(data), "--stages", "1,2,3",
                   "--recipe", str(tmp_path / "r.yaml"), "--out", str(out), "--device", "cpu", "-q")
    assert "already finished" in again.output


def test_a_killed_stage_resumes_where_it_stopped(tiny_encoder, dataset, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", steps=20)
    config = load_align_config(recipe, {"encoder": str(tiny_encoder), "stages": [1]})
    quiet = Reporter(log=lambda line: None)
    run_alignment(config, dataset, tmp_path / "whole", reporter=quiet)

    def kill(stage: int, step: int, record: dict) -> None:
        if step == 13:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_alignment(config, dataset, tmp_path / "killed", reporter=Reporter(log=lambda line: None, on_step=kill))
    stage_dir = tmp_path / "killed" / "stage1"
    assert (stage_dir / "state.pt").is_file() and not (stage_dir / "metrics.json").exists()
    lines: list[str] = []
    run_alignment(config, dataset, tmp_path / "killed", reporter=Reporter(log=lines.append))
    assert any("resuming at step 10/20" in line for line in lines)

    # weights, optimizer and random state were restored: the same run as the uninterrupted one
    from safetensors.torch import load_file

    whole = load_file(str(tmp_path / "whole" / "stage1" / "best" / "model.safetensors"))
    resumed = load_file(str(stage_dir / "best" / "model.safetensors"))
    assert whole.keys() == resumed.keys()
    assert all(torch.allclose(whole[k], resumed[k], atol=1e-5) for k in whole)
    log = [json.loads(line) for line in (stage_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 21))
    reference = [json.loads(line) for line in (tmp_path / "whole" / "stage1" / "log.jsonl").read_text().splitlines()]
    assert [r["total"] for r in log] == pytest.approx([r["total"] for r in reference], abs=1e-5)


def test_bad_settings_are_one_line_errors(tiny_encoder, dataset, tmp_path):
    bad_recipe = tmp_path / "bad.yaml"
    bad_recipe.write_text("stage1: {stepz: 3}\n")
    result = invoke("align", "--data", str(dataset), "--out", str(tmp_path / "o1"), "--recipe", str(bad_recipe))
    assert result.exit_code == 2 and "unknown key(s) stepz" in result.output

    audio_only = make_dataset(tmp_path / "audio-only", per_split=(2, 1, 1), with_frames=False)
    result = invoke("align", "--encoder", str(tiny_encoder), "--data", str(audio_only), "--out", str(tmp_path / "o2"),
                    "--stages", "1,2,3", "--recipe", str(write_recipe(tmp_path / "r.yaml")))
    assert result.exit_code == 2 and "stage 3 (audio-image) needs clips with frames" in result.output

    result = invoke("align", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o3"))
    assert result.exit_code == 2 and "nowhere: no such file or directory" in result.output
    (tmp_path / "not-a-dataset").mkdir()
    result = invoke("align", "--data", str(tmp_path / "not-a-dataset"), "--out", str(tmp_path / "o3"))
    assert result.exit_code == 2 and "clips.parquet: missing" in result.output
    assert not (tmp_path / "o3").exists()

    result = invoke("align", "--data", str(dataset), "--out", str(tmp_path / "o4"), "--stages", "2,1")
    assert result.exit_code == 2 and "in order" in result.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_alignment_runs_on_cuda(tiny_encoder, dataset, tmp_path):
    config = load_align_config(write_recipe(tmp_path / "r.yaml", steps=6), {"encoder": str(tiny_encoder), "stages": [1, 2, 3]})
    summary = run_alignment(config, dataset, tmp_path / "run", device="cuda", reporter=Reporter(log=lambda line: None))
    assert summary["stages"]["3"]["report"]["clips"] == 3 * len(LABELS)
    encoder = load_encoder(tmp_path / "run" / "encoder", device="cuda")
    assert encoder.device.type == "cuda"
    assert encoder.embed_audio([torch.zeros(SR) + 0.1], SR).device.type == "cuda"


@pytest.mark.slow
def test_quick_recipe_with_the_default_builtin_encoder(tmp_path):
    """The shipped 'quick' recipe, full-size built-in encoder, on a larger synthetic dataset."""
    data = make_dataset(tmp_path / "ds", per_split=(20, 5, 5))
    config = load_align_config("quick", {"encoder": "builtin"})
    summary = run_alignment(config, data, tmp_path / "run", reporter=Reporter(log=print))
    initial, first = summary["initial"], summary["stages"]["1"]["report"]
    assert first["text_to_audio_R@1"] >= first["chance_R@1"] + 0.3
    assert first["gap_text"] > initial["gap_text"] + 0.05
    assert summary["stages"]["3"]["report"]["audio_to_image_R@1"] > initial["audio_to_image_R@1"]


def test_losses_match_their_definitions():
    import torch.nn.functional as F

    from marsctl.align.losses import anchor_loss, multi_positive_info_nce, symmetric_info_nce, triplet_loss

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 4, generator=gen)
    # one positive per row: plain cross-entropy
    assert torch.allclose(multi_positive_info_nce(logits, torch.eye(4, dtype=torch.bool)), F.cross_entropy(logits, torch.arange(4)))
    x = F.normalize(torch.randn(4, 8, generator=gen), dim=-1)
    y = F.normalize(torch.randn(4, 8, generator=gen), dim=-1)
    labels = torch.arange(4)
    scale = torch.tensor(10.0)
    expected = 0.5 * (F.cross_entropy(scale * x @ y.T, labels) + F.cross_entropy(scale * y @ x.T, labels))
    assert torch.allclose(symmetric_info_nce(x, y, labels, labels, scale), expected)
    # triplet: zero once the positive is closer than the hardest negative by the margin
    assert float(triplet_loss(x, x, y, labels, labels + 10, margin=0.0)) == 0.0
    assert float(triplet_loss(x, y, x, labels, labels + 10, margin=0.0)) > 0.0
    # anchor: lower when the target beats the mixture
    same = anchor_loss(x, x, y, y, labels, scale)
    swapped = anchor_loss(x, y, x, y, labels, scale)
    assert float(same) < float(swapped)


def test_freeze_text_keeps_the_text_space_and_aligns_audio_into_it(tiny_encoder, dataset, tmp_path):
    """freeze_text: text embeddings stay the starting encoder's (a separator trained on them keeps its
    queries), while the audio tower learns to retrieve them."""
    recipe = write_recipe(tmp_path / "r.yaml", steps=30, freeze_text=True)
    config = load_align_config(recipe, {"encoder": str(tiny_encoder), "stages": [1]})
    summary = run_alignment(config, dataset, tmp_path / "run", reporter=Reporter(log=lambda line: None))
    start, aligned = load_encoder(tiny_encoder), load_encoder(tmp_path / "run" / "encoder")
    with torch.no_grad():
        assert torch.allclose(start.embed_text(list(LABELS)), aligned.embed_text(list(LABELS)), atol=1e-6)
    report = summary["stages"]["1"]["report"]
    assert report["text_to_audio_R@1"] >= report["chance_R@1"] + 0.3
    assert report["text_to_audio_R@1"] > summary["initial"]["text_to_audio_R@1"]
    # without it the text projection moves
    free = load_align_config(write_recipe(tmp_path / "f.yaml", steps=10), {"encoder": str(tiny_encoder), "stages": [1]})
    run_alignment(free, dataset, tmp_path / "free", reporter=Reporter(log=lambda line: None))
    with torch.no_grad():
        assert not torch.allclose(start.embed_text(list(LABELS)), load_encoder(tmp_path / "free" / "encoder").embed_text(list(LABELS)), atol=1e-4)


def test_zero_shot_rows_classify_targets_mixtures_and_a_separators_estimates(tiny_encoder, dataset, tmp_path):
    """--separator: the held-out mixtures are separated once by a real separator (the shipped default)
    and its estimates are classified zero-shot after every stage, beside the targets and mixtures."""
    from marsctl.align.data import HeldOut, read_clips
    from marsctl.align.metrics import evaluate_alignment, heldout_mixtures

    recipe = write_recipe(tmp_path / "r.yaml", steps=10)
    plain = tmp_path / "run"
    assert invoke("align", "--encoder", str(tiny_encoder), "--data", str(dataset), "--stages", "1", "--recipe", str(recipe),
                  "--out", str(plain), "--device", "cpu", "-q").exit_code == 0
    # a separator added to a finished run is not "another config": the run resumes (nothing to redo)
    again = invoke("align", "--encoder", str(tiny_encoder), "--data", str(dataset), "--stages", "1", "--recipe", str(recipe),
                   "--out", str(plain), "--device", "cpu", "-q", "--separator", "default")
    assert again.exit_code == 0, again.output

    out = tmp_path / "with-separator"
    result = invoke("align", "--encoder", str(tiny_encoder), "--data", str(dataset), "--stages", "1", "--recipe", str(recipe),
                    "--out", str(out), "--device", "cpu", "-q", "--separator", "default")
    assert result.exit_code == 0, result.output
    assert "zero_shot_estimate_acc" in result.output
    summary = json.loads((out / "metrics.json").read_text())
    for metrics in (summary["initial"], summary["stages"]["1"]["select"], summary["stages"]["1"]["report"]):
        for key in ("zero_shot_target_acc", "zero_shot_mixture_acc", "zero_shot_estimate_acc"):
            assert 0.0 <= metrics[key] <= 1.0
        assert np.isfinite(metrics["gap_text_estimate"])

    # the rows' definitions: estimates equal to the targets (or to the mixtures) score as those
    heldout = HeldOut.load(read_clips(dataset), "test", SR, 2.0, 0, 0)
    targets, mixtures = heldout_mixtures(heldout, seed=0)
    assert len(targets) == len(mixtures) == len(heldout)
    encoder = load_encoder(out / "encoder")
    perfect = evaluate_alignment(encoder, heldout, SR, estimates=targets)
    assert perfect["zero_shot_estimate_acc"] == perfect["zero_shot_target_acc"]
    assert perfect["gap_text_estimate"] == pytest.approx(perfect["gap_text"], abs=1e-5)
    unseparated = evaluate_alignment(encoder, heldout, SR, estimates=mixtures)
    assert unseparated["zero_shot_estimate_acc"] == unseparated["zero_shot_mixture_acc"]
    assert unseparated["gap_text_estimate"] == pytest.approx(0.0, abs=1e-5)
    assert "zero_shot_estimate_acc" not in evaluate_alignment(encoder, heldout, SR)


def test_stage1_against_every_class_text_with_interference_learns(tiny_encoder, dataset, tmp_path):
    """text_negatives 'all' (each clip against every training class's text) with interfering crops
    aligns; a run recorded before these settings existed still resumes; bad values are one-line errors."""
    from marsctl.align.trainer import _check_run_config
    from marsctl.config import to_mapping

    recipe = write_recipe(tmp_path / "r.yaml", steps=30, freeze_text=True)
    data = yaml.safe_load(recipe.read_text())
    data["stage1"] = dict(data["stage1"], text_negatives="all", interference_share=0.5, interference_min_db=-15.0, interference_max_db=-6.0)
    recipe.write_text(yaml.safe_dump(data))
    config = load_align_config(recipe, {"encoder": str(tiny_encoder), "stages": [1]})
    summary = run_alignment(config, dataset, tmp_path / "run", reporter=Reporter(log=lambda line: None))
    report = summary["stages"]["1"]["report"]
    assert report["audio_to_text_R@1"] >= report["chance_R@1"] + 0.3
    assert report["audio_to_text_R@1"] > summary["initial"]["audio_to_text_R@1"]

    # an align_config.json written before text_negatives / interference / eval.separator existed
    record_path = tmp_path / "run" / "align_config.json"
    record = json.loads(record_path.read_text())
    default_config = load_align_config(write_recipe(tmp_path / "d.yaml", steps=30, freeze_text=True), {"encoder": str(tiny_encoder), "stages": [1]})
    record["align"] = json.loads(json.dumps(to_mapping(default_config)))
    for key in ("text_negatives", "interference_share", "interference_min_db", "interference_max_db"):
        del record["align"]["stage1"][key]
    del record["align"]["eval"]["separator"]
    old = tmp_path / "old"
    old.mkdir()
    (old / "align_config.json").write_text(json.dumps(record))
    _check_run_config(old, default_config, dataset)  # the defaults fill what the old record lacks: accepted
    with pytest.raises(Exception, match="another config"):
        _check_run_config(old, config, dataset)  # but other values are another run

    for bad, message in (({"text_negatives": "some"}, "text_negatives"), ({"interference_min_db": 0.0, "interference_max_db": -6.0}, "interference_min_db")):
        broken = dict(data, stage1={**data["stage1"], **bad})
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(broken))
        with pytest.raises(Exception, match=message):
            load_align_config(tmp_path / "bad.yaml")


def test_interference_adds_another_class_at_the_drawn_level():
    from marsctl.align.config import AudioTextStageConfig
    from marsctl.align.trainer import _with_interference

    gen = torch.Generator().manual_seed(0)
    crops = torch.randn(6, 1600, generator=gen) * torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0, 1.0])[:, None]
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    cfg = AudioTextStageConfig(interference_share=1.0, interference_min_db=-20.0, interference_max_db=-10.0)
    mixed = _with_interference(crops, labels, cfg, torch.Generator().manual_seed(1))
    added = mixed - crops
    level_db = 20 * torch.log10(added.pow(2).mean(-1).sqrt() / crops.pow(2).mean(-1).sqrt())
    assert ((level_db >= -20.01) & (level_db <= -9.99)).all(), level_db
    for i in range(6):  # what was added is a scaled crop of another class
        ratios = [float(torch.nn.functional.cosine_similarity(added[i], crops[j], dim=0)) for j in range(6)]
        partner = max(range(6), key=lambda j: ratios[j])
        assert ratios[partner] > 0.999 and labels[partner] != labels[i]
    untouched = _with_interference(crops, labels, AudioTextStageConfig(interference_share=0.0), torch.Generator().manual_seed(1))
    assert torch.equal(untouched, crops)
