"""Speed and memory figures of marsctl (issue 8, part 2), each measured in one run.

    OMP_NUM_THREADS=2 .venv/bin/python bench/speed.py --data data/debian-sfx --out bench_work/speed

Sections (``--only`` picks some):

* ``mixing``: :class:`marsctl.data.mixing.DynamicMixDataset` items per second (one process,
  reading the FLAC clips from disk, 2-source OmniSep mixing, the training window).
* ``separation``: seconds of audio separated per second of wall time
  (:func:`marsctl.separate.separate_waveform`: chunked overlap-add, batch 8, mode decoding,
  one query) for the paper-size separator (7-level U-Net, 32 base channels, 4.1 s window) and
  the small CPU one (16 channels, 2 s window); weights are random unless ``--model`` is given
  (throughput does not depend on the weights). CPU, and CUDA when available.
* ``memory``: peak resident memory (``ru_maxrss`` of the child process, from ``os.wait4``) of
  ``marsctl separate`` on a one-hour 16 kHz file, next to the same command on a one-minute file,
  so the growth with length is visible (the file, its estimate and the output are O(length);
  the model's working set is bounded by the chunking).
* ``steps``: RL step time / supervised step time in one run: ``bench/rl_step_cost.py`` (the
  loop bodies of ``train sup`` and ``train rl``, interleaved on the same batch so that both
  see the same load; ratio of medians, with the reward encoder's share of the RL step).
* ``metrics``: ``bench/metrics_speed.py`` (marsctl BSS-Eval vs mir_eval), single-threaded.

Nothing here asserts a time: the figures go to ``<out>/speed.json`` and a Markdown table
``<out>/speed.md`` for BENCHMARKS.md. Timings on a shared machine vary; the ratios (RL/sup,
marsctl/mir_eval) are taken within one run so they share the load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from marsctl.config import SignalConfig  # noqa: E402
from marsctl.files import write_json_atomic, write_text_atomic  # noqa: E402

SECTIONS = ("mixing", "separation", "memory", "steps", "metrics")
#: architectures timed when no --model is given: name -> (SeparatorConfig overrides, segment_samples)
ARCHITECTURES = {
    "paper (7.6 M params, 4.1 s window)": ({"base_channels": 32, "max_channel_multiplier": 8}, 65_535),
    "small (0.63 M params, 2 s window)": ({"base_channels": 16, "max_channel_multiplier": 4}, 32_767),
}
QUERY_DIM_DEFAULT = 384  # the built-in encoder's embedding size (all-MiniLM-L6-v2)


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["cuda"] = torch.cuda.get_device_name(0)
    return info


def test_signal(seconds: float, sample_rate: int = 16_000, seed: int = 0) -> np.ndarray:
    """A deterministic mixture-like test signal (filtered noise + a gliding harmonic tone)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sample_rate)
    t = np.arange(n, dtype=np.float64) / sample_rate
    noise = np.convolve(rng.standard_normal(n), np.hanning(32) / 16, "same")
    f0 = 220 * 2 ** np.sin(2 * np.pi * 0.05 * t)
    tone = np.sin(2 * np.pi * np.cumsum(f0) / sample_rate)
    return (0.1 * noise + 0.2 * tone).astype(np.float32)


# --------------------------------------------------------------------------- mixing


def bench_mixing(data: Path, items: int, signal: SignalConfig) -> dict:
    from marsctl.data.mixing import DynamicMixDataset

    dataset = DynamicMixDataset(data, "train", signal, num_sources=2, seed=0, length=items)
    dataset[0]  # open the manifests / warm the file cache
    start = time.perf_counter()
    for i in range(items):
        dataset[i]
    seconds = time.perf_counter() - start
    return {"items": items, "seconds": seconds, "items_per_s": items / seconds,
            "audio_seconds_per_s": items * signal.segment_samples / signal.sample_rate / seconds,
            "segment_samples": signal.segment_samples, "processes": 1}


# --------------------------------------------------------------------------- separation


def _models(model_dirs: list[str], query_dim: int, device: str):
    from marsctl.models.separator import Separator, SeparatorConfig, load_separator

    if model_dirs:
        for spec in model_dirs:
            loaded = load_separator(spec, device=device)
            yield str(spec), loaded.model.eval()
        return
    torch.manual_seed(0)
    for name, (overrides, segment) in ARCHITECTURES.items():
        config = SeparatorConfig(query_dim=query_dim, signal=SignalConfig(segment_samples=segment), **overrides)
        yield name, Separator(config).to(device).eval()


