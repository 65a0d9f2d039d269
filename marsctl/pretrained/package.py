"""Package a supervised run as the embedded default model (how marsctl/pretrained/ was made).

    python -m marsctl.pretrained.package RUN_DIR DATASET_DIR [--examples 2]

1. copies the run's best model (``config.json``, ``model.safetensors``) into
   ``marsctl/pretrained/separator/`` and saves its query encoder beside it in ``encoder/``
   (so the default does not change if the built-in encoder's defaults do);
2. evaluates it on every fixed ``test`` mixture of the dataset (held-out melodies), with
   the unprocessed mixture and the ideal-ratio-mask oracle as references;
3. writes the model card (``README.md``) with the training recipe and those numbers, and
   the evaluation report beside it (``evaluation.md``);
4. copies a few test mixtures to ``marsctl/pretrained/examples/`` to try it on, and their
   sources (as in the mix, named like ``marsctl separate`` names its outputs) and the mixture
   to ``example_references/<example>/``, so ``marsctl eval`` can score the README's demo,
   and ``examples/queries.csv`` (each example with each of its instruments).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from marsctl.audio import load_audio, save_audio
from marsctl.eval.model import evaluate_separator, summarize
from marsctl.eval.tables import markdown_table
from marsctl.files import write_json_atomic, write_text_atomic
from marsctl.models.encoders import load_encoder, save_encoder
from marsctl.models.separator import load_separator
from marsctl.pretrained import DEFAULT_SEPARATOR_DIR, EXAMPLE_REFERENCES_DIR, EXAMPLES_DIR
from marsctl.separate import Query


def package(run_dir: Path, dataset_dir: Path, num_examples: int = 2) -> dict:
    run = load_separator(run_dir)
    training = run.config.get("training", {})
    target = DEFAULT_SEPARATOR_DIR
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / "model.safetensors", target / "model.safetensors")
    encoder = load_encoder(run.encoder)
    save_encoder(encoder, target / "encoder", card_extra="Query encoder of the embedded default separator (marsctl/pretrained).")
    config = dict(run.config)
    config["encoder"] = "encoder"
    if not config.get("labels"):  # the classes it knows: `separate` notes queries far from all of them
        from marsctl.data.manifest import load_clips

        clips = load_clips(dataset_dir).to_pandas()
        config["labels"] = sorted(set(clips.loc[clips["keep"] & (clips["split"] == "train"), "label"]))
    write_json_atomic(target / "config.json", config)

    model = load_separator(target)
    encoder = load_encoder(model.encoder)
    rows = evaluate_separator(model, encoder, dataset_dir, query_modalities=("text",), split="test")
    overall, per_class = summarize(rows), summarize(rows, by_label=True)
    write_json_atomic(target / "evaluation.json", {"data": str(dataset_dir), "split": "test", "overall": overall, "per_class": per_class})
    write_text_atomic(target / "evaluation.md", "# Default separator on held-out soundfont melodies\n\n" + markdown_table(overall) + "\n## Per class\n\n" + markdown_table(per_class))
    model_row = next(e for e in overall if e["system"] == "model")
    oracle_row = next(e for e in overall if e["system"] == "oracle-irm")

    from marsctl.data.manifest import load_mixtures

    EXAMPLES_DIR.mkdir(parents=True, exist_ok=True)
    table = load_mixtures(dataset_dir, split="test")
    chosen, seen = [], set()
    for i in range(len(table)):
        labels = tuple(table[i]["source_labels"])
        if not seen.intersection(labels):
            chosen.append(table[i])
            seen.update(labels)
        if len(chosen) == num_examples:
            break
    examples = []
    for row in chosen:
        name = "+".join(label.replace(" ", "-") for label in row["source_labels"])
        mixture = load_audio(dataset_dir / row["mixture_path"], None)
        save_audio(EXAMPLES_DIR / f"{name}.flac", mixture, 16_000)
        save_audio(EXAMPLE_REFERENCES_DIR / name / "mixture.flac", mixture, 16_000)
        for label, source in zip(row["source_labels"], row["source_paths"]):
            # named like the outputs of `marsctl separate -q LABEL`, so `marsctl eval` pairs them
            save_audio(EXAMPLE_REFERENCES_DIR / name / f"{Query(texts=(label,)).slug()}.flac", load_audio(dataset_dir / source, None), 16_000)
        examples.append({"file": f"{name}.flac", "mixture_id": row["mixture_id"], "labels": list(row["source_labels"])})
    write_json_atomic(EXAMPLES_DIR / "examples.json", examples)
    write_text_atomic(
        EXAMPLES_DIR / "queries.csv",
        "path,query\n" + "".join(f"{e['file']},{label}\n" for e in examples for label in e["labels"]),
    )

    history = json.loads((run_dir / "history.json").read_text()) if (run_dir / "history.json").is_file() else []
    log_every = training.get("log_every", 1)
    train_minutes = sum(h.get("step_time_s", 0.0) for h in history) * log_every / 60
    n_params = sum(p.numel() for p in model.model.parameters())
    size_mb = (target / "model.safetensors").stat().st_size / 1e6
    card = f"""# marsctl default separator (soundfont-small)

