"""Decode modes of ``marsctl separate``: ``mode`` (= P, the supervised mask), ``mean`` of the Beta
policy, one ``sample``, or ``best-of-N``: sample N masks, keep the one the encoder likes best.

For every chunk and query (``marsctl separate`` processes long files in chunks)::

    M_n ~ pi(. | x, q), n = 1..N          N masks from ONE separator forward pass
    y_n = iSTFT(warp^-1(M_n) X)
    n*  = argmax_n cos(phi_a(y_n), q)     all N estimates embedded in one encoder batch
    y   = y_{n*}

The scorer is the query encoder the separator was trained with (the only encoder
``separate`` has), and the score is the query similarity: at inference there is no target
to build the anchor z* from. Chunks are re-ranked independently (each chunk of a long
file keeps its own best sample); the cross-fade of the overlap-add smooths the seams.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from marsctl.errors import ConfigError

_BEST_OF = re.compile(r"^best-of-(\d+)$")
#: decodes of the policy itself (:meth:`marsctl.models.policy.BetaMaskPolicy.decode`)
DECODES = ("mode", "mean", "sample")


def check_decode(decode: str) -> None:
    """Raise :class:`ConfigError` unless ``decode`` is one of :data:`DECODES` or ``best-of-N``."""
    if decode not in DECODES and parse_best_of(decode) is None:
        raise ConfigError(f"unknown decode {decode!r}; expected one of {', '.join(DECODES)} or best-of-N (e.g. best-of-8)")


def parse_best_of(decode: str) -> int | None:
    """N for ``best-of-N`` (N >= 1), None for any other decode name."""
    match = _BEST_OF.match(decode)
    if match is None:
        return None
    n = int(match.group(1))
    if n < 1:
        raise ConfigError(f"--decode {decode}: N must be at least 1")
    return n


@torch.no_grad()
def best_of_n_separate(model, mixtures: torch.Tensor, queries: torch.Tensor, num_samples: int, encoder) -> torch.Tensor:
    """Mixtures ``[B, T]`` and queries ``[B, K, D]`` (or ``[B, D]``) -> the best of ``num_samples``
    sampled estimates per (mixture, query), ``[B, K, T]`` (or ``[B, T]``)."""
    squeeze = queries.ndim == 2
    if squeeze:
        queries = queries.unsqueeze(1)
    batch, length = mixtures.shape
    stft, _, log_magnitude = model.analyze(mixtures)
    policy = model.policy(model.logits(model.features(log_magnitude), queries))  # [B, K, F, frames]
    masks = policy.sample(num_samples)  # M_n ~ pi, [N, B, K, F, frames]
    estimates = model.synthesize(masks, stft.unsqueeze(1), length)  # y_n, [N, B, K, T]
    count = queries.shape[1]
    with torch.autocast(device_type=mixtures.device.type, enabled=False):
        embeddings = encoder.embed_audio(estimates.reshape(-1, length).float().to(encoder.device), model.config.signal.sample_rate)
        embeddings = embeddings.float().view(num_samples, batch, count, -1).to(mixtures.device)
        scores = F.cosine_similarity(embeddings, queries.float().unsqueeze(0).expand_as(embeddings), dim=-1)  # [N, B, K]
    best = scores.argmax(dim=0)  # n*
    chosen = estimates.gather(0, best[None, ..., None].expand(1, batch, count, length))[0]  # y_{n*}
    return chosen[:, 0] if squeeze else chosen
