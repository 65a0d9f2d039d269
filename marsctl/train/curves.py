"""``curves.png``: the validation metrics of a training run, beside its TensorBoard logs.

Written by the training loop (:mod:`marsctl.train.loop`) after every validation, from the run's
history (the records of ``metrics.jsonl``): one panel per ``val_*`` metric against the step, the
best validation SI-SDRi marked. A look at a run without starting TensorBoard.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Sequence

from marsctl.files import atomic_path

#: panels at most (the first metrics in this order, then the others alphabetically)
MAX_PANELS = 6
#: metrics shown first when present
FIRST = ("val_si_sdri", "val_reward", "val_judge_score", "val_loss")


def validation_series(history: Sequence[dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """``{metric: (steps, values)}`` of every finite ``val_*`` value in ``history`` (flags such as
    ``val_reward_hacking`` left out)."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for record in history:
        for key, value in record.items():
            if not key.startswith("val_") or key == "val_reward_hacking" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                steps, values = series.setdefault(key, ([], []))
                steps.append(int(record["step"]))
                values.append(float(value))
    return series


def write_curves(run_dir: str | Path, history: Sequence[dict[str, Any]]) -> Path | None:
    """Write ``run_dir/curves.png`` (atomically); None, writing nothing, when there is no validation metric yet."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = validation_series(history)
    if not series:
        return None
    names = [m for m in FIRST if m in series] + sorted(m for m in series if m not in FIRST)
    names = names[:MAX_PANELS]
    columns = min(3, len(names))
    rows = math.ceil(len(names) / columns)
    figure = Figure(figsize=(4.2 * columns, 2.8 * rows), dpi=90, layout="constrained")
    FigureCanvasAgg(figure)
    for index, name in enumerate(names):
        axes = figure.add_subplot(rows, columns, index + 1)
        steps, values = series[name]
        axes.plot(steps, values, marker="o", markersize=3, linewidth=1.2)
        if name == "val_si_sdri":
            best = max(range(len(values)), key=values.__getitem__)
            axes.plot([steps[best]], [values[best]], marker="*", markersize=11, color="tab:red", linestyle="none",
                      label=f"best {values[best]:.2f} dB (step {steps[best]})")
            axes.legend(fontsize=8, loc="lower right")
        axes.set_title(name.removeprefix("val_").replace("/", " / "), fontsize=10)
        axes.set_xlabel("step", fontsize=8)
        axes.tick_params(labelsize=8)
        axes.grid(alpha=0.3)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    path = Path(run_dir) / "curves.png"
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return path
