"""Package a supervised (or RL) run as the embedded default model (how marsctl/pretrained/ was made).

    python -m marsctl.pretrained.package RUN_DIR DATASET_DIR [--encoder ALIGNED_ENCODER_DIR] [--recipe NAME] [--force]

0. **the ratchet**: the run's model and the default it would replace both separate every fixed
   ``val`` mixture of the dataset (text queries); the per-source SI-SDRi differences (run − default)
   must show a gain, mean − ``z`` × standard error > ``min_gain_db`` (:func:`validation_gain`), or
   nothing is written (``--force`` skips the check). The decision goes into ``evaluation.json``;
1. copies the run's model (``config.json``, ``model.safetensors``) into
   ``marsctl/pretrained/separator/`` and saves its query encoder beside it in ``encoder/``
   (so the default does not change if the built-in encoder's defaults do). ``--encoder`` ships
   an aligned encoder instead (audio queries, the RL reward); it must give the same text
   embeddings as the encoder the separator was trained with (``marsctl align`` with
   ``freeze_text``), checked on every training label;
2. evaluates it on every fixed ``test`` mixture of the dataset (held-out recording groups and
   melodies), with the unprocessed mixture and the ideal-ratio-mask oracle as references, with
   text queries and, when the shipped encoder is aligned, audio queries; a union dataset's scores
   are broken down by pair kind and soundfont (:func:`marsctl.data.union.source_groups`);
3. writes the model card (``README.md``) with the training recipe and those numbers, and the
   evaluation report beside it (``evaluation.md``, ``evaluation.json``);
4. copies, per pair kind (instrument pairs, everyday pairs, one of each; classes not repeated), the
   first test mixture the model separates with positive SI-SDRi for every source (demos, said so in
   ``examples.json``; the card gives the averages over all) to ``marsctl/pretrained/examples/``, and their sources (as
   in the mix, named like ``marsctl separate`` names its outputs) and the mixture to
   ``example_references/<example>/``, so ``marsctl eval`` can score the README's demo, and
   ``examples/queries.csv`` (each example with each of its sources' labels).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
from collections import defaultdict
from pathlib import Path

import torch

from marsctl.audio import load_audio, save_audio
from marsctl.errors import MarsctlError
from marsctl.eval.model import evaluate_separator, summarize
from marsctl.eval.report import summarize as summarize_values
from marsctl.eval.tables import markdown_table
from marsctl.files import write_json_atomic, write_text_atomic
from marsctl.models.encoders import load_encoder, save_encoder
from marsctl.models.separator import load_separator
from marsctl.pretrained import DEFAULT_SEPARATOR_DIR, EXAMPLE_REFERENCES_DIR, EXAMPLES_DIR
from marsctl.separate import Query

#: the shipped encoder's text embeddings may differ from the training encoder's by at most this (max abs)
TEXT_EMBEDDING_TOLERANCE = 1e-4


def check_same_text_space(trained_with, shipped, labels: list[str], where: str) -> None:
    """Refuse to ship an encoder whose text queries differ from those the separator learned from."""
    with torch.no_grad():
        difference = float((trained_with.embed_text(labels) - shipped.embed_text(labels)).abs().max())
    if difference > TEXT_EMBEDDING_TOLERANCE:
        raise MarsctlError(f"{where}: its text embeddings differ from the training encoder's by {difference:.3g} "
                           "(align with freeze_text: true to keep the separator's text space)")


@dataclasses.dataclass(frozen=True)
class ValidationGain:
    """The ratchet's evidence: paired per-source SI-SDRi of a candidate against the model it would replace."""

    split: str
    sources: int
    candidate_db: float
    baseline_db: float
    gain_db: float
    gain_se_db: float
    better_fraction: float
    min_gain_db: float
    z: float

    @property
    def accepted(self) -> bool:
        return math.isfinite(self.gain_db) and self.gain_db - self.z * (self.gain_se_db if math.isfinite(self.gain_se_db) else math.inf) > self.min_gain_db

    def line(self) -> str:
        return (f"{self.split} split, {self.sources} sources: candidate {self.candidate_db:.2f} dB, default {self.baseline_db:.2f} dB, "
                f"paired {self.gain_db:+.2f} ± {self.gain_se_db:.2f} dB (better on {self.better_fraction:.0%}; "
                f"needs mean − {self.z:g} SE > {self.min_gain_db:+.2f})")


