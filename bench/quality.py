"""Quality study on real audio, offline (issue 8, part 1): supervised vs RL vs the IRM oracle.

    OMP_NUM_THREADS=2 .venv/bin/python bench/quality.py --work bench_work/quality [--sets soundfont debian-sfx]

For each benchmark set it runs the project's own commands, in order, each resumable (a rerun
skips finished stages and resumes unfinished ones):

1. **data**: ``marsctl data build soundfont`` (instruments rendered from real folk melodies,
   train melodies disjoint from test melodies) and, for ``debian-sfx``,
   ``marsctl data build debian-sfx`` (real sound effects from Debian game data packages, split by
   recording group; the ``debian`` source downloads and unpacks the packages).
2. **align**: ``marsctl align --encoder builtin --stages 1,2 --recipe bench/recipes/align-bench.yaml``
   on the set's train split: the one encoder used for the queries, the RL reward, best-of-N
   re-ranking and the CLAP-style score (LAION-CLAP cannot be downloaded on an offline box;
   pass ``--clap-encoder laion-clap:630k-audioset`` where it can).
3. **sup**: ``marsctl train sup --recipe recipes/train/soundfont-small.yaml --encoder <aligned>
   --max-steps S`` (the small CPU separator).
4. **rl**: ``marsctl train rl`` (or :func:`marsctl.rl.trainer.train_rl` when the CLI command is
   not there) from the supervised run, R steps, same encoder as reward encoder.
5. **eval** on the first ``--test-mixtures`` fixed test mixtures of the set (the same mixtures,
   the same text queries = class labels, the same seeds for every system):
   ``mixture`` (the unprocessed mix), ``oracle-irm``, ``supervised`` (mode = P), ``rl`` (mode),
   ``rl best-of-N`` (:func:`marsctl.separate.decode.best_of_n_separate` per chunk, seeded);
   SDR/SIR/SAR/SI-SDR/SI-SDRi/STFT distance/CLAP score per source, scored with
   :mod:`marsctl.eval`'s scoring path; mean +- SE overall and per class.

Outputs: ``<work>/<set>/eval/rows.json`` (one row per system x source), ``summary.json`` and
``<work>/quality.md`` (the tables for BENCHMARKS.md, with the issue's targets and the gaps).
The budgets (steps) are options so that a GPU user can run the same study at full size.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from marsctl.files import write_json_atomic, write_text_atomic  # noqa: E402

SETS = ("soundfont", "debian-sfx")
SYSTEMS = ("mixture", "oracle-irm", "supervised", "rl", "rl best-of-N")
ALIGN_RECIPE = ROOT / "bench" / "recipes" / "align-bench.yaml"
SUP_RECIPE = ROOT / "recipes" / "train" / "soundfont-small.yaml"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(args: list[str]) -> None:
    """Run one project command (argument list, never a shell string); stop the study if it fails."""
    log("$ " + " ".join(args))
    subprocess.run(args, check=True, cwd=ROOT)


def marsctl(*args: str) -> list[str]:
    return [sys.executable, "-m", "marsctl", *args]


def has_rl_cli() -> bool:
    probe = subprocess.run(marsctl("train", "rl", "--help"), capture_output=True, cwd=ROOT)
    return probe.returncode == 0


# --------------------------------------------------------------------------- stages


def build_data(name: str, work: Path, sfx_cache: Path | None, sfx_debs: Path | None) -> Path:
    data = work / "data" / name
    if (data / "dataset.json").is_file() and json.loads((data / "dataset.json").read_text()).get("status") == "complete":
        return data
    if name == "soundfont":
        run(marsctl("data", "build", "soundfont", "--out", str(data), "--quiet"))
    elif name == "debian-sfx":
        recipe = ROOT / "recipes/data/debian-sfx.yaml"
        if sfx_cache or sfx_debs:  # the recipe's debian section says where the packages are
            import yaml

            spec = yaml.safe_load(recipe.read_text(encoding="utf-8"))
            spec["debian"].update({"cache_dir": str(sfx_cache) if sfx_cache else None, "debs": str(sfx_debs) if sfx_debs else None})
            recipe = work / "debian-sfx.yaml"
            work.mkdir(parents=True, exist_ok=True)
            recipe.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
        run(marsctl("data", "build", str(recipe), "--out", str(data), "--quiet"))
    else:
        raise SystemExit(f"unknown benchmark set {name!r}; expected one of {', '.join(SETS)}")
    return data


def align(data: Path, out: Path, seed: int) -> Path:
    encoder = out / "encoder"
    if not (encoder / "config.json").is_file():
        run(marsctl("align", "--data", str(data), "--out", str(out), "--encoder", "builtin", "--stages", "1,2",
                    "--recipe", str(ALIGN_RECIPE), "--device", "cpu", "--seed", str(seed), "--quiet"))
    return encoder


def train_sup(data: Path, encoder: Path, out: Path, steps: int, seed: int) -> Path:
    if not _finished(out, steps):
        run(marsctl("train", "sup", "--recipe", str(SUP_RECIPE), "--data", str(data), "--encoder", str(encoder), "--out", str(out),
                    "--max-steps", str(steps), "--seed", str(seed), "--num-workers", "0", "--device", "cpu"))
    return out


def train_rl(data: Path, init: Path, encoder: Path, out: Path, steps: int, batch: int, group: int, seed: int) -> Path:
    if _finished(out, steps):
        return out
    if has_rl_cli():
        run(marsctl("train", "rl", "--init-model", str(init), "--data", str(data), "--reward-encoder", str(encoder), "--out", str(out),
                    "--max-steps", str(steps), "--batch-size", str(batch), "--group-size", str(group), "--seed", str(seed),
                    "--num-workers", "0", "--device", "cpu"))
    else:  # the library behind the command (the CLI was not registered yet when this was written)
        from marsctl.rl.trainer import load_rl_config, train_rl as library_train_rl

        log(f"train_rl(init_model={init}, max_steps={steps}, batch_size={batch}, group_size={group}) -> {out}")
        config = load_rl_config(None, {"init_model": str(init), "data": str(data), "reward_encoder": str(encoder), "max_steps": steps,
                                       "batch_size": batch, "group_size": group, "seed": seed, "num_workers": 0,
                                       "val_every": max(10, steps // 4), "checkpoint_every": max(10, steps // 4), "val_mixtures": 16})
        library_train_rl(config, out, device="cpu", progress=True, log=log)
    return out


def _finished(run_dir: Path, steps: int) -> bool:
    history = run_dir / "history.json"
    if not (run_dir / "config.json").is_file() or not history.is_file():
        return False
    try:
        data = json.loads(history.read_text())
    except ValueError:
        return False
    entries = data if isinstance(data, list) else data.get("history", data.get("steps", []))
    last = max((e.get("step", 0) for e in entries if isinstance(e, dict)), default=0)
    return last >= steps


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(data: Path, sup_dir: Path, rl_dir: Path, encoder_dir: Path, clap_spec: str | None, limit: int, best_of: int,
             out: Path, seed: int) -> list[dict]:
    """Rows for every system on the same fixed test mixtures (see the module docstring)."""
    from rich.progress import Progress

    from marsctl.audio import Spectrogram, overlap_add
    from marsctl.eval.model import ClapScorer, load_test_mixtures, oracle_irm, score_mixture
    from marsctl.queries import QueryBuilder
    from marsctl.models.encoders import load_encoder
    from marsctl.models.separator import load_separator
    from marsctl.separate.decode import best_of_n_separate
    from marsctl.separate import SeparateOptions, separate_waveform

    rows_path = out / "rows.json"
    if rows_path.is_file():
        cached = json.loads(rows_path.read_text())
        if cached.get("key") == [str(sup_dir), str(rl_dir), limit, best_of, seed, clap_spec]:
            return cached["rows"]
    sup, rl = load_separator(sup_dir), load_separator(rl_dir)
    encoder = load_encoder(str(encoder_dir))
    clap = load_encoder(clap_spec) if clap_spec else encoder
    signal = sup.model.config.signal
    spectrogram = Spectrogram(signal).double()
    queries = QueryBuilder(encoder, data, signal.sample_rate, split="test")
    options = SeparateOptions()
    mixtures = load_test_mixtures(data, "test", limit)
    clap_of = ClapScorer(clap, signal.sample_rate)
    rows: list[dict] = []

    def best_of_n(model, mixture, vectors, mixture_index):
        def process(chunks):  # [N, chunk] -> [N, K, chunk]
            return best_of_n_separate(model, chunks, vectors.unsqueeze(0).expand(chunks.shape[0], -1, -1), best_of, encoder)

        with torch.random.fork_rng():
            torch.manual_seed(seed + mixture_index)
            return overlap_add(process, mixture, model.config.signal.segment_samples, overlap=options.overlap, batch_size=options.batch_size)

    with Progress(transient=True) as bar:
        task = bar.add_task("evaluating", total=len(mixtures))
        for index, mix in enumerate(mixtures):
            mixture = torch.from_numpy(mix.mixture)
            vectors = torch.stack([queries.source("text", label, "", ()) for label in mix.labels])
            systems = {
                "mixture": mixture.unsqueeze(0).expand(len(mix.labels), -1),
                "oracle-irm": oracle_irm(mixture.double(), torch.from_numpy(mix.sources).double(), spectrogram).float(),
                "supervised": separate_waveform(sup.model, mixture, vectors, options, seed=seed + index),
                "rl": separate_waveform(rl.model, mixture, vectors, options, seed=seed + index),
                "rl best-of-N": best_of_n(rl.model, mixture, vectors, index),
            }
            scored = score_mixture(mix, [(system, "text" if system not in ("mixture", "oracle-irm") else "-", estimates)
                                         for system, estimates in systems.items()], clap_of, signal)
            for row in scored:
                rows.append({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()})
            bar.advance(task)
    write_json_atomic(rows_path, {"key": [str(sup_dir), str(rl_dir), limit, best_of, seed, clap_spec], "rows": rows})
    return rows


def report(name: str, rows: list[dict], settings: dict) -> tuple[str, dict]:
    from marsctl.eval.model import summarize
    from marsctl.eval.tables import markdown_table

    clean = [{k: (math.nan if v is None else v) for k, v in r.items()} for r in rows]
    overall, per_class = summarize(clean), summarize(clean, by_label=True)
    order = {s: i for i, s in enumerate(SYSTEMS)}
    overall.sort(key=lambda e: order.get(e["system"], 9))
    per_class.sort(key=lambda e: (e["label"], order.get(e["system"], 9)))
    mean = {e["system"]: e["si_sdri_mean"] for e in overall}
    oracle = mean.get("oracle-irm") or math.nan
    targets = {
        "rl_minus_sup_si_sdri_db": mean["rl"] - mean["supervised"],
        "best_of_n_minus_sup_si_sdri_db": mean["rl best-of-N"] - mean["supervised"],
        "sup_share_of_oracle": mean["supervised"] / oracle,
        "rl_share_of_oracle": mean["rl"] / oracle,
        "best_of_n_share_of_oracle": mean["rl best-of-N"] / oracle,
    }
    text = (f"### {name}\n\n{settings['describe']}\n\n" + markdown_table(overall).replace("| model |", "|")
            + "\nTargets (issue 8): RL - supervised SI-SDRi = "
            + f"{targets['rl_minus_sup_si_sdri_db']:+.2f} dB (target >= +1.0; best-of-N: {targets['best_of_n_minus_sup_si_sdri_db']:+.2f} dB); "
            + f"share of the IRM oracle's SI-SDRi: supervised {targets['sup_share_of_oracle']:.2f}, RL {targets['rl_share_of_oracle']:.2f}, "
            + f"best-of-N {targets['best_of_n_share_of_oracle']:.2f} (aim >= 0.85).\n\n"
            + f"<details><summary>per class</summary>\n\n{markdown_table(per_class)}\n</details>\n")
    return text, {"overall": overall, "per_class": per_class, "targets": targets, "settings": settings}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Stages and outputs: see the module docstring.")
    parser.add_argument("--work", type=Path, default=Path("bench_work/quality"), help="datasets, runs and results go here")
    parser.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS))
    parser.add_argument("--sup-steps", type=int, default=300)
    parser.add_argument("--rl-steps", type=int, default=40)
    parser.add_argument("--rl-batch", type=int, default=4, help="mixtures per RL step")
    parser.add_argument("--group-size", type=int, default=8, help="G, masks sampled per mixture in RL")
    parser.add_argument("--best-of", type=int, default=8, help="N for the best-of-N system")
    parser.add_argument("--test-mixtures", type=int, default=50, help="the first N fixed test mixtures of each set")
    parser.add_argument("--clap-encoder", default=None, help="encoder for the CLAP score (default: the aligned encoder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sfx-cache", type=Path, default=None, help="debian-sfx: where the .deb files are downloaded and unpacked")
    parser.add_argument("--sfx-debs", type=Path, default=None, help="debian-sfx: a folder that already holds the .deb files")
    args = parser.parse_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    sections, results = [], {}
    for name in args.sets:
        started = time.perf_counter()
        data = build_data(name, work, args.sfx_cache, args.sfx_debs)
        encoder = align(data, work / name / "align", args.seed)
        sup = train_sup(data, encoder, work / name / "sup", args.sup_steps, args.seed)
        rl = train_rl(data, sup, encoder, work / name / "rl", args.rl_steps, args.rl_batch, args.group_size, args.seed)
        log(f"{name}: evaluating on {args.test_mixtures} test mixtures")
        rows = evaluate(data, sup, rl, encoder, args.clap_encoder, args.test_mixtures, args.best_of, work / name / "eval", args.seed)
        settings = {
            "describe": (f"{args.test_mixtures} fixed test mixtures x 2 sources, text queries; supervised {args.sup_steps} steps "
                         f"(batch 8, 2 s window, 0.63 M params), RL {args.rl_steps} steps (batch {args.rl_batch}, G = {args.group_size}), "
                         f"best-of-{args.best_of}; encoder: builtin aligned on the train split (stages 1, 2)."),
            "sup_steps": args.sup_steps, "rl_steps": args.rl_steps, "best_of": args.best_of, "seed": args.seed,
            "wall_minutes": (time.perf_counter() - started) / 60,
        }
        text, results[name] = report(name, rows, settings)
        results[name]["markdown"] = text
        write_json_atomic(work / name / "eval" / "summary.json", results[name])
        # quality.md holds every set evaluated in this work folder (runs of single sets add up)
        for other in SETS:
            summary = work / other / "eval" / "summary.json"
            if other != name and other not in args.sets and summary.is_file():
                results.setdefault(other, json.loads(summary.read_text()))
        sections = [results[s]["markdown"] for s in SETS if s in results and "markdown" in results[s]]
        write_text_atomic(work / "quality.md", "\n".join(sections))
        log(f"{name}: done in {settings['wall_minutes']:.1f} min")
    print("\n".join(sections))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
