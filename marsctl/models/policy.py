"""The separator's stochastic mask policy: an independent Beta distribution per T-F bin.

MARS-Sep turns the separator's per-bin mask probability ``P`` (sigmoid of the logits)
into a policy ``pi(M | x, q) = prod_{f,t} Beta(M_ft; alpha_ft, beta_ft)`` with

    alpha = 1 + kappa * P,        beta = 1 + kappa * (1 - P)           (kappa = 9 by default)

Both parameters are at least 1, so the density is unimodal and its mode
``(alpha - 1) / (alpha + beta - 2)`` is exactly ``P``: deterministic inference with the
mode reproduces the supervised separator. The closed forms below are written out (rather
than delegated to :class:`torch.distributions.Beta`) so that each line maps to a formula;
the tests check them against ``torch.distributions.Beta``.

All quantities are per bin (same shape as ``P``); callers reduce over bins as their loss
requires (MARS-Sep averages per-bin ratios over bins).
"""

from __future__ import annotations

import torch

#: masks are kept this far inside (0, 1) before taking logs, so log_prob stays finite
MASK_EPS = 1e-6
DEFAULT_KAPPA = 9.0


def _log_beta_function(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """ln B(alpha, beta) = ln Gamma(alpha) + ln Gamma(beta) - ln Gamma(alpha + beta)."""
    return torch.lgamma(alpha) + torch.lgamma(beta) - torch.lgamma(alpha + beta)


class BetaMaskPolicy:
    """Factorized Beta distribution over masks in [0, 1], parameterised by ``P`` and ``kappa``.

    ``probs`` is ``P = sigmoid(logits)`` of any shape (typically ``[B, F, T]`` or
    ``[B, S, F, T]``); gradients flow from every method back into ``probs``.
    """

    def __init__(self, probs: torch.Tensor, kappa: float = DEFAULT_KAPPA):
        if kappa <= 0:
            raise ValueError(f"kappa must be positive, got {kappa}")
        self.probs = probs
        self.kappa = float(kappa)
        # alpha = 1 + kappa P,  beta = 1 + kappa (1 - P)
        self.alpha = 1.0 + self.kappa * probs
        self.beta = 1.0 + self.kappa * (1.0 - probs)

    @classmethod
    def from_logits(cls, logits: torch.Tensor, kappa: float = DEFAULT_KAPPA) -> "BetaMaskPolicy":
        """The policy of the separator's logits (computed in float32 even under autocast)."""
        return cls(torch.sigmoid(logits.float()), kappa)

    @property
    def shape(self) -> torch.Size:
        return self.probs.shape

    @property
    def mode(self) -> torch.Tensor:
        """(alpha - 1) / (alpha + beta - 2) = kappa P / kappa = P, exactly."""
        return self.probs

    @property
    def mean(self) -> torch.Tensor:
        """alpha / (alpha + beta) = (1 + kappa P) / (2 + kappa)."""
        return self.alpha / (self.alpha + self.beta)

    @property
    def variance(self) -> torch.Tensor:
        total = self.alpha + self.beta
        return self.alpha * self.beta / (total * total * (total + 1))

    def log_prob(self, mask: torch.Tensor) -> torch.Tensor:
        """Per-bin log density: (alpha-1) ln m + (beta-1) ln(1-m) - ln B(alpha, beta).

        ``mask`` broadcasts against the policy's shape (e.g. ``[G, B, F, T]`` samples of a
        ``[B, F, T]`` policy). It is clamped to ``[MASK_EPS, 1 - MASK_EPS]``.
        """
        m = mask.float().clamp(MASK_EPS, 1.0 - MASK_EPS)
        return (
            (self.alpha - 1.0) * torch.log(m)
            + (self.beta - 1.0) * torch.log1p(-m)
            - _log_beta_function(self.alpha, self.beta)
        )

    def entropy(self) -> torch.Tensor:
        """Per-bin differential entropy:
        ln B(a, b) - (a-1) psi(a) - (b-1) psi(b) + (a+b-2) psi(a+b)."""
        a, b = self.alpha, self.beta
        return (
            _log_beta_function(a, b)
            - (a - 1.0) * torch.digamma(a)
            - (b - 1.0) * torch.digamma(b)
            + (a + b - 2.0) * torch.digamma(a + b)
        )

    def kl_divergence(self, other: "BetaMaskPolicy") -> torch.Tensor:
        """Per-bin KL(self || other) in closed form:
        ln B(a2, b2) - ln B(a1, b1) + (a1-a2) psi(a1) + (b1-b2) psi(b1) + (a2-a1+b2-b1) psi(a1+b1)."""
        a1, b1, a2, b2 = self.alpha, self.beta, other.alpha, other.beta
        return (
            _log_beta_function(a2, b2)
            - _log_beta_function(a1, b1)
            + (a1 - a2) * torch.digamma(a1)
            + (b1 - b2) * torch.digamma(b1)
            + (a2 - a1 + b2 - b1) * torch.digamma(a1 + b1)
        )

    def sample(self, num_samples: int | None = None) -> torch.Tensor:
        """Draw masks (no gradient), shape ``[num_samples, *shape]`` or ``shape`` if None.

        Uses the global torch RNG of the policy's device; wrap in
        ``torch.random.fork_rng`` + ``torch.manual_seed`` for reproducible draws.
        """
        # validate_args=False: alpha, beta >= 1 by construction, and the check is a host sync per draw
        dist = torch.distributions.Beta(self.alpha.detach(), self.beta.detach(), validate_args=False)
        size = torch.Size() if num_samples is None else torch.Size([num_samples])
        return dist.sample(size).clamp(0.0, 1.0)

    def rsample(self, num_samples: int) -> torch.Tensor:
        """Draw ``[num_samples, *shape]`` masks *with* a gradient to ``probs`` (the reparameterized,
        or pathwise, sample). Kept inside ``[MASK_EPS, 1 - MASK_EPS]``.

        M = G_a / (G_a + G_b) with G_a ~ Gamma(alpha, 1), G_b ~ Gamma(beta, 1) is Beta(alpha, beta)
        distributed; each Gamma draw carries its implicit reparameterization gradient
        dG/dc = -(dF(G; c)/dc) / f(G; c) (:meth:`torch.distributions.Gamma.rsample`). This is the
        same distribution and an unbiased gradient of the same expectation as
        :meth:`torch.distributions.Beta.rsample` (which differentiates the Beta CDF instead, with less
        noise per bin), whose backward, ``_dirichlet_grad``, was 3-7x slower on a CPU than the two Gamma
        gradients (BENCHMARKS.md section 12.4)."""
        size = torch.Size([num_samples])
        # validate_args=False: the parameters are >= 1 by construction, and the check is a host sync per draw
        gamma_alpha = torch.distributions.Gamma(self.alpha, 1.0, validate_args=False).rsample(size)  # G_a ~ Gamma(alpha, 1)
        gamma_beta = torch.distributions.Gamma(self.beta, 1.0, validate_args=False).rsample(size)  # G_b ~ Gamma(beta, 1)
        return (gamma_alpha / (gamma_alpha + gamma_beta)).clamp(MASK_EPS, 1.0 - MASK_EPS)  # M ~ Beta(alpha, beta)

    def detach(self) -> "BetaMaskPolicy":
        """The same distribution cut from the graph (e.g. the old policy snapshotted at sampling time)."""
        return BetaMaskPolicy(self.probs.detach(), self.kappa)

    def decode(self, how: str) -> torch.Tensor:
        """A mask for inference: ``mode`` (= P, the default), ``mean`` or one ``sample``."""
        if how == "mode":
            return self.mode
        if how == "mean":
            return self.mean
        if how == "sample":
            return self.sample()
        raise ValueError(f"unknown decode {how!r}; expected mode, mean or sample")