def bench_separation(model_dirs: list[str], seconds: float, devices: list[str], batch_size: int) -> list[dict]:
    from marsctl.separate import SeparateOptions, separate_waveform

    wave = torch.from_numpy(test_signal(seconds))
    rows = []
    for device in devices:
        for name, model in _models(model_dirs, QUERY_DIM_DEFAULT, device):
            query = torch.nn.functional.normalize(torch.randn(1, model.config.query_dim), dim=-1)
            options = SeparateOptions(batch_size=batch_size)
            separate_waveform(model, wave[: 4 * model.config.signal.segment_samples], query, options)  # warm-up
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            out = separate_waveform(model, wave, query, options)
            if device == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - start
            assert out.shape == (1, wave.numel())
            rows.append({
                "model": name, "device": device, "audio_seconds": seconds, "wall_seconds": wall,
                "x_real_time": seconds / wall, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                "batch_size": batch_size, "threads": torch.get_num_threads(),
                **({"cuda_peak_gib": torch.cuda.max_memory_allocated() / 2**30} if device == "cuda" else {}),
            })
            print(f"  separation {name} on {device}: {seconds / wall:.1f}x real time", flush=True)
    return rows


# --------------------------------------------------------------------------- memory


def _child_peak_rss(args: list[str], env: dict) -> tuple[int, float, int]:
    """(exit status, wall seconds, peak RSS in MiB) of one child process."""
    start = time.perf_counter()
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} ... failed ({process.returncode}): {stderr.strip()[-800:]}")
    return process.returncode, wall, usage.ru_maxrss // 1024  # ru_maxrss is in KiB on Linux


def bench_memory(model_dir: str | None, work: Path, lengths_s: list[float], query_dim: int) -> list[dict]:
    from marsctl.audio import save_audio
    from marsctl.models.separator import Separator, SeparatorConfig, save_separator

    work.mkdir(parents=True, exist_ok=True)
    if model_dir is None:  # a paper-size separator with random weights, saved as a real model directory
        model_dir = str(work / "paper-size-random")
        torch.manual_seed(0)
        save_separator(Separator(SeparatorConfig(query_dim=query_dim)), model_dir, encoder="builtin")
    env = {**os.environ}
    rows = []
    for seconds in lengths_s:
        audio = work / f"input-{int(seconds)}s.flac"
        if not audio.is_file():
            save_audio(audio, test_signal(seconds), 16_000)
        out_dir = work / f"separated-{int(seconds)}s"
        args = [sys.executable, "-m", "marsctl", "separate", str(audio), "--model", model_dir, "--query", "fire",
                "--out", str(out_dir), "--overwrite", "--device", "cpu"]
        _, wall, peak = _child_peak_rss(args, env)
        rows.append({"audio_seconds": seconds, "peak_rss_mib": peak, "wall_seconds": wall, "x_real_time": seconds / wall, "model": model_dir})
        print(f"  memory: {seconds:.0f} s file -> peak RSS {peak} MiB ({seconds / wall:.1f}x real time, whole command)", flush=True)
    return rows


# --------------------------------------------------------------------------- RL / supervised step


def bench_steps(work: Path, batch_size: int, group_size: int, steps: int, sizes: list[str]) -> list[dict]:
    """``bench/rl_step_cost.py`` (the RL engineer's bench: supervised and RL steps interleaved on
    the same batch, so both see the same load), once per separator size."""
    rows = []
    for size in sizes:
        out = work / f"rl_step_cost-{size}.json"
        args = [sys.executable, str(ROOT / "bench/rl_step_cost.py"), "--device", "cpu", "--batch-size", str(batch_size),
                "--group-size", str(group_size), "--steps", str(steps), "--json", str(out)]
        if size == "small":
            args += ["--small", "--segment-samples", "32767"]
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
        rows.append(json.loads(out.read_text()))
        print(f"  steps ({size}): RL/sup = {rows[-1]['ratio_rl_over_supervised']:.2f}", flush=True)
    return rows


# --------------------------------------------------------------------------- metrics


def bench_metrics(examples: int, work: Path) -> dict:
    out = work / "metrics_speed.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(ROOT / "bench/metrics_speed.py"), "--examples", str(examples), "--json", str(out)], env=env, check=True)
    return json.loads(out.read_text())


