"""Chunked processing of arbitrarily long signals with cross-faded overlap-add (as demucs' apply).

:class:`StreamingOverlapAdd` takes the signal in blocks of any size and returns each output
sample as soon as no later chunk covers it, so a file can be read, processed and written
block by block; :func:`overlap_add` is the same computation on a whole tensor.
"""

from __future__ import annotations

from typing import Callable

import torch


class StreamingOverlapAdd:
    """Run ``process`` over overlapping chunks of a signal that arrives in blocks and cross-fade the results.

    Blocks are ``[..., n]``. ``process`` takes a batch ``[N, ..., chunk_samples]`` and returns
    ``[N, ..., chunk_samples]``. At most ``batch_size`` chunks are processed at once, and only
    about ``chunk_samples + batch_size * stride`` input samples are held, so memory is bounded
    whatever the length. Chunks start every ``chunk_samples * (1 - overlap)`` samples; the
    last one is zero-padded. Each output sample is the weighted mean of the chunks covering
    it, with triangular weights that are largest at a chunk's centre, so seams are smooth.
    The chunks, their batches and the order of the sums do not depend on how the signal is
    cut into blocks: the concatenated output equals :func:`overlap_add` on the whole signal.
    """

    def __init__(self, process: Callable[[torch.Tensor], torch.Tensor], chunk_samples: int, overlap: float = 0.25, batch_size: int = 8):
        if chunk_samples <= 0:
            raise ValueError(f"chunk_samples must be positive, got {chunk_samples}")
        if not 0 <= overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.process, self.chunk, self.batch_size = process, chunk_samples, batch_size
        self.stride = max(1, int(round(chunk_samples * (1 - overlap))))
        ramp = torch.arange(1, chunk_samples + 1, dtype=torch.float32)
        self.weight = torch.minimum(ramp, ramp.flip(0))  # triangular, strictly positive
        self.total = 0  # input samples received
        self.offset = 0  # signal index of input[..., 0], output[..., 0] and weight_sum[0]
        self.next_start = 0  # first chunk start not yet queued
        self.queued: list[int] = []  # chunk starts waiting for a full batch
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.weight_sum: torch.Tensor | None = None
        self.finished = False

    def push(self, block: torch.Tensor) -> torch.Tensor:
        """Add input samples; returns the output samples ``[..., m]`` that are final (``m`` may be 0)."""
        if self.finished:
            raise RuntimeError("push after finish")
        self.input = block if self.input is None else torch.cat([self.input, block], dim=-1)
        self.total += block.shape[-1]
        while self.next_start + self.chunk <= self.total:
            self._queue(self.next_start)
        return self._emit(self.queued[0] if self.queued else self.next_start)

    def finish(self) -> torch.Tensor:
        """The rest of the output after the last block (the zero-padded last chunk included)."""
        if self.total == 0:
            raise ValueError("cannot process a zero-length signal")
        self.finished = True
        if self.next_start == 0:  # shorter than one chunk
            self._queue(0)
        if self.next_start - self.stride + self.chunk < self.total:
            self._queue(self.next_start)
        while self.queued:
            self._run(self.queued[: self.batch_size])
        return self._emit(self.total)

    def _queue(self, start: int) -> None:
        self.queued.append(start)
        self.next_start = start + self.stride
        if len(self.queued) == self.batch_size:
            self._run(self.queued)

    def _run(self, starts: list[int]) -> None:
        assert self.input is not None
        chunks = []
        for start in starts:
            piece = self.input[..., start - self.offset : start - self.offset + self.chunk]
            if piece.shape[-1] < self.chunk:
                piece = torch.nn.functional.pad(piece, (0, self.chunk - piece.shape[-1]))
            chunks.append(piece)
        results = self.process(torch.stack(chunks))
        if results.shape[-1] != self.chunk or results.shape[0] != len(starts):
            raise ValueError(f"process returned shape {tuple(results.shape)}, expected [{len(starts)}, ..., {self.chunk}]")
        device = self.input.device
        weight = self.weight.to(device)
        end = min(starts[-1] + self.chunk, self.total) - self.offset
        if self.output is None:
            self.output = torch.zeros(*results.shape[1:-1], 0, dtype=results.dtype, device=device)
            self.weight_sum = torch.zeros(0, dtype=torch.float32, device=device)
        grow = end - self.output.shape[-1]
        if grow > 0:
            self.output = torch.cat([self.output, self.output.new_zeros(*self.output.shape[:-1], grow)], dim=-1)
            self.weight_sum = torch.cat([self.weight_sum, self.weight_sum.new_zeros(grow)])
        for start, result in zip(starts, results):
            keep = min(self.chunk, self.total - start)
            at = start - self.offset
            self.output[..., at : at + keep] += result[..., :keep] * weight[:keep].to(result.dtype)
            self.weight_sum[at : at + keep] += weight[:keep]
        del self.queued[: len(starts)]

    def _emit(self, final_until: int) -> torch.Tensor:
        """Return the output before signal index ``final_until`` and drop what is no longer needed."""
        count = final_until - self.offset
        if self.output is None or count <= 0:
            return self._empty()
        done = self.output[..., :count] / self.weight_sum[:count].to(self.output.dtype)
        self.output, self.weight_sum = self.output[..., count:], self.weight_sum[count:]
        assert self.input is not None
        self.input = self.input[..., count:]
        self.offset = final_until
        return done

    def _empty(self) -> torch.Tensor:
        if self.output is not None:
            return self.output[..., :0]
        return torch.zeros(0)


def overlap_add(
    process: Callable[[torch.Tensor], torch.Tensor],
    signal: torch.Tensor,
    chunk_samples: int,
    overlap: float = 0.25,
    batch_size: int = 8,
) -> torch.Tensor:
    """Run ``process`` over overlapping chunks of ``signal`` ``[..., T]`` and cross-fade the results.

    The whole-signal form of :class:`StreamingOverlapAdd` (see there). With ``process`` the
    identity, the output equals the input.
    """
    if signal.shape[-1] == 0:
        raise ValueError("cannot process a zero-length signal")
    stream = StreamingOverlapAdd(process, chunk_samples, overlap, batch_size)
    head = stream.push(signal)
    return torch.cat([head, stream.finish()], dim=-1) if head.numel() else stream.finish()
