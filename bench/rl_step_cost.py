"""Cost of one RL step relative to one supervised step, measured in the same run (issue 6, item 7).

Both steps see the same batch of B mixtures and the same separator size:

* supervised step (``marsctl train sup``'s loop body): STFT of the mixture and its S
  sources, one U-Net forward pass shared by the S source queries, OmniSep's weighted BCE,
  backward, gradient clipping, AdamW;
* RL step (:func:`marsctl.rl.update.rl_update`, the loop body of ``marsctl train rl`` on a
  step that is not logged): one STFT analysis of the mixtures shared by the two forward
  passes, one forward pass per mixture (one target query each), the frozen reference's
  forward pass, G masks sampled from that pass, G*B inverse STFTs, all G*B estimates through
  the reward encoder in one batch, the rewards, the policy loss, backward, clipping, AdamW.
  (Logged steps of the score-function estimator add one forward pass for the diagnostics.)

The two kinds of step are interleaved (sup, rl, sup, rl, ...) after a warm-up so that both
see the same machine load, and the ratio of medians is reported with the reward
encoder's share of the RL step. The paper reports 2x for an RL epoch; the issue's target
is <= 1.3x. ``--phases`` adds the median seconds of each phase of the RL step (analysis,
reference_forward, policy_forward, sample, synthesize, reward, loss, backward_step for the
pathwise estimator).

    OMP_NUM_THREADS=1 python bench/rl_step_cost.py                       # paper-size separator, builtin encoder
    python bench/rl_step_cost.py --device cuda --batch-size 16 --json out.json
    python bench/rl_step_cost.py --small --segment-samples 32767         # the soundfont-small separator
    python bench/rl_step_cost.py --small --segment-samples 32767 --recipe recipes/train/rl-soundfont-small.yaml

``--baseline-update FILE`` also times the RL step of another version of ``marsctl/rl/update.py``
(``git show REV:marsctl/rl/update.py > FILE``; it imports the current package's other modules),
interleaved with the two others (sup, RL, baseline, sup, baseline, RL, ...) on its own copy of the separator,
so that a speed-up is measured under the same machine load:

    git show 185ce55:marsctl/rl/update.py > /tmp/update_before.py
    python bench/rl_step_cost.py --small --segment-samples 32767 --batch-size 4 --group-size 2 \
        --recipe recipes/train/rl-soundfont-small.yaml --baseline-update /tmp/update_before.py

``--recipe`` takes the RL settings that change the step's work (estimator, reward weights, KL and
entropy coefficients) from an RL recipe; batch, group and epochs stay the options here.

The reward encoder defaults to ``builtin`` (runs offline; its audio tower's cost does not
depend on whether it was aligned); pass ``--encoder DIR`` for an aligned encoder or
``laion-clap:630k-audioset`` for CLAP.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import platform
import statistics
import sys
import time

import torch

from marsctl.config import SignalConfig
from marsctl.models.separator import Separator, SeparatorConfig
from marsctl.rl.rewards import reward_functions
from marsctl.rl.config import RLConfig, load_rl_config
from marsctl.rl.rollout import PhaseTimer, RewardModel
from marsctl.rl.update import rl_update
from marsctl.train.supervised import weighted_bce_mask_loss

LABELS = ["dog barking", "violin", "piano", "rain", "engine idling", "people speaking", "flute", "siren"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--encoder", default="builtin", help="reward (and query) encoder spec")
    parser.add_argument("--batch-size", type=int, default=8, help="mixtures per step (both kinds of step)")
    parser.add_argument("--group-size", type=int, default=8, help="G masks per mixture")
    parser.add_argument("--ppo-epochs", type=int, default=1)
    parser.add_argument("--num-sources", type=int, default=2)
    parser.add_argument("--segment-samples", type=int, default=SignalConfig().segment_samples)
    parser.add_argument("--small", action="store_true", help="the soundfont-small separator (16 channels, x4 cap) instead of the paper's")
    parser.add_argument("--warmup", type=int, default=2, help="untimed pairs of steps first")
    parser.add_argument("--steps", type=int, default=6, help="timed pairs of steps")
    parser.add_argument("--recipe", help="RL recipe whose estimator, rewards and loss coefficients the RL step uses")
    parser.add_argument("--phases", action="store_true", help="also time each phase of the RL step (synchronizes between phases)")
    parser.add_argument("--baseline-update", metavar="FILE", help="another marsctl/rl/update.py whose RL step is timed too, interleaved")
    parser.add_argument("--json", help="write the numbers here too")
    args = parser.parse_args()

    from marsctl.models.encoders import load_encoder

    device = torch.device(args.device)
    torch.manual_seed(0)
    encoder = load_encoder(args.encoder, device=device).eval().requires_grad_(False)
    signal = SignalConfig(segment_samples=args.segment_samples)
    arch = dict(base_channels=16, max_channel_multiplier=4) if args.small else {}
    sep_config = SeparatorConfig(query_dim=encoder.embedding_dim, signal=signal, **arch)
    rl_model = Separator(sep_config).to(device)
    sup_model = Separator(sep_config).to(device)
    sup_model.load_state_dict(rl_model.state_dict())
    reference = Separator(sep_config).to(device).eval().requires_grad_(False)
    reference.load_state_dict(rl_model.state_dict())
    sizes = {"init_model": "bench", "data": "bench", "batch_size": args.batch_size, "group_size": args.group_size, "ppo_epochs": args.ppo_epochs}
    rl_config = load_rl_config(args.recipe, sizes) if args.recipe else RLConfig(**sizes)
    reward_model = RewardModel(encoder, reward_functions(rl_config.rewards), signal, same_space_as_queries=True, config=rl_config.rewards)
    use_bf16 = device.type == "cuda"

    B, S, T = args.batch_size, args.num_sources, args.segment_samples
    generator = torch.Generator().manual_seed(0)
    sources = (0.1 * torch.randn(B, S, T, generator=generator)).to(device)
    mixture = sources.sum(1)
    labels = [[LABELS[(b * S + s) % len(LABELS)] for s in range(S)] for b in range(B)]
    with torch.no_grad():
        text = encoder.embed_text(sorted({label for row in labels for label in row}))
        index = {label: i for i, label in enumerate(sorted({label for row in labels for label in row}))}
        queries = torch.stack([text[[index[label] for label in row]] for row in labels]).float().to(device)  # [B, S, D]

    sup_optimizer = torch.optim.AdamW(sup_model.parameters(), lr=1e-3, weight_decay=0.01)
    rl_optimizer = torch.optim.AdamW(rl_model.parameters(), lr=2e-4, weight_decay=0.01)
    sup_model.train()
    rl_model.eval()
    baseline = _load_update(args.baseline_update) if args.baseline_update else None
    if baseline is not None:
        base_model = Separator(sep_config).to(device).eval()
        base_model.load_state_dict(rl_model.state_dict())
        base_optimizer = torch.optim.AdamW(base_model.parameters(), lr=2e-4, weight_decay=0.01)
        base_options = {"diagnostics": False} if "diagnostics" in inspect.signature(baseline.rl_update).parameters else {}

        def baseline_step(step: int) -> float:
            _sync(device)
            start = time.perf_counter()
            baseline.rl_update(
                base_model, base_model, reference, reward_model, base_optimizer, rl_config, mixture, queries[:, 0], sources[:, 0],
                [row[0] for row in labels], sample_seed=step, device=device, use_bf16=use_bf16, **base_options,
            )
            _sync(device)
            return time.perf_counter() - start

    def supervised_step() -> float:
        _sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            _, mixture_magnitude, _ = sup_model.analyze(mixture)
            _, source_magnitudes, _ = sup_model.analyze(sources)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = sup_model(mixture, queries)  # [B, S, F, T]: one U-Net pass, S queries
        loss = weighted_bce_mask_loss(logits, source_magnitudes, mixture_magnitude)
        sup_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sup_model.parameters(), 1.0)
        sup_optimizer.step()
        _sync(device)
        return time.perf_counter() - start

    phases: list[dict[str, float]] = []

    def rl_step(step: int) -> tuple[float, float]:
        timer = PhaseTimer(device, enabled=args.phases)
        _sync(device)
        start = time.perf_counter()
        update = rl_update(
            rl_model, rl_model, reference, reward_model, rl_optimizer, rl_config, mixture, queries[:, 0], sources[:, 0],
            [row[0] for row in labels], sample_seed=step, device=device, use_bf16=use_bf16, timer=timer, diagnostics=False,
        )
        _sync(device)
        phases.append(timer.seconds)
        return time.perf_counter() - start, update.samples.reward_seconds

    for i in range(args.warmup):
        supervised_step()
        rl_step(i)
        if baseline is not None:
            baseline_step(i)
    sup_times, rl_times, reward_times, base_times = [], [], [], []
    for i in range(args.steps):
        sup_times.append(supervised_step())
        if baseline is not None and i % 2:  # every other time the baseline first: no order effect
            base_times.append(baseline_step(args.warmup + i))
        seconds, reward_seconds = rl_step(args.warmup + i)
        rl_times.append(seconds)
        reward_times.append(reward_seconds)
        if baseline is not None and not i % 2:
            base_times.append(baseline_step(args.warmup + i))

    sup_median, rl_median = statistics.median(sup_times), statistics.median(rl_times)
    result = {
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "encoder": args.encoder,
        "separator": "soundfont-small" if args.small else "paper (7 levels, 32 channels)",
        "batch_size": B,
        "group_size": args.group_size,
        "ppo_epochs": args.ppo_epochs,
        "recipe": args.recipe,
        "estimator": rl_config.estimator,
        "reward_weights": dict(rl_config.rewards.weights),
        "segment_samples": T,
        "timed_pairs": args.steps,
        "supervised_step_s": sup_median,
        "rl_step_s": rl_median,
        "ratio_rl_over_supervised": rl_median / sup_median,
        "reward_share_of_rl_step": statistics.median(r / t for r, t in zip(reward_times, rl_times)),
        **({"rl_phases_median_s": {k: statistics.median(p[k] for p in phases[args.warmup:]) for k in phases[-1]}} if args.phases else {}),
        **({"baseline_update": args.baseline_update, "baseline_rl_step_s": statistics.median(base_times),
            "baseline_ratio_rl_over_supervised": statistics.median(base_times) / sup_median,
            "rl_step_over_baseline_rl_step": rl_median / statistics.median(base_times)} if baseline is not None else {}),
        "supervised_steps_s": sup_times,
        "rl_steps_s": rl_times,
        **({"baseline_rl_steps_s": base_times} if baseline is not None else {}),
    }
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("steps_s")}, indent=2))
    verdict = "within" if result["ratio_rl_over_supervised"] <= 1.3 else "ABOVE"
    print(f"RL step / supervised step = {result['ratio_rl_over_supervised']:.2f}x ({verdict} the 1.3x target)")
    if baseline is not None:
        print(f"baseline RL step / supervised step = {result['baseline_ratio_rl_over_supervised']:.2f}x; "
              f"RL step / baseline RL step = {result['rl_step_over_baseline_rl_step']:.3f}")
    if args.json:
        from marsctl.files import write_json_atomic

        write_json_atomic(args.json, result)


def _load_update(path: str):
    """``path`` (a version of marsctl/rl/update.py) as a module of its own."""
    spec = importlib.util.spec_from_file_location("baseline_update", path)
    if not os.path.isfile(path) or spec is None or spec.loader is None:
        raise SystemExit(f"--baseline-update {path}: no such Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    main()
