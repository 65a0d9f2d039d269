"""Live separation (issue 30): quality against latency beside offline, and per-hop compute.

    OMP_NUM_THREADS=1 taskset -c 0 .venv/bin/python bench/stream_latency.py --data data/union --limit 100 \\
        --out bench/results/2026-12-07-cpu-s8/stream_latency.json

**Quality.** On the first ``--limit`` fixed test mixtures of the dataset, each source is separated
with its label as text query (the query vectors of ``marsctl eval``), by

* ``offline``: :meth:`marsctl.Separator.separate_queries` with the default options (what
  ``marsctl separate`` and ``marsctl eval`` do: 2.05 s chunks, overlap 0.25);
* the live separation (:class:`marsctl.separate.stream.LiveSeparation`, the engine of
  ``Separator.stream`` and ``marsctl separate --stream``, one hop at a time) at every *delay*
  d = 1, 2, ... window/hop hops: the estimate written d after the sound arrived. The first
  estimate at ``--latency L`` is the delay L; the refined estimate E hops later is the delay
  L + E * hop (the same windows merged); from d = window on it is final, the default refined
  stream and the stream's own offline result (2 s windows every hop).

Every delay runs the same windows, so the separator's output of each
window is computed once and reused (keyed by the window's samples); the engine, its merging and
its timing are otherwise the ones the command runs. Reported: SI-SDRi mean +- SE per variant and
the paired difference to ``offline`` (same sources) with its SE.

**Compute.** One query, hop-sized blocks of ``--timing-seconds`` of the test mixtures end to end,
through :meth:`marsctl.Separator.stream` as the command runs it, with no reuse: per-hop wall-clock
and CPU time (worst, 99th percentile, mean), hops slower than a hop, and the real-time factor (CPU
seconds per second of audio). Run it on a reserved core (``taskset``): the wall clock counts
whatever else runs on that core, the CPU time does not.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from marsctl.eval.model import load_test_mixtures  # noqa: E402
from marsctl.eval.report import summarize  # noqa: E402
from marsctl.files import write_json_atomic  # noqa: E402
from marsctl.metrics.separation import si_sdr_improvement  # noqa: E402
from marsctl.queries import QueryBuilder  # noqa: E402
from marsctl.separate import Separator  # noqa: E402
from marsctl.separate.stream import LiveSeparation, stream_settings  # noqa: E402

def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def summary(values) -> dict:
    s = summarize(values)
    return {"mean": s.mean, "se": s.standard_error, "n": s.count}


class ReusedWindows:
    """The separator on one window ``[1, window] -> [1, K, window]``, computed once per distinct window."""

    def __init__(self, model, queries: torch.Tensor):
        self.model, self.queries, self.cache, self.passes = model, queries, {}, 0

    @torch.no_grad()
    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        key = hashlib.sha1(windows.numpy().tobytes()).hexdigest()
        if key not in self.cache:
            self.passes += 1
            q = self.queries.unsqueeze(0).expand(windows.shape[0], -1, -1)
            self.cache[key] = self.model.separate(windows, q, decode="mode")
        return self.cache[key]


def live(process, settings, outputs: int, sample_rate: int, wave: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    engine = LiveSeparation(process, settings, outputs, sample_rate)
    current, refined = [], []
    for start in range(0, wave.shape[0], settings.hop):  # a live input: one hop at a time
        c, r = engine.push(wave[start : start + settings.hop])
        current.append(c)
        refined.append(r)
    c, r = engine.finish()
    return torch.cat(current + [c], dim=-1), torch.cat(refined + [r], dim=-1)


def quality(separator: Separator, args, partial=None) -> dict:
    """SI-SDRi by delay (seconds from a sample's arrival to the estimate written): the first estimate
    at latency L is the delay L, the refined one E hops later the delay L + E * hop, and once the
    delay reaches the window every window is in (the refined default)."""
    model = separator.loaded.model
    signal = model.config.signal
    mixtures = load_test_mixtures(args.data, "test", args.limit)
    queries = QueryBuilder(separator.encoder, Path(args.data), signal.sample_rate, split="test")
    full = stream_settings(signal.sample_rate, signal.segment_samples, hop=args.hop, latency=args.hop)
    delays = [d * full.hop for d in range(1, full.window // full.hop + 1)]
    scores: dict[str, list[float]] = {}

    def add(name: str, estimates: torch.Tensor, mix) -> None:
        values = si_sdr_improvement(torch.from_numpy(mix.sources), estimates, torch.from_numpy(mix.mixture))
        scores.setdefault(name, []).extend(float(v) for v in values)

    def table() -> dict:
        base = scores["offline"]
        rows = {name: {"si_sdri": summary(values), "minus_offline": summary([v - b for v, b in zip(values, base)])}
                for name, values in scores.items()}
        return {"mixtures": done, "sources": len(base), "window_s": full.window / signal.sample_rate, "by_delay": rows}

    started, passes, done = time.monotonic(), 0, 0
    for mix in mixtures:
        wave = torch.from_numpy(mix.mixture)
        vectors = torch.stack([queries.source("text", label, clip, frames) for label, clip, frames in zip(mix.labels, mix.clip_ids, mix.frame_paths)])
        add("offline", _offline(separator, wave, vectors), mix)
        process = ReusedWindows(model, vectors)
        for delay in delays:
            settings = stream_settings(signal.sample_rate, signal.segment_samples, latency=delay / signal.sample_rate, hop=args.hop, refine_hops=0)
            current, _ = live(process, settings, len(mix.labels), signal.sample_rate, wave)
            add(f"{delay / signal.sample_rate:g} s", current, mix)
        passes += process.passes
        done += 1
        if done % 10 == 0 or done == len(mixtures):
            log(f"{done}/{len(mixtures)} mixtures, {time.monotonic() - started:.0f} s, {passes} separator passes")
            if partial is not None:
                partial(table())
    return table()


def _offline(separator: Separator, wave: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    from marsctl.separate import separate_waveform

    return separate_waveform(separator.loaded.model, wave, vectors, separator.options)


def compute(separator: Separator, args) -> dict:
    signal = separator.loaded.model.config.signal
    mixtures = load_test_mixtures(args.data, "test", math.ceil(args.timing_seconds / 4) + 1)
    wave = torch.from_numpy(np.concatenate([m.mixture for m in mixtures])[: int(args.timing_seconds * signal.sample_rate)])
    label = mixtures[0].labels[0]
    stream = separator.stream(query=label, latency=args.timing_latency, hop=args.hop)
    hop = stream.settings.hop
    walls, cpus = [], []
    for start in range(0, wave.shape[0], hop):
        before = (stream.timing.total, stream.timing.cpu_total, stream.timing.hops)
        stream.push(wave[start : start + hop])
        if stream.timing.hops > before[2]:
            walls.append(stream.timing.total - before[0])
            cpus.append(stream.timing.cpu_total - before[1])
    stream.finish()
    seconds = wave.shape[0] / signal.sample_rate
    hop_s = hop / signal.sample_rate

    def stats(values: list[float]) -> dict:
        return {"worst_ms": 1000 * max(values), "p99_ms": 1000 * float(np.percentile(values, 99)), "mean_ms": 1000 * float(np.mean(values))}

    return {
        "audio_seconds": seconds, "hop_ms": 1000 * hop_s, "latency_s": args.timing_latency, "query": label, "hops": len(walls),
        "wall": stats(walls), "cpu": stats(cpus), "hops_over_hop_length_wall": int(sum(w > hop_s for w in walls)),
        "hops_over_hop_length_cpu": int(sum(c > hop_s for c in cpus)),
        "real_time_factor_cpu": sum(cpus) / seconds, "real_time_factor_wall": sum(walls) / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "union")
    parser.add_argument("--model", default="default")
    parser.add_argument("--limit", type=int, default=None, help="first N test mixtures (default: all)")
    parser.add_argument("--hop", type=float, default=0.25)
    parser.add_argument("--timing-seconds", type=float, default=60.0)
    parser.add_argument("--timing-latency", type=float, default=0.5)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    separator = Separator.from_pretrained(args.model, device="cpu")
    result = {
        "model": str(separator.directory), "data": str(args.data), "hop_s": args.hop,
        "machine": {"torch_threads": torch.get_num_threads(), "cpu_affinity": sorted(os.sched_getaffinity(0)),
                    "processor": platform.processor() or platform.machine(), "load_average_at_start": os.getloadavg()},
    }
    log("compute: live run")
    result["compute"] = compute(separator, args)
    log(f"compute: {result['compute']}")
    write_json_atomic(args.out, result)

    def partial(table: dict) -> None:  # a stopped run still leaves the mixtures done so far (and says how many)
        result["quality"] = table
        result["machine"]["load_average_at_end"] = os.getloadavg()
        write_json_atomic(args.out, result)

    if not args.skip_quality:
        partial(quality(separator, args, partial))
    for name, row in result.get("quality", {}).get("by_delay", {}).items():
        s, d = row["si_sdri"], row["minus_offline"]
        log(f"{name:10s} SI-SDRi {s['mean']:6.2f} +- {s['se'] or 0:.2f}   vs offline {d['mean']:+6.2f} +- {d['se'] or 0:.2f}  (n={s['n']})")


if __name__ == "__main__":
    main()
