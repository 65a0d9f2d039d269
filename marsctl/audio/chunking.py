"""Chunked processing of arbitrarily long signals with cross-faded overlap-add (as demucs' apply)."""

from __future__ import annotations

from typing import Callable

import torch


def overlap_add(
    process: Callable[[torch.Tensor], torch.Tensor],
    signal: torch.Tensor,
    chunk_samples: int,
    overlap: float = 0.25,
    batch_size: int = 8,
) -> torch.Tensor:
    """Run ``process`` over overlapping chunks of ``signal`` and cross-fade the results.

    ``signal`` is ``[..., T]``. ``process`` takes a batch ``[N, ..., chunk_samples]`` and
    returns ``[N, ..., chunk_samples]``. At most ``batch_size`` chunks are processed at
    once, so memory is bounded by the batch plus the output buffer, whatever ``T`` is.
    Chunks start every ``chunk_samples * (1 - overlap)`` samples; the last one is
    zero-padded. Each output sample is the weighted mean of the chunks covering it, with
    triangular weights that are largest at a chunk's centre, so seams are smooth. With
    ``process`` the identity, the output equals the input.
    """
    if chunk_samples <= 0:
        raise ValueError(f"chunk_samples must be positive, got {chunk_samples}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    total = signal.shape[-1]
    if total == 0:
        raise ValueError("cannot process a zero-length signal")
    stride = max(1, int(round(chunk_samples * (1 - overlap))))
    starts = list(range(0, max(total - chunk_samples, 0) + 1, stride))
    if starts[-1] + chunk_samples < total:
        starts.append(starts[-1] + stride)

    ramp = torch.arange(1, chunk_samples + 1, dtype=torch.float32, device=signal.device)
    weight = torch.minimum(ramp, ramp.flip(0))  # triangular, strictly positive
    output: torch.Tensor | None = None
    weight_sum = torch.zeros(total, dtype=torch.float32, device=signal.device)

    for first in range(0, len(starts), batch_size):
        batch_starts = starts[first : first + batch_size]
        chunks = []
        for start in batch_starts:
            piece = signal[..., start : start + chunk_samples]
            if piece.shape[-1] < chunk_samples:
                piece = torch.nn.functional.pad(piece, (0, chunk_samples - piece.shape[-1]))
            chunks.append(piece)
        results = process(torch.stack(chunks))
        if results.shape[-1] != chunk_samples or results.shape[0] != len(batch_starts):
            raise ValueError(
                f"process returned shape {tuple(results.shape)}, expected [{len(batch_starts)}, ..., {chunk_samples}]"
            )
        if output is None:
            output = torch.zeros(*results.shape[1:-1], total, dtype=results.dtype, device=signal.device)
        for start, result in zip(batch_starts, results):
            keep = min(chunk_samples, total - start)
            output[..., start : start + keep] += result[..., :keep] * weight[:keep].to(result.dtype)
            weight_sum[start : start + keep] += weight[:keep]
    assert output is not None
    return output / weight_sum.to(output.dtype)
