"""Separation at the model's training level (``separate``'s default, :func:`marsctl.separate.apply.mixture_level_gain`)
against separation at each mixture's own level (``--raw-level``), paired per source on a dataset's fixed mixtures.


"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch


def main() -> None:
    from marsctl.eval.model import evaluate_separator
    from marsctl.eval.report import summarize
    from marsctl.models.encoders import load_encoder
    from marsctl.models.separator import load_separator
    from marsctl.separate.apply import SeparateOptions

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path)
    parser.add_argument("--model", default="default")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    from marsctl.pretrained import DEFAULT_SEPARATOR_DIR

    model = load_separator(DEFAULT_SEPARATOR_DIR if args.model == "default" else args.model)
    encoder = load_encoder(model.encoder)
    scores = {}
    for name, normalize in (("normalized", True), ("raw", False)):
        rows = evaluate_separator(model, encoder, args.data, ("text",), split=args.split, limit=args.limit, references=False,
                                  options=SeparateOptions(normalize_level=normalize))
        scores[name] = {(r["mixture_id"], r["source"]): r["si_sdri"] for r in rows if r["system"] == "model"}
    keys = sorted(set(scores["normalized"]) & set(scores["raw"]))
    result = {"data": str(args.data), "split": args.split, "model": args.model, "sources": len(keys)}
    for name in ("normalized", "raw"):
        summary = summarize([scores[name][k] for k in keys])
        result[name] = {"mean": summary.mean, "se": summary.standard_error}
    differences = [scores["normalized"][k] - scores["raw"][k] for k in keys]
    summary = summarize(differences)
    result["normalized_minus_raw"] = {"mean": summary.mean, "se": summary.standard_error,
                                      "better_fraction": sum(d > 0 for d in differences) / len(differences)}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
