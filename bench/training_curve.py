"""Validation SI-SDRi against training time for one or more `marsctl train sup` runs (the scaling curve and
the campaign's learning curve, BENCHMARKS.md section 13).

    python bench/training_curve.py runs/scaling-small runs/scaling-mid runs/scaling-paper \
        [--offset-hours 0] [--json out.json] [--png out.png]

Time is the sum of the logged training-step seconds (``step_time_s`` × steps per log window, from
``metrics.jsonl``): the CPU time of the optimizer steps on the run's core, without validation and start-up.
A run resumed across sessions keeps one ``metrics.jsonl``, so its curve accumulates. ``--offset-hours``
adds the hours a warm start had before the run (one value for every run).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def curve(run_dir: Path, offset_hours: float = 0.0) -> dict:
    """``{"run", "params", "points": [{"step", "hours", "val_si_sdri"}], "seconds_per_step"}`` of one run."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    seconds, last_step, points, timed = 0.0, 0, [], []
    for row in sorted(rows, key=lambda r: r["step"]):
        if row["step"] <= last_step and "val_si_sdri" not in row:
            continue  # a resumed run may log a window twice; count its time once
        if "step_time_s" in row and row["step"] > last_step:
            seconds += row["step_time_s"] * (row["step"] - last_step)
            timed.append(row["step_time_s"])
            last_step = row["step"]
        if "val_si_sdri" in row:
            points.append({"step": row["step"], "hours": offset_hours + seconds / 3600, "val_si_sdri": row["val_si_sdri"]})
    config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").is_file() else {}
    params = None
    if (run_dir / "model.safetensors").is_file():
        from safetensors.torch import load_file

        weights = load_file(str(run_dir / "model.safetensors"))
        params = sum(t.numel() for k, t in weights.items() if "running_" not in k and "num_batches" not in k)
    return {"run": str(run_dir), "params": params, "architecture": config.get("architecture") or config.get("model", {}),
            "seconds_per_step": sorted(timed)[len(timed) // 2] if timed else None, "points": points}


def markdown(curves: list[dict]) -> str:
    lines = ["| run | params (M) | s/step (median) | step | hours | val SI-SDRi (dB) |", "|---|---:|---:|---:|---:|---:|"]
    for c in curves:
        for p in c["points"]:
            lines.append(f"| {Path(c['run']).name} | {c['params'] / 1e6 if c['params'] else float('nan'):.2f} | "
                         f"{c['seconds_per_step'] or float('nan'):.2f} | {p['step']} | {p['hours']:.3f} | {p['val_si_sdri']:.2f} |")
    return "\n".join(lines)


def plot(curves: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for c in curves:
        label = f"{Path(c['run']).name} ({c['params'] / 1e6:.2f} M)" if c["params"] else Path(c["run"]).name
        axes.plot([p["hours"] for p in c["points"]], [p["val_si_sdri"] for p in c["points"]], marker="o", label=label)
    axes.set_xlabel("training-step CPU hours (one core)")
    axes.set_ylabel("validation SI-SDRi (dB)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--offset-hours", type=float, default=0.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--png", type=Path)
    args = parser.parse_args()
    curves = [curve(run, args.offset_hours) for run in args.runs]
    print(markdown(curves))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(curves, indent=2))
    if args.png:
        args.png.parent.mkdir(parents=True, exist_ok=True)
        plot(curves, args.png)


if __name__ == "__main__":
    main()
