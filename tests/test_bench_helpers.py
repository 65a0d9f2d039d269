"""Smoke tests of the benchmark helpers (bench/speed.py, bench/quality.py); the benchmarks
themselves are not run here. (The Debian sound-effect preparation that lived here is now the
``debian`` source kind: tests/test_data_debian.py.)"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


speed = _load("speed")


def test_speed_test_signal_is_deterministic_and_not_silent():
    a, b = speed.test_signal(2.0), speed.test_signal(2.0)
    assert a.dtype == np.float32 and len(a) == 2 * 16_000
    np.testing.assert_array_equal(a, b)
    assert 0.05 < np.sqrt(np.mean(a.astype(np.float64) ** 2)) < 0.5


def test_quality_report_gaps_and_oracle_shares_come_from_the_rows():
    quality = _load("quality")
    si_sdri = {"mixture": 0.0, "oracle-irm": 10.0, "supervised": 4.0, "rl": 5.5, "rl best-of-N": 6.0}
    rows = []
    for system, value in si_sdri.items():
        for n, label in enumerate(["fire", "rain", "fire", "rain"]):
            rows.append({"system": system, "query_modality": "-" if system in ("mixture", "oracle-irm") else "text",
                         "mixture_id": f"m{n // 2}", "source": n % 2, "label": label,
                         "sdr": value, "sir": value + 1, "sar": None if system == "mixture" else 20.0,
                         "si_sdr": value, "si_sdri": value + (0.5 if label == "fire" else -0.5),
                         "stft_distance": 0.1, "clap_score": 10.0})
    text, summary = quality.report("toy", rows, {"describe": "toy rows"})
    targets = summary["targets"]
    assert targets["rl_minus_sup_si_sdri_db"] == pytest.approx(1.5)
    assert targets["best_of_n_minus_sup_si_sdri_db"] == pytest.approx(2.0)
    assert targets["sup_share_of_oracle"] == pytest.approx(0.4)
    assert targets["rl_share_of_oracle"] == pytest.approx(0.55)
    assert [e["system"] for e in summary["overall"]] == list(quality.SYSTEMS)
    fire_rl = next(e for e in summary["per_class"] if e["label"] == "fire" and e["system"] == "rl")
    assert fire_rl["si_sdri_mean"] == pytest.approx(6.0) and fire_rl["n"] == 2
    assert "+1.50 dB" in text and "### toy" in text


def test_union_breakdown_groups_and_pairs_sources(tmp_path):
    """bench/union_breakdown.py: per pair kind and soundfont, mean ± SE of the per-source values."""
    breakdown = _load("union_breakdown")
    groups = {("m1", "violin"): {"pair_kind": "instruments", "family": "instruments", "soundfont": "opl3"},
              ("m1", "flute"): {"pair_kind": "instruments", "family": "instruments", "soundfont": "fluidr3"},
              ("m2", "rain"): {"pair_kind": "everyday", "family": "everyday", "soundfont": ""},
              ("m2", "thunder"): {"pair_kind": "everyday", "family": "everyday", "soundfont": ""}}
    values = {("m1", "violin"): 4.0, ("m1", "flute"): 2.0, ("m2", "rain"): -1.0, ("m2", "thunder"): 1.0,
              ("m3", "unknown"): 99.0}  # not in the dataset's groups: left out
    table = breakdown.breakdown(values, groups)
    assert list(table)[0] == "all" and table["all"][0] == pytest.approx(1.5) and table["all"][2] == 4
    assert table["pairs: instruments"][:1] == (3.0,) and table["pairs: everyday"][0] == pytest.approx(0.0)
    assert table["pairs: everyday"][1] == pytest.approx(1.0)  # SE of (-1, 1): std sqrt(2) / sqrt(2)
    assert table["soundfont: opl3"][0] == 4.0 and "soundfont: " not in table
    csv = tmp_path / "scores.csv"
    csv.write_text("mixture,source,class,query_modality,system,si_sdri\nm1,violin,violin,text,model (text query),4.0\n"
                   "m1,violin,violin,-,mixture,0\n")
    rows = breakdown.read_rows(csv, "si_sdri")
    assert rows["model (text query)"] == {("m1", "violin"): 4.0} and rows["mixture"] == {("m1", "violin"): 0.0}


def test_rl_seed_summary_pools_per_source_and_spreads_between_seeds(tmp_path):
    """bench/rl_seed_summary.py on two toy seed runs: per-seed, pooled and between-seed numbers by hand."""
    seeds = _load("rl_seed_summary")
    start = [0.0, 1.0, 2.0, 3.0]

    def write(run, name, values):
        folder = tmp_path / run / f"eval-{name}"
        folder.mkdir(parents=True)
        lines = ["mixture,source,class,system,si_sdri"]
        lines += [f"m{i // 2},{i % 2},dog,model (text query),{v}" for i, v in enumerate(values)]
        lines += [f"m{i // 2},{i % 2},dog,mixture,0.0" for i in range(len(values))]  # other systems are ignored
        (folder / "scores.csv").write_text("\n".join(lines) + "\n")

    for run, gains in (("seed0", [1.0, 1.0, 1.0, 1.0]), ("seed1", [0.0, 2.0, 0.0, 2.0])):
        write(run, "start", start)
        write(run, "anchor", [s + g for s, g in zip(start, gains)])
    write("seed0", "sisdr", [s + 0.5 for s in start])  # only one seed ran sisdr
    rows = {(r["variant"], r["vs"]): r for r in seeds.summarize_runs([tmp_path / "seed0", tmp_path / "seed1"], "si_sdri")}
    anchor = rows[("anchor", "start")]
    assert anchor["seeds"] == 2 and anchor["sources"] == 4
    assert [v["mean"] for v in anchor["per_seed"].values()] == pytest.approx([1.0, 1.0])
    assert list(anchor["per_seed"].values())[1]["se"] == pytest.approx(np.std([0, 2, 0, 2], ddof=1) / 2)
    assert anchor["pooled"]["mean"] == pytest.approx(1.0) and anchor["pooled"]["se"] == pytest.approx(np.std([0.5, 1.5, 0.5, 1.5], ddof=1) / 2)
    assert anchor["between_seeds"] == pytest.approx({"mean": 1.0, "sem": 0.0})
    assert rows[("sisdr", "start")]["seeds"] == 1 and rows[("sisdr", "start")]["pooled"]["mean"] == pytest.approx(0.5)
    assert ("anchor_sisdr", "sisdr") not in rows and ("query", "start") not in rows
    only = seeds.summarize_runs([tmp_path / "seed0", tmp_path / "seed1"], "si_sdri", [("anchor", "sisdr")])
    assert len(only) == 1 and only[0]["seeds"] == 1 and only[0]["pooled"]["mean"] == pytest.approx(0.5)  # seed0 only has sisdr
    dog_only = seeds.summarize_runs([tmp_path / "seed0"], "si_sdri", [("anchor", "start")], classes={"dog"})
    assert dog_only[0]["sources"] == 4
    with pytest.raises(SystemExit, match="classes"):
        seeds.summarize_runs([tmp_path / "seed0"], "si_sdri", [("anchor", "start")], classes={"cat"})


def test_paired_difference_json_has_no_nan(tmp_path):
    """A class with one source has no SE: --json writes null there (JSON has no NaN), for both scripts."""
    import json
    import subprocess

    for name, values in (("a", [0.0, 1.0, 2.0]), ("b", [1.0, 1.5, 2.0])):
        lines = ["mixture,source,class,system,si_sdri"] + [f"m{i},0,{'dog' if i else 'cat'},model (text query),{v}" for i, v in enumerate(values)]
        (tmp_path / f"{name}.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "paired.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "paired_difference.py"), str(tmp_path / "a.csv"), str(tmp_path / "b.csv"),
                    "--json", str(out)], check=True, capture_output=True)
    paired = json.loads(out.read_text())
    assert paired["per_class"]["cat"] == {"mean": 1.0, "se": None, "better_share": 1.0, "n": 1}
    assert paired["mean_difference"] == pytest.approx(0.5)
    seeds = _load("rl_seed_summary")
    assert seeds.finite_or_none({"rows": [{"sem": float("nan"), "mean": 1.0}]}) == {"rows": [{"sem": None, "mean": 1.0}]}
