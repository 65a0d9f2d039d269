"""How good is each RL gradient estimator? Cosines between independent estimates, in one run.

The RL objective is J(P) = E_{M ~ Beta(P)}[R(M)] over the Beta mask policy of a separator
(one Beta per log-frequency bin, ~33 k bins per 2 s clip). Two estimators of dJ/dP:

* score function (the paper's; what the clipped surrogate differentiates at ratio 1):
  (1/G) sum_g (R_g - mean R) d log pi(M_g) / dP, masks drawn without gradient;
* pathwise (``estimator: pathwise``): d/dP (1/G) sum_g R(M_g(P)), masks drawn with
  ``BetaMaskPolicy.rsample`` (M = G_a / (G_a + G_b), implicit reparameterization gradients of
  the two Gamma draws);
* pathwise_beta_cdf: the same with ``torch.distributions.Beta.rsample`` (implicit gradients of
  the Beta CDF; the policy's sampler before 2026-12-01): the same expectation, a gradient with less
  noise per bin and a slower backward.

Both estimate the same vector. For one batch of training mixtures of a dataset, with the
separator's P fixed, the script draws two independent estimates of each kind and reports

* ``self``: cos(estimate 1, estimate 2); near 0 means the estimate is mostly noise;
* ``vs reference``: cos with a pathwise estimate from ``--reference-samples`` draws.

The reward is the clip SI-SDR (dB) of the estimate against the known target. Cosines are
taken over P (per bin) -- the signal the separator receives before backpropagation.

    OMP_NUM_THREADS=1 python bench/rl_gradient_quality.py --data data/soundfont [--model marsctl/pretrained/separator]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from marsctl.metrics.separation import si_sdr
from marsctl.models.policy import MASK_EPS, BetaMaskPolicy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="dataset directory (marsctl data build)")
    parser.add_argument("--model", default="marsctl/pretrained/separator", help="separator (run directory or packaged default)")
    parser.add_argument("--batch-size", type=int, default=4, help="training mixtures in the batch")
    parser.add_argument("--groups", default="8,64,256", help="G values (samples per mixture) to compare")
    parser.add_argument("--reference-samples", type=int, default=512, help="pathwise samples of the reference gradient")
    parser.add_argument("--kappa", type=float, default=None, help="Beta concentration (default: the model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the numbers here too")
    args = parser.parse_args()

    from marsctl.models.encoders import load_encoder
    from marsctl.models.separator import load_separator
    from marsctl.train.data import collate, mixing_dataset
    from marsctl.queries import QueryBuilder

    torch.manual_seed(args.seed)
    loaded = load_separator(args.model)
    model = loaded.model.eval()
    signal = model.config.signal
    kappa = args.kappa or model.config.kappa
    data = Path(args.data)
    dataset = mixing_dataset(data, "train", signal, 2, seed=args.seed)
    batch = collate([dataset[i] for i in range(args.batch_size)])
    queries = QueryBuilder(load_encoder(loaded.encoder), data, signal.sample_rate, modalities=["text"])
    generator = torch.Generator().manual_seed(args.seed)
    query = queries.batch(batch, generator)[:, 0]  # each mixture's first source is the target
    target, mixture = batch["sources"][:, 0], batch["mixture"]
    with torch.no_grad():
        stft, _, _ = model.analyze(mixture)
        probs = model.policy(model(mixture, query)).probs

    def reward(masks: torch.Tensor) -> torch.Tensor:  # [G, B, F, T] -> SI-SDR dB [G, B]
        estimates = model.synthesize(masks, stft, mixture.shape[-1])
        return si_sdr(target.expand_as(estimates), estimates).float()

    def pathwise(group: int, seed: int) -> torch.Tensor:
        p = probs.clone().requires_grad_(True)
        torch.manual_seed(seed)
        reward(BetaMaskPolicy(p, kappa).rsample(group)).mean().backward()
        return p.grad

    def pathwise_beta_cdf(group: int, seed: int) -> torch.Tensor:
        p = probs.clone().requires_grad_(True)
        policy = BetaMaskPolicy(p, kappa)
        torch.manual_seed(seed)
        masks = torch.distributions.Beta(policy.alpha, policy.beta).rsample(torch.Size([group])).clamp(MASK_EPS, 1.0 - MASK_EPS)
        reward(masks).mean().backward()
        return p.grad

    def score_function(group: int, seed: int) -> torch.Tensor:
        p = probs.clone().requires_grad_(True)
        policy = BetaMaskPolicy(p, kappa)
        torch.manual_seed(seed)
        masks = policy.sample(group)
        with torch.no_grad():
            advantage = reward(masks)
            advantage = advantage - advantage.mean(0, keepdim=True)
        (advantage[..., None, None] * policy.log_prob(masks)).sum((2, 3)).mean().backward()  # joint log-prob of a mask
        return p.grad

    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))

    reference = sum(pathwise(64, 10_000 + i) for i in range(max(1, args.reference_samples // 64)))
    rows = []
    seed = 1
    for name, estimator in (("score_function", score_function), ("pathwise", pathwise), ("pathwise_beta_cdf", pathwise_beta_cdf)):
        for group in (int(g) for g in args.groups.split(",")):
            first, second = estimator(group, seed), estimator(group, seed + 1)
            seed += 2
            rows.append({"estimator": name, "G": group, "self_cos": cos(first, second),
                         "cos_vs_reference": (cos(first, reference) + cos(second, reference)) / 2})
    result = {"model": args.model, "data": str(data), "batch_size": args.batch_size, "kappa": kappa,
              "bins_per_clip": int(probs[0].numel()), "reference_samples": args.reference_samples, "rows": rows}
    print("| estimator | G | cos(estimate, independent estimate) | cos(estimate, reference) |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['estimator']} | {row['G']} | {row['self_cos']:.3f} | {row['cos_vs_reference']:.3f} |")
    print(f"({args.batch_size} mixtures, {result['bins_per_clip']} Beta bins per clip, kappa {kappa:g}; reference: pathwise, "
          f"{args.reference_samples} samples)")
    if args.json:
        from marsctl.files import write_json_atomic

        write_json_atomic(args.json, result)


if __name__ == "__main__":
    main()
