"""Zero-shot classification of a separator's estimates by aligned encoders (issue 15, item 1).

``marsctl align --separator`` reports these rows after every stage of a new run; this script
scores encoders that are already aligned (the start, each stage's best checkpoint, a judge), on
the same held-out clips and seeded two-class mixtures as ``marsctl align``'s report split, with
one or more separators. Each separator separates the mixtures once (queried with the class
text); every encoder then classifies targets, mixtures and estimates over the held-out classes'
texts (``marsctl.align.metrics``).

    python bench/align_zero_shot.py --data data/union --recipe union \\
        --encoder before=builtin stage1=runs/align-union/stage1/best stage2=runs/align-union/stage2/best \\
        --separator new=default old=runs/previous-default --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def named(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, _, spec = item.partition("=")
        if not spec:
            raise SystemExit(f"{item!r}: give NAME=SPEC")
        out[name] = spec
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the dataset the encoders were aligned on")
    parser.add_argument("--recipe", default="union", help="the align recipe whose eval settings (split, seconds, clips, seed) to use")
    parser.add_argument("--encoder", nargs="+", required=True, metavar="NAME=SPEC", help="encoders: 'builtin' or a saved directory")
    parser.add_argument("--separator", nargs="+", required=True, metavar="NAME=SPEC", help="separators: 'default' or a run directory")
    parser.add_argument("--json", type=Path, help="write every metric here")
    args = parser.parse_args()

    import torch

    from marsctl.align.config import load_align_config
    from marsctl.align.data import HeldOut, read_clips
    from marsctl.align.metrics import evaluate_alignment, separate_heldout_mixtures
    from marsctl.align.trainer import DATA_SAMPLE_RATE
    from marsctl.models.encoders import AnchorFusion, load_encoder
    from marsctl.progress import stage_progress

    config = load_align_config(args.recipe)
    ev = config.eval
    heldout = HeldOut.load(read_clips(args.data), ev.report_split, DATA_SAMPLE_RATE, ev.max_seconds, ev.max_clips, config.seed)
    print(f"{len(heldout)} {heldout.split} clips, {len({c.label for c in heldout.clips})} classes")
    estimates = {}
    for name, spec in named(args.separator).items():
        with stage_progress(f"separating with {name}", len(heldout)) as advance:
            estimates[name] = separate_heldout_mixtures(spec, heldout, DATA_SAMPLE_RATE, config.seed, advance=advance)
    results: dict[str, dict[str, dict]] = {}
    for enc_name, spec in named(args.encoder).items():
        encoder = load_encoder(spec)
        if encoder.anchor_fusion is None:  # as marsctl align does for its "before" column
            torch.manual_seed(config.seed)
            encoder.anchor_fusion = AnchorFusion(encoder.embedding_dim, config.anchor_rank)
        results[enc_name] = {sep: evaluate_alignment(encoder, heldout, DATA_SAMPLE_RATE, ev.batch_size, config.seed, est)
                             for sep, est in estimates.items()}

    n = len(heldout)
    binomial_se = lambda p: math.sqrt(p * (1 - p) / n)  # noqa: E731
    print(f"\n| encoder | t->a R@1 | a->t R@1 | target acc | mixture acc | separator | estimate acc | estimate - mixture | gap (text, estimate) |")
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|")
    for enc_name, by_separator in results.items():
        for sep, m in by_separator.items():
            print(f"| {enc_name} | {m['text_to_audio_R@1']:.3f} | {m['audio_to_text_R@1']:.3f} | "
                  f"{m['zero_shot_target_acc']:.3f} ± {binomial_se(m['zero_shot_target_acc']):.3f} | "
                  f"{m['zero_shot_mixture_acc']:.3f} ± {binomial_se(m['zero_shot_mixture_acc']):.3f} | {sep} | "
                  f"{m['zero_shot_estimate_acc']:.3f} ± {binomial_se(m['zero_shot_estimate_acc']):.3f} | "
                  f"{m['zero_shot_estimate_minus_mixture']:+.3f} ± {m['zero_shot_estimate_minus_mixture_se']:.3f} | "
                  f"{m['gap_text_estimate']:+.4f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"data": str(args.data), "clips": n, "split": heldout.split, "results": results}, indent=1))


if __name__ == "__main__":
    main()