def validation_gain(candidate, candidate_encoder, baseline, baseline_encoder, dataset_dir: Path, split: str = "val",
                    min_gain_db: float = 0.0, z: float = 1.0) -> ValidationGain:
    """Both separators on every fixed ``split`` mixture with text queries; SI-SDRi paired per source
    (scores carry eval's -60/+60 dB floor and ceiling, so a failed or perfect estimate still counts as a pair)."""
    rows = {}
    for name, model, encoder in (("candidate", candidate, candidate_encoder), ("baseline", baseline, baseline_encoder)):
        scored = evaluate_separator(model, encoder, dataset_dir, query_modalities=("text",), split=split, references=False)
        rows[name] = {(r["mixture_id"], r["source"]): r["si_sdri"] for r in scored if r["system"] == "model"}
    keys = sorted(set(rows["candidate"]) & set(rows["baseline"]))
    pairs = [(rows["candidate"][k], rows["baseline"][k]) for k in keys if math.isfinite(rows["candidate"][k]) and math.isfinite(rows["baseline"][k])]
    if not pairs:
        raise MarsctlError(f"{dataset_dir}: no {split} mixtures scored by both models; the ratchet needs the {split} split")
    differences = [c - b for c, b in pairs]
    summary = summarize_values(differences)
    se = summary.standard_error if summary.standard_error is not None else math.nan
    return ValidationGain(split=split, sources=len(pairs), candidate_db=sum(c for c, _ in pairs) / len(pairs),
                          baseline_db=sum(b for _, b in pairs) / len(pairs), gain_db=float(summary.mean), gain_se_db=float(se),
                          better_fraction=sum(d > 0 for d in differences) / len(differences), min_gain_db=min_gain_db, z=z)


def breakdown_rows(rows: list[dict], groups: dict) -> list[dict]:
    """Mean ± SE of SI-SDRi per (system, query modality, group) with the union's pair kinds and soundfonts."""
    buckets: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for row in rows:
        group = groups.get((row["mixture_id"], row["label"]))
        value = row["si_sdri"]
        if group is None or not math.isfinite(value):
            continue
        key = (row["system"], row["query_modality"])
        buckets[(*key, f"{group['pair_kind'] or 'unpaired'} pairs")].append(value)
        if group["soundfont"]:
            buckets[(*key, f"soundfont {group['soundfont']}")].append(value)
    out = []
    for (system, modality, group), values in sorted(buckets.items()):
        summary = summarize_values(values)
        se = summary.standard_error if summary.standard_error is not None else float("nan")
        out.append({"system": system, "query_modality": modality, "group": group, "n": summary.count,
                    "si_sdri_mean": summary.mean, "si_sdri_se": se})
    return out


def choose_examples(dataset_dir: Path, rows: list[dict]) -> list[dict]:
    """Per pair kind, the first fixed test mixture (by mixture id) that the model, with text queries,
    separates with positive SI-SDRi for every source; classes not repeated across examples. These are
    demos that show what the model does when it works: the averages over all test mixtures are the
    card's, and examples.json says how the examples were chosen."""
    from marsctl.data.manifest import load_mixtures
    from marsctl.data.union import mixture_pair_kind

    gains: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        if row["system"] == "model" and row["query_modality"] == "text":
            gains[row["mixture_id"]].append(row["si_sdri"])
    table = sorted(load_mixtures(dataset_dir, split="test"), key=lambda row: row["mixture_id"])
    chosen, kinds, seen = [], set(), set()
    for row in table:
        kind = mixture_pair_kind(row)
        separated = gains.get(row["mixture_id"]) and all(math.isfinite(g) and g > 0 for g in gains[row["mixture_id"]])
        if kind not in kinds and separated and not seen.intersection(row["source_labels"]):
            chosen.append(row)
            kinds.add(kind)
            seen.update(row["source_labels"])
    return chosen


