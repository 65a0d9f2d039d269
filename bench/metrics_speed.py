"""Speed of marsctl's BSS-Eval against mir_eval (the reference), fast_bss_eval and museval.

200 four-second two-source examples at 16 kHz (the issue's setting), scored by each
implementation in the same process; reports seconds, speed-up over mir_eval and the
largest difference from mir_eval's numbers. Then the multi-system case: three systems
scored against the same references (marsctl shares the reference work).

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python bench/metrics_speed.py [--examples 30 50 200] [--repeats 5] [--only-mir-eval]

Single-threaded on purpose: the comparison is per core, and BLAS threads fighting over
shared cores slow mir_eval down by up to 7x, which would flatter marsctl. marsctl's compiled
Levinson kernels are loaded once before the timing (a one-off cost per process, ~1 s). Each
row times mir_eval and marsctl ``--repeats`` times, interleaved (alternating which goes
first), and reports the median of the per-repeat ratios, so that load from other jobs on a
shared machine hits both sides of a ratio alike.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
import warnings

import numpy as np
import torch


def make_examples(n: int, seconds: float = 4.0, sr: int = 16_000, seed: int = 0):
    """Varied two-source examples: noise-like and tonal references, estimates with leakage and noise."""
    rng = np.random.default_rng(seed)
    T = int(seconds * sr)
    t = np.arange(T) / sr
    refs = np.empty((n, 2, T))
    for i in range(n):
        refs[i, 0] = np.convolve(rng.standard_normal(T), rng.standard_normal(16), "same")
        f0 = rng.uniform(100, 800)
        refs[i, 1] = sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6.28)) / k for k in range(1, 6))
        refs[i, 1] *= 1 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.5, 3) * t)
    leak = rng.uniform(0.05, 0.5, size=(n, 1, 1))
    ests = refs + leak * refs[:, ::-1] + rng.uniform(0.01, 0.3) * rng.standard_normal(refs.shape)
    return refs, ests


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def measure(n_examples: int, args) -> dict:
    """One row: marsctl against mir_eval on ``n_examples`` examples, ``args.repeats`` interleaved repeats."""
    import fast_bss_eval
    import mir_eval
    import museval

    from marsctl.metrics.separation import BssEvalReferences

    refs, ests = make_examples(n_examples)
    n = len(refs)

    def run_mir(e):
        return np.array([mir_eval.separation.bss_eval_sources(refs[i], e[i], compute_permutation=False)[:3] for i in range(n)])

    def run_ours():
        return BssEvalReferences(torch.from_numpy(refs)).score(torch.from_numpy(ests))

    BssEvalReferences(torch.from_numpy(refs[:1])).score(torch.from_numpy(ests[:1]))  # compile/load numba outside the timing
    # Interleaved: each repeat times both, in alternating order, so that a change in the machine's
    # load hits both sides of a ratio alike; the row reports the median of the per-repeat ratios.
    mir_times, our_times = [], []
    mir = ours = None
    for repeat in range(args.repeats):
        if repeat % 2 == 0:
            t_mir, mir = timed(lambda: run_mir(ests))
            t_ours, ours = timed(run_ours)
        else:
            t_ours, ours = timed(run_ours)
            t_mir, mir = timed(lambda: run_mir(ests))
        mir_times.append(t_mir)
        our_times.append(t_ours)
    ratios = [m / o for m, o in zip(mir_times, our_times)]

    t_fbe = t_mus = math.nan
    fbe = None
    if not args.only_mir_eval:
        t_fbe, fbe = timed(
            lambda: fast_bss_eval.bss_eval_sources(torch.from_numpy(refs), torch.from_numpy(ests), compute_permutation=False)
        )
        t_mus, _ = timed(
            lambda: [museval.metrics.bss_eval(refs[i][..., None], ests[i][..., None], window=np.inf, bsseval_sources_version=True) for i in range(n)]
        )

    diff = lambda a, b: float(np.abs(a - b).max())
    ours_arr = np.stack([ours.sdr.numpy(), ours.sir.numpy(), ours.sar.numpy()], axis=1)
    fbe_arr = np.stack([x.numpy() for x in fbe[:3]], axis=1) if fbe is not None else None

    result = {
        "examples": n,
        "repeats": args.repeats,
        "seconds": {"mir_eval": mir_times, "marsctl": our_times, "fast_bss_eval": t_fbe, "museval": t_mus},
        "speedup_vs_mir_eval": {
            "marsctl_median": float(np.median(ratios)),
            "marsctl_each_repeat": ratios,
            "fast_bss_eval": t_mir / t_fbe,
            "museval": t_mir / t_mus,
        },
        "max_abs_diff_db_vs_mir_eval": {"marsctl": diff(mir, ours_arr), "fast_bss_eval": diff(mir, fbe_arr) if fbe_arr is not None else None},
    }
    if args.systems > 0:  # several systems on the same references (marsctl shares the reference work), once
        rng = np.random.default_rng(1)
        systems = [ests + s * 0.05 * rng.standard_normal(ests.shape) for s in range(args.systems)]
        t_mir_multi, mir_multi = timed(lambda: [run_mir(e) for e in systems])
        t_ours_multi, ours_multi = timed(
            lambda: BssEvalReferences(torch.from_numpy(refs)).score_many([torch.from_numpy(e) for e in systems])
        )
        result["speedup_vs_mir_eval"][f"marsctl_{args.systems}_systems"] = t_mir_multi / t_ours_multi
        result["max_abs_diff_db_vs_mir_eval"][f"marsctl_{args.systems}_systems_sdr"] = max(
            diff(m[:, 0], o.sdr.numpy()) for m, o in zip(mir_multi, ours_multi)
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, nargs="+", default=[200], help="numbers of examples, one row each")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved mir_eval / marsctl timings per row (median ratio)")
    parser.add_argument("--systems", type=int, default=3, help="systems scored on the same references (0: skip)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--only-mir-eval", action="store_true", help="compare with mir_eval only (skip fast_bss_eval and museval)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
        "threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg()[0],
        "rows": [],
    }
    for n in args.examples:
        row = measure(n, args)
        result["rows"].append(row)
        speed = row["speedup_vs_mir_eval"]
        print(
            f"{n:5d} examples: marsctl {speed['marsctl_median']:.1f}x mir_eval (median of {args.repeats}; "
            f"{min(speed['marsctl_each_repeat']):.1f}-{max(speed['marsctl_each_repeat']):.1f}x), "
            f"max |diff| {row['max_abs_diff_db_vs_mir_eval']['marsctl']:.1e} dB",
            flush=True,
        )
    result["load_average_at_end"] = os.getloadavg()[0]
    print(json.dumps(result, indent=2))
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(result, fh, indent=2)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
