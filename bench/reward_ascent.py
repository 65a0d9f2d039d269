"""Does climbing a reward improve separation? The reward's local ascent test (issue 15, items 1 and 5).

Pathwise RL moves the separator's masks along the gradient of the reward. Before spending an RL
run on a reward encoder, this measures, on held-out test mixtures and without any training, what
that direction does to SI-SDR:

    P          the start separator's mode mask of one source (log-frequency grid), y = iSTFT(P X)
    g_R        = dR(y(P)) / dP             the reward term's gradient in mask space
    g_S        = dSI-SDR(s, y(P)) / dP      the oracle direction (needs the target s)
    agreement  = cos(g_R, g_S)              per source
    ascent     = SI-SDR(y(clamp(P + d g_R / rms(g_R), 0, 1))) - SI-SDR(y(P))   (dB), for step d

A reward whose ascent is negative lowers SI-SDR when it is climbed, whatever its retrieval scores;
rows for a random direction (expected slightly negative: P is near a supervised optimum) and for
g_S itself (the best a first-order step can do) frame the numbers. Every row is a mean over
sources ± its standard error; paired comparisons between encoders are over the same sources.

    python bench/reward_ascent.py --model runs/union-small --data data/union \\
        --encoder aligned=runs/align-union-1200/encoder ranked=runs/align-rank/encoder \\
        --terms semantic_anchor query_similarity --mixtures 64 --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from align_zero_shot import named  # noqa: E402  (bench/: NAME=SPEC arguments, as there)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the start separator (run directory, 'default' or Hub id)")
    parser.add_argument("--data", type=Path, required=True, help="a dataset with test mixtures")
    parser.add_argument("--split", default="test")
    parser.add_argument("--encoder", nargs="+", required=True, metavar="NAME=SPEC", help="reward encoders to test")
    parser.add_argument("--terms", nargs="+", default=["semantic_anchor", "query_similarity"], help="reward terms (registered names)")
    parser.add_argument("--mixtures", type=int, default=64, help="test mixtures (every source of each is a target)")
    parser.add_argument("--steps", type=float, nargs="+", default=[0.01, 0.03], help="mask step sizes d (rms change per bin)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the summary (and per-source values) here")
    args = parser.parse_args()

    import torch

    from marsctl.eval.report import summarize
    from marsctl.metrics.separation import si_sdr
    from marsctl.models.encoders import load_encoder
    from marsctl.separate.api import load_model_and_encoder
    from marsctl.progress import stage_progress
    from marsctl.rl.rewards import REWARD_TERMS, RewardConfig, reward_functions
    from marsctl.rl.rollout import RewardModel
    from marsctl.train.data import fixed_mixtures

    torch.manual_seed(args.seed)
    loaded, query_encoder = load_model_and_encoder(args.model)  # the separator and its own query encoder
    model = loaded.model.eval().requires_grad_(False)
    signal = model.config.signal
    mixtures = fixed_mixtures(args.data, args.split, signal, args.mixtures)
    if not mixtures:
        raise SystemExit(f"{args.data}: no {args.split} mixtures")
    reward_models = {}
    for name, spec in named(args.encoder).items():
        encoder = load_encoder(spec)
        for term in args.terms:
            if term not in REWARD_TERMS:
                raise SystemExit(f"unknown reward term {term!r}; registered: {', '.join(REWARD_TERMS)}")
            weights = {other: 0.0 for other in REWARD_TERMS} | {term: 1.0}
            reward_models[(name, term)] = RewardModel(encoder, reward_functions(RewardConfig(weights=weights)), signal,
                                                      same_space_as_queries=False)

    def sdr(target: torch.Tensor, mask: torch.Tensor, stft: torch.Tensor) -> torch.Tensor:
        return si_sdr(target, model.synthesize(mask, stft, target.shape[-1])).float()

    rows: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        rows.setdefault(key, []).append(value)

    sources = sum(len(m.labels) for m in mixtures)
    with stage_progress(f"ascent test on {sources} {args.split} sources", sources) as advance:
        for fixed in mixtures:
            mixture = torch.from_numpy(fixed.mixture)[None]
            stft, _, log_magnitude = model.analyze(mixture)
            features = model.features(log_magnitude)
            for index, label in enumerate(fixed.labels):
                target = torch.from_numpy(fixed.sources[index])[None]
                query = query_encoder.embed_text([label]).float()
                mode = model.policy(model.logits(features, query)).decode("mode").detach()  # P [1, F, frames]
                base = float(sdr(target, mode, stft))
                mask = mode.clone().requires_grad_(True)
                (oracle,) = torch.autograd.grad(sdr(target, mask, stft).sum(), mask)  # g_S
                directions = {"oracle (SI-SDR)": oracle, "random": torch.randn_like(mode)}
                for (name, term), reward_model in reward_models.items():
                    mask = mode.clone().requires_grad_(True)
                    estimate = model.synthesize(mask, stft, mixture.shape[-1])
                    total, _, _ = reward_model.score(estimate[None], mixture, [label], None, target, differentiable=True)
                    (gradient,) = torch.autograd.grad(total.sum(), mask)  # g_R
                    directions[f"{name}: {term}"] = gradient
                for key, direction in directions.items():
                    add(f"{key} | agreement", float(torch.nn.functional.cosine_similarity(direction.flatten(), oracle.flatten(), dim=0)))
                    unit = direction / (direction.pow(2).mean().sqrt() + 1e-12)
                    for step in args.steps:
                        add(f"{key} | ascent d={step:g}", float(sdr(target, (mode + step * unit).clamp(0, 1), stft)) - base)
                advance()

    summary = {key: dataclasses.asdict(summarize(values)) for key, values in rows.items()}
    names = sorted({key.split(" | ")[0] for key in rows}, key=lambda k: (k != "oracle (SI-SDR)", k == "random", k))
    columns = ["agreement"] + [f"ascent d={step:g}" for step in args.steps]
    print(f"\n{sources} sources of {len(mixtures)} {args.split} mixtures; start {args.model}")
    print("| direction | " + " | ".join(c.replace("ascent", "SI-SDR change (dB),") for c in columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for name in names:
        cells = []
        for column in columns:
            s = summary[f"{name} | {column}"]
            cells.append(f"{s['mean']:+.3f} ± {s['standard_error']:.3f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": args.model, "data": str(args.data), "split": args.split, "sources": sources,
                                         "summary": summary, "values": rows}, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