def write_examples(dataset_dir: Path, chosen: list[dict]) -> list[dict]:
    from marsctl.data.union import mixture_pair_kind

    for folder in (EXAMPLES_DIR, EXAMPLE_REFERENCES_DIR):
        if folder.is_dir():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    examples = []
    for row in chosen:
        name = "+".join(label.replace(" ", "-") for label in row["source_labels"])
        mixture = load_audio(dataset_dir / row["mixture_path"], None)
        save_audio(EXAMPLES_DIR / f"{name}.flac", mixture, 16_000)
        save_audio(EXAMPLE_REFERENCES_DIR / name / "mixture.flac", mixture, 16_000)
        for label, source in zip(row["source_labels"], row["source_paths"]):
            # named like the outputs of `marsctl separate -q LABEL`, so `marsctl eval` pairs them
            save_audio(EXAMPLE_REFERENCES_DIR / name / f"{Query(texts=(label,)).slug()}.flac", load_audio(dataset_dir / source, None), 16_000)
        examples.append({"file": f"{name}.flac", "mixture_id": row["mixture_id"], "labels": list(row["source_labels"]),
                         "pair_kind": mixture_pair_kind(row),
                         "chosen_by": "the first test mixture of its pair kind that the model separates with positive "
                                      "SI-SDRi for every source (a demo; averages over all test mixtures: the model card)"})
    write_json_atomic(EXAMPLES_DIR / "examples.json", examples)
    write_text_atomic(EXAMPLES_DIR / "queries.csv", "path,query\n" + "".join(f"{e['file']},{label}\n" for e in examples for label in e["labels"]))
    return examples