The separator `marsctl separate` uses when no `--model` is given. A query-conditioned mask
separator (7-level U-Net on the log-frequency magnitude, {n_params / 1e6:.2f} M parameters,
{size_mb:.1f} MB) with a Beta mask policy (kappa {model.model.config.kappa}), conditioned on the
built-in offline encoder's text embeddings (packaged all-MiniLM-L6-v2; saved in `encoder/`).

## How it was trained

- data: `marsctl data build soundfont` (recipes/data/soundfont.yaml): 10 MUSIC instrument classes
  ({', '.join(sorted(set(r['label'] for r in rows)))}) rendered with FluidR3_GM from music21
  folk-song melodies; train/val/test melodies are disjoint; two-source OmniSep mixtures (each /2).
- recipe: `recipes/train/soundfont-small.yaml`, command
  `marsctl train sup --recipe recipes/train/soundfont-small.yaml --data data/soundfont --out runs/soundfont-small`
- {training.get('step')} steps of batch {training.get('batch_size')} on CPU (about {train_minutes:.0f} min of training steps,
  one thread on a shared 2-core machine), AdamW lr {training.get('learning_rate')}
  (warmup {training.get('warmup_steps')}, cosine), OmniSep weighted-BCE mask loss, text queries (the class name);
  best validation SI-SDRi {training.get('best_val_si_sdri_db', float('nan')):.2f} dB on {training.get('val_mixtures')} fixed val mixtures.
- packaged by `python -m marsctl.pretrained.package RUN_DIR DATASET_DIR`.

## Held-out melodies (fixed test mixtures, {model_row['n']} sources, text queries)

| system | SI-SDRi (dB) | SDR (dB) | SIR (dB) | SAR (dB) |
|---|---|---|---|---|
""" + "\n".join(
        f"| {e['system']} | {e['si_sdri_mean']:.2f} ± {e['si_sdri_se']:.2f} | {e['sdr_mean']:.2f} ± {e['sdr_se']:.2f} | {e['sir_mean']:.2f} | {e['sar_mean']:.2f} |"
        for e in overall
    ) + f"""

Mean ± standard error over the {model_row['n']} sources of the dataset's {model_row['n'] // 2} fixed test mixtures.
Per class: `evaluation.md`. The ideal ratio mask shows the ceiling of a mixture-phase mask
separator on these mixtures ({oracle_row['si_sdri_mean']:.2f} dB). The mixture row's SAR is not
meaningful (the mixture lies in the span of the references). `evaluation.md` also lists a CLAP
score, computed with this model's own encoder, whose audio tower is untrained: it carries no
information here.

## Limits

Small and trained on synthetic instrument renderings only: it knows these 10 instruments
(query by their names) and will do little on other sounds; audio and image queries need an
encoder aligned by `marsctl align`. Train your own with `marsctl train sup`.
"""
    write_text_atomic(target / "README.md", card)
    return {"overall": overall, "examples": examples, "params": n_params, "size_mb": size_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("dataset_dir", type=Path)
    parser.add_argument("--examples", type=int, default=2)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    result = package(args.run_dir, args.dataset_dir, args.examples)
    print(json.dumps({k: v for k, v in result.items() if k != "overall"}, indent=2))
    print(markdown_table(result["overall"]))


if __name__ == "__main__":
    main()
