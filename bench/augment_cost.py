"""What each training-mixture augmentation costs (issue 25, item 2): items/s of DynamicMixDataset with
each augmentation on alone, all of a recipe's on, and none, in one process, as ratios to none.

The variants are timed in interleaved rounds (every variant once per round, in a seeded random order)
over the same item indices, so a change in the machine's load falls on every variant alike; the ratio of each variant's
total time to none's is the figure. The room bank is simulated (or read from the cache) before the
timing; its build time is reported apart (``--fresh-cache`` simulates it in a temporary folder).

    taskset -c 0 nice -n 5 python bench/augment_cost.py --data data/union \\
        --recipe bench/recipes/union-campaign-augment.yaml --items 16 --rounds 16 --json bench/results/2026-12-07-cpu-s8/augment_cost.json
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from marsctl.files import write_json_atomic


def variants(augment):
    """name -> AugmentConfig: none, each augmentation alone at probability 1 (the recipe's other
    settings), the SNR range alone, and the recipe's own section."""
    from marsctl.data.augment import AugmentConfig

    out = {"none": AugmentConfig()}
    for name in ("room", "eq", "gain", "shift"):
        section = dataclasses.replace(getattr(augment, name), probability=1.0)
        out[name] = AugmentConfig(**{name: section})
    out["snr"] = AugmentConfig(snr_db_range=augment.snr_db_range or (-10.0, 10.0))
    out["recipe"] = augment
    return out


def spread(values) -> list[float]:
    """[min, mean, max] of the finite values (pyroomacoustics cannot measure every RIR's RT60)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return [float(values.min()), float(values.mean()), float(values.max())] if len(values) else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a dataset with a train split")
    parser.add_argument("--recipe", default="bench/recipes/union-campaign-augment.yaml", help="train sup recipe: signal and augment settings")
    parser.add_argument("--items", type=int, default=64, help="items per variant and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fresh-cache", action="store_true", help="simulate the room bank in a temporary cache folder")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    if args.fresh_cache:
        os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="augment-cost-")
    from marsctl.data.mixing import DynamicMixDataset
    from marsctl.train.supervised import load_supervised_config

    config = load_supervised_config(args.recipe)
    built, datasets = {}, {}
    DynamicMixDataset(args.data, "train", config.signal, config.num_sources, seed=config.seed)  # imports and file caches, untimed
    for name, augment in variants(config.augment).items():
        start = time.perf_counter()
        datasets[name] = DynamicMixDataset(args.data, "train", config.signal, config.num_sources, seed=config.seed, augment=augment)
        built[name] = time.perf_counter() - start
    bank = datasets["room"].augment.bank
    for ds in datasets.values():  # clip lengths are cached per dataset: read them once, untimed
        for i in range(min(args.items, len(ds))):
            ds[i]
    seconds = {name: 0.0 for name in datasets}
    order = np.random.default_rng(0)
    for _ in range(args.rounds):
        for name in order.permutation(list(datasets)):  # a new order each round: no variant always follows another
            ds = datasets[name]
            start = time.perf_counter()
            for i in range(min(args.items, len(ds))):
                ds[i]
            seconds[name] += time.perf_counter() - start
    count = args.rounds * min(args.items, len(datasets["none"]))
    rows = {name: {"items_per_s": count / s, "time_ratio_to_none": s / seconds["none"]} for name, s in seconds.items()}
    result = {
        "data": str(args.data), "recipe": str(args.recipe), "segment_samples": config.signal.segment_samples,
        "sample_rate": config.signal.sample_rate, "items_timed_per_variant": count, "rounds": args.rounds,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, affinity {sorted(os.sched_getaffinity(0))}",
        # the room variant's dataset build less the plain one's: the bank's simulation or cache read
        "room_bank": {"size": int(len(bank.lengths)), "from_cache": bank.from_cache,
                      "seconds_to_load_or_simulate": max(0.0, built["room"] - built["none"]),
                      "rir_seconds_max": float(bank.lengths.max()) / config.signal.sample_rate,
                      "rt60_target_s": spread(bank.rt60_target), "rt60_measured_s": spread(bank.rt60_measured),
                      "rt60_unmeasured": int(np.isnan(bank.rt60_measured).sum())},
        "variants": rows,
    }
    print(f"{'variant':8} {'items/s':>9} {'time / none':>12}")
    for name, row in rows.items():
        print(f"{name:8} {row['items_per_s']:9.1f} {row['time_ratio_to_none']:12.2f}")
    rb = result["room_bank"]
    print(f"room bank: {rb['size']} RIRs, {'read from the cache' if rb['from_cache'] else 'simulated'} in "
          f"{rb['seconds_to_load_or_simulate']:.1f} s; RT60 target {rb['rt60_target_s'][0]:.2f}..{rb['rt60_target_s'][2]:.2f} s "
          f"(mean {rb['rt60_target_s'][1]:.2f}), measured {rb['rt60_measured_s']} s, {rb['rt60_unmeasured']} not measurable")
    if args.json:
        write_json_atomic(args.json, result)


if __name__ == "__main__":
    main()