def package(run_dir: Path, dataset_dir: Path, encoder_dir: Path | None = None, recipe: str = "union-small", *,
            target: Path = DEFAULT_SEPARATOR_DIR, force: bool = False, min_gain_db: float = 0.0, z: float = 1.0,
            examples: bool = True) -> dict:
    """Package ``run_dir`` as the model in ``target`` (the embedded default unless a test says otherwise).

    Unless ``force``, a model already in ``target`` is replaced only when the run beats it on the
    dataset's validation split (:func:`validation_gain`); otherwise :class:`MarsctlError` and nothing
    in ``target`` is touched. ``examples`` rewrites the packaged demo mixtures (the default's only)."""
    from marsctl.data.manifest import training_labels
    from marsctl.data.union import source_groups

    target = Path(target)
    run = load_separator(run_dir)
    ratchet = None
    if not force and (target / "model.safetensors").is_file():
        current = load_separator(target)
        ratchet = validation_gain(run, load_encoder(run.encoder), current, load_encoder(current.encoder), Path(dataset_dir),
                                  min_gain_db=min_gain_db, z=z)
        if not ratchet.accepted:
            raise MarsctlError(f"{run_dir}: not packaged, no validated gain over the model in {target}: {ratchet.line()}")
    training = run.config.get("training", {})
    labels = training_labels(dataset_dir)
    trained_with = load_encoder(run.encoder)
    encoder = trained_with
    aligned = None
    if encoder_dir is not None:
        encoder = load_encoder(encoder_dir)
        check_same_text_space(trained_with, encoder, labels, str(encoder_dir))
        metrics_path = Path(encoder_dir).parent / "metrics.json"
        aligned = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / "model.safetensors", target / "model.safetensors")
    if (target / "encoder").is_dir():
        shutil.rmtree(target / "encoder")
    save_encoder(encoder, target / "encoder", card_extra="Query encoder of the embedded default separator (marsctl/pretrained).")
    config = dict(run.config)
    config["encoder"] = "encoder"
    config["labels"] = labels  # the classes it knows: `separate` notes queries far from all of them
    write_json_atomic(target / "config.json", config)

    model = load_separator(target)
    encoder = load_encoder(model.encoder)
    modalities = ("text", "audio") if aligned is not None else ("text",)
    rows = evaluate_separator(model, encoder, dataset_dir, query_modalities=modalities, split="test", skip_missing_queries=True)
    overall, per_class = summarize(rows), summarize(rows, by_label=True)
    groups = breakdown_rows(rows, source_groups(dataset_dir, "test"))
    write_json_atomic(target / "evaluation.json", {"data": str(dataset_dir), "split": "test", "overall": overall,
                                                   "by_group": groups, "per_class": per_class,
                                                   "ratchet": dataclasses.asdict(ratchet) | {"accepted": ratchet.accepted} if ratchet else None})
    write_text_atomic(target / "evaluation.md", "# Default separator on the held-out test mixtures\n\n" + markdown_table(overall)
                      + "\n## Per class\n\n" + markdown_table(per_class))
    examples = write_examples(dataset_dir, choose_examples(dataset_dir, rows)) if examples else []

    history = json.loads((run_dir / "history.json").read_text()) if (run_dir / "history.json").is_file() else []
    log_every = training.get("log_every", 1)
    train_minutes = sum(h.get("step_time_s", 0.0) for h in history) * log_every / 60
    n_params = sum(p.numel() for p in model.model.parameters())
    size_mb = (target / "model.safetensors").stat().st_size / 1e6
    write_text_atomic(target / "README.md", model_card(model, training, overall, groups, per_class, labels, aligned,
                                                       dataset_dir, n_params, size_mb, train_minutes, recipe))
    return {"overall": overall, "by_group": groups, "examples": examples, "params": n_params, "size_mb": size_mb,
            "ratchet": ratchet.line() if ratchet else "skipped (--force or no model to replace)"}


def _cell(mean: float, se: float) -> str:
    return f"{mean:.2f} ± {se:.2f}" if math.isfinite(se) else f"{mean:.2f}"