# --------------------------------------------------------------------------- report


def markdown(results: dict) -> str:
    lines = [f"Machine: {results['machine'].get('cpu', '?')}, {results['machine']['cpu_count']} cores visible, "
             f"torch threads {results['machine']['torch_threads']}; {results['machine']['date_utc']}.", ""]
    if "mixing" in results:
        m = results["mixing"]
        lines += ["| dataset mixing | items/s | audio s/s |", "|---|---|---|",
                  f"| DynamicMixDataset, 2 sources, {m['segment_samples']} samples, 1 process | {m['items_per_s']:.1f} | {m['audio_seconds_per_s']:.0f} |", ""]
    if "separation" in results:
        lines += ["| separation | device | params (M) | x real time |", "|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['device']} | {r['params_m']:.2f} | {r['x_real_time']:.1f} |" for r in results["separation"]]
        lines.append("")
    if "memory" in results:
        lines += ["| `marsctl separate`, paper-size model | peak RSS (MiB) | whole command x real time |", "|---|---|---|"]
        lines += [f"| {r['audio_seconds'] / 60:.0f} min file | {r['peak_rss_mib']} | {r['x_real_time']:.1f} |" for r in results["memory"]]
        lines.append("")
    if "steps" in results:
        lines += ["| training step (CPU) | batch | G | supervised s/step | RL s/step | RL / sup | reward encoder share of RL step |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {s['separator']}, {s['segment_samples']} samples | {s['batch_size']} | {s['group_size']} | {s['supervised_step_s']:.3f} | "
                  f"{s['rl_step_s']:.3f} | **{s['ratio_rl_over_supervised']:.2f}** | {s.get('reward_share_of_rl_step', s.get('reward_encoder_share_of_rl_step', float('nan'))):.2f} |" for s in results["steps"]]
        lines.append("")
    if "metrics" in results:
        lines += ["metrics_speed.py: ```" + json.dumps(results["metrics"])[:600] + "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2][:1200],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a dataset directory (marsctl data build) for mixing and training steps")
    parser.add_argument("--out", type=Path, default=Path("bench_work/speed"), help="results and scratch files go here")
    parser.add_argument("--only", nargs="*", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--model", action="append", default=[], help="time this separator directory instead of random-weight architectures (repeatable)")
    parser.add_argument("--mix-items", type=int, default=200)
    parser.add_argument("--separation-seconds", type=float, default=120.0)
    parser.add_argument("--batch-size", type=int, default=8, help="chunks per forward pass when separating")
    parser.add_argument("--memory-seconds", type=float, nargs="*", default=[60.0, 3600.0])
    parser.add_argument("--steps", type=int, default=6, help="timed pairs of (supervised, RL) steps")
    parser.add_argument("--step-batch", type=int, default=4, help="mixtures per training step (both kinds)")
    parser.add_argument("--step-sizes", nargs="+", choices=("small", "paper"), default=["small", "paper"])
    parser.add_argument("--group-size", type=int, default=8, help="G, RL samples per mixture")
    parser.add_argument("--metric-examples", type=int, default=200)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    done = args.out / "speed.json"
    if done.is_file():  # resumable: sections already measured are kept
        previous = json.loads(done.read_text())
        results.update({k: v for k, v in previous.items() if k in SECTIONS and k not in args.only})

    def save() -> None:
        write_json_atomic(done, results)
        write_text_atomic(args.out / "speed.md", markdown(results))

    if "mixing" in args.only:
        results["mixing"] = bench_mixing(args.data, args.mix_items, SignalConfig())
        print(f"  mixing: {results['mixing']['items_per_s']:.1f} items/s", flush=True)
        save()
    if "separation" in args.only:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        results["separation"] = bench_separation(args.model, args.separation_seconds, devices, args.batch_size)
        save()
    if "steps" in args.only:
        results["steps"] = bench_steps(args.out, args.step_batch, args.group_size, args.steps, args.step_sizes)
        save()
    if "metrics" in args.only:
        results["metrics"] = bench_metrics(args.metric_examples, args.out)
        save()
    if "memory" in args.only:
        results["memory"] = bench_memory(args.model[0] if args.model else None, args.out / "memory", args.memory_seconds, QUERY_DIM_DEFAULT)
        save()
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