def model_card(model, training: dict, overall: list[dict], groups: list[dict], per_class: list[dict], labels: list[str],
               aligned: dict | None, dataset_dir: Path, n_params: int, size_mb: float, train_minutes: float,
               recipe: str = "union-small") -> str:
    description = json.loads((dataset_dir / "dataset.json").read_text()).get("description", "") if (dataset_dir / "dataset.json").is_file() else ""
    systems = sorted({(g["system"], g["query_modality"]) for g in groups})
    names = sorted({g["group"] for g in groups}, key=lambda n: (n.startswith("soundfont"), n))
    by = {(g["system"], g["query_modality"], g["group"]): g for g in groups}
    head = "| system | query | " + " | ".join(names) + " |\n|---|---|" + "---:|" * len(names) + "\n"
    table = head + "\n".join(
        f"| {system} | {modality} | " + " | ".join(_cell(by[(system, modality, n)]["si_sdri_mean"], by[(system, modality, n)]["si_sdri_se"])
                                                  if (system, modality, n) in by else "" for n in names) + " |"
        for system, modality in systems)
    model_entries = [e for e in per_class if e["system"] == "model" and e["query_modality"] == "text"]
    class_lines = "\n".join(f"| {e['label']} | {e['n']} | {_cell(e['si_sdri_mean'], e['si_sdri_se'] or float('nan'))} |" for e in model_entries)
    alignment = "not aligned (the audio tower is untrained: audio queries and the reward carry no class information)"
    if aligned:
        stages = aligned.get("stages", {})
        parts = [f"stage {k}: text->audio R@1 {v['report'].get('text_to_audio_R@1', float('nan')):.2f}, "
                 f"audio->text R@1 {v['report'].get('audio_to_text_R@1', float('nan')):.2f}" for k, v in stages.items()]
        alignment = ("aligned by `marsctl align` with the text side frozen (" + "; ".join(parts)
                     + f", on {next(iter(stages.values()))['report'].get('classes', '?')} classes of held-out test clips)" if stages else "aligned")
    start = training.get("init_model") or ""
    return f"""# marsctl default separator

The separator `marsctl separate` uses when no `--model` is given: a query-conditioned mask separator
(7-level U-Net on the log-frequency magnitude, {n_params / 1e6:.2f} M parameters, {size_mb:.1f} MB) with a Beta
mask policy (kappa {model.model.config.kappa}), conditioned on the built-in offline encoder (packaged
all-MiniLM-L6-v2 text tower; saved in `encoder/`). Encoder: {alignment}.

## How it was trained

- data: `{training.get('data')}`: {description}
  {len(labels)} classes (the list is `labels` in `config.json`; `separate` warns about queries far from all of them).
- recipe: `recipes/train/{recipe}.yaml` (`marsctl train sup --recipe {recipe} --data data/union`){f', warm-started from the separator `{Path(start).name}`' if start else ''}
- {training.get('step')} steps of batch {training.get('batch_size')} on a shared 2-core CPU (about {train_minutes:.0f} min of
  training steps), AdamW lr {training.get('learning_rate')} (warmup {training.get('warmup_steps')}, cosine), OmniSep weighted-BCE mask
  loss, text queries (the class name); best validation SI-SDRi {training.get('best_val_si_sdri_db', float('nan')):.2f} dB on
  {training.get('val_mixtures')} fixed validation mixtures.
- packaged by `python -m marsctl.pretrained.package RUN_DIR DATASET_DIR --encoder ALIGNED_ENCODER`.

## Held-out test mixtures (SI-SDRi, dB, mean ± standard error over sources)

Test clips come from recording groups (everyday sounds) and melodies (instruments) that no
training or validation clip shares. Pair kinds: two instruments, two everyday sounds, or one of
each; instrument sources are also split by the soundfont that rendered them.

{table}

The mixture row is 0 by definition; the ideal ratio mask (oracle-irm) is the ceiling of a
mixture-phase mask separator. All metrics (SDR/SIR/SAR/SI-SDR, the encoder score) and per-class
rows with every system: `evaluation.md`. The encoder score there is computed with this model's
own encoder, not an independent judge.

## Per class (model, text query)

| class | n | SI-SDRi (dB) |
|---|---:|---:|
{class_lines}

## Limits

Small (CPU-trained) and trained on a small offline corpus: {len(labels)} classes, a few recording
groups each. Queries outside these classes get a warning and little separation; train your
own with `marsctl data build` + `marsctl train sup`, starting from this model (`--init-model default`).
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("dataset_dir", type=Path)
    parser.add_argument("--encoder", type=Path, help="an aligned encoder to ship (same text space as the run's)")
    parser.add_argument("--recipe", default="union-small", help="the recipes/train name the run was trained with (for the card)")
    parser.add_argument("--force", action="store_true", help="package even without a validated gain over the current default")
    parser.add_argument("--min-gain-db", type=float, default=0.0, help="the ratchet's margin (default 0)")
    parser.add_argument("--z", type=float, default=1.0, help="standard errors the paired gain must clear (default 1)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    try:
        result = package(args.run_dir, args.dataset_dir, args.encoder, args.recipe, force=args.force,
                         min_gain_db=args.min_gain_db, z=args.z)
    except MarsctlError as error:
        raise SystemExit(f"error: {error}") from None
    print(json.dumps({k: v for k, v in result.items() if k != "overall"}, indent=2))
    print(markdown_table(result["overall"]))


if __name__ == "__main__":
    main()
