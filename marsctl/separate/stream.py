"""Live separation with a bounded latency, and a second stream that refines the past
(``marsctl separate --stream``, :meth:`marsctl.Separator.stream`).

The signal arrives in blocks of any size. Every ``hop`` samples (a *hop boundary* ``t``) the
separator runs once, on the window of the last ``window`` samples ``[t - window, t)``. These
windows are exactly the chunks of the offline overlap-add (:class:`marsctl.audio.StreamingOverlapAdd`)
with ``chunk_samples = window`` and a stride of one hop (``overlap = 1 - hop / window``), and an
estimate of a sample is, as offline, the triangular-weighted mean of the windows that cover it,
**taken over the windows computed so far**. So each sample is re-estimated by every later window
that still covers it, with more future context each time, and the mean of these re-estimates is
the memory: no new model.

Two streams come out, each a hop at a time:

* the *current* stream: at boundary ``t`` the hop ``[t - latency, t - latency + hop)``, so no
  sample waits longer than ``latency`` (a whole number of hops, at least one; the lookahead the
  estimate of a hop's last sample has is ``latency - hop``);
* the *refined* stream: the same hop ``refine_hops`` boundaries later, with that many more
  windows merged in. Once ``latency + refine_hops * hop >= window`` every window that covers the
  hop is in, and the refined stream is the offline result (the default ``refine_hops``).

During the first ``window`` samples no full window exists yet: the window ``[0, window)`` is run on
the samples so far, zero-padded on the right (as offline pads its last chunk), and used for what
is emitted at that boundary only. At the end of the stream (:meth:`LiveSeparation.finish`) the last,
zero-padded chunk of the offline overlap-add is run and every sample not yet emitted gets its final
estimate in both streams. Hence: with ``latency >= window`` the current stream *is* the offline
result, and neither stream depends on how the input was cut into blocks (the work is done at hop
boundaries, one window at a time).

Compute is at most one separator pass per hop (during the first ``window`` samples, one for each
hop boundary where something is due); the
worst case over the hops of a stream is in :attr:`LiveSeparation.timing`. BENCHMARKS.md section 14
has the quality against latency and the per-hop compute on the CPU.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import torch

from marsctl.errors import ConfigError

#: seconds between two separator passes (a pass of the shipped model on a 2 s window takes well under this on one core)
DEFAULT_HOP_SECONDS = 0.25
#: seconds from a sample's arrival to its first estimate
DEFAULT_LATENCY_SECONDS = 0.5
#: decodes a stream can use (the sampled ones would draw differently with each window)
STREAM_DECODES = ("mode", "mean")


@dataclasses.dataclass(frozen=True)
class StreamSettings:
    """The sizes of a live separation, in samples (:func:`stream_settings` builds them from seconds)."""

    hop: int
    window: int
    latency: int
    refine_hops: int

    @property
    def refined_delay(self) -> int:
        """Samples from a sample's arrival to its refined estimate."""
        return self.latency + self.refine_hops * self.hop


def _whole_hops(name: str, seconds: float, hop: int, sample_rate: int) -> int:
    hops = seconds * sample_rate / hop
    if not math.isfinite(hops) or hops < 1 - 1e-9 or abs(hops - round(hops)) > 1e-6:
        raise ConfigError(f"{name} {seconds:g}: must be a whole number (at least 1) of hops of {hop / sample_rate:g} s")
    return int(round(hops))


def stream_settings(sample_rate: int, segment_samples: int, *, latency: float = DEFAULT_LATENCY_SECONDS, hop: float = DEFAULT_HOP_SECONDS,
                    window: float | None = None, refine_hops: int | None = None) -> StreamSettings:
    """Settings from seconds. ``window`` defaults to the model's training segment rounded down to whole
    hops; ``refine_hops`` to the hops after which the refined stream is final (the offline result)."""
    if not (math.isfinite(hop) and hop > 0) or round(hop * sample_rate) < 1:
        raise ConfigError(f"--hop {hop:g}: expected a positive number of seconds (e.g. {DEFAULT_HOP_SECONDS})")
    hop_samples = int(round(hop * sample_rate))
    if window is None:
        window_hops = max(1, segment_samples // hop_samples)
    else:
        window_hops = _whole_hops("--window", window, hop_samples, sample_rate)
    window_samples = window_hops * hop_samples
    latency_hops = _whole_hops("--latency", latency, hop_samples, sample_rate)
    full = max(0, window_hops - latency_hops)  # hops until every window covering a hop is in
    if refine_hops is None:
        refine_hops = full
    elif refine_hops < 0:
        raise ConfigError(f"--refine-hops {refine_hops}: expected 0 or more")
    return StreamSettings(hop_samples, window_samples, latency_hops * hop_samples, int(refine_hops))


@dataclasses.dataclass
class StreamTiming:
    """Compute of the hop boundaries handled so far, in seconds: wall clock, and CPU time of the
    process (what the hop cost, whatever else the machine was running meanwhile)."""

    hops: int = 0
    total: float = 0.0
    worst: float = 0.0
    cpu_total: float = 0.0
    cpu_worst: float = 0.0
    #: hops whose wall-clock compute took longer than a hop lasts (a live input would have dropped out)
    late: int = 0

    def add(self, seconds: float, cpu_seconds: float, hop_seconds: float) -> None:
        self.hops += 1
        self.total += seconds
        self.worst = max(self.worst, seconds)
        self.cpu_total += cpu_seconds
        self.cpu_worst = max(self.cpu_worst, cpu_seconds)
        self.late += seconds > hop_seconds


class LiveSeparation:
    """The engine behind :meth:`marsctl.Separator.stream` (see the module docstring).

    ``process`` maps windows ``[N, window]`` to estimates ``[N, K, window]`` (the separator with
    ``K`` queries). :meth:`push` takes blocks ``[n]`` and returns ``(current, refined)``, each
    ``[K, m]`` (``m`` a multiple of the hop, possibly 0); :meth:`finish` returns the rest.
    Everything :meth:`push` and :meth:`finish` returned, concatenated, covers the input once in
    each stream.
    """

    def __init__(self, process: Callable[[torch.Tensor], torch.Tensor], settings: StreamSettings, outputs: int, sample_rate: int):
        self.process, self.settings, self.outputs, self.sample_rate = process, settings, outputs, sample_rate
        ramp = torch.arange(1, settings.window + 1, dtype=torch.float32)
        self.weight = torch.minimum(ramp, ramp.flip(0))  # StreamingOverlapAdd's
        self.total = 0  # samples received
        self.boundary = settings.hop  # next hop boundary to handle
        self.next_start = 0  # first window start not yet run
        self.input = torch.zeros(0)  # samples from input_offset on
        self.input_offset = 0
        self.sums = torch.zeros(outputs, 0)  # weighted sums of the windows run, from sums_offset on
        self.weights = torch.zeros(0)
        self.sums_offset = 0
        self.emitted = [0, 0]  # samples returned in the current and the refined stream
        self.finished = False
        self.timing = StreamTiming()

    # --- the two streams --------------------------------------------------------------------
    def push(self, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add samples ``[n]``; returns the hops of both streams that are due."""
        if self.finished:
            raise RuntimeError("push after finish")
        block = torch.as_tensor(block, dtype=torch.float32).reshape(-1).cpu()
        self.input = torch.cat([self.input, block])
        self.total += block.shape[0]
        out: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        while self.boundary <= self.total:
            started, cpu_started = time.perf_counter(), time.process_time()
            for stream, part in enumerate(self._boundary(self.boundary)):
                out[stream].append(part)
            self.timing.add(time.perf_counter() - started, time.process_time() - cpu_started, self.settings.hop / self.sample_rate)
            self.boundary += self.settings.hop
            self._trim()
        return self._joined(out[0]), self._joined(out[1])

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the offline overlap-add's last, zero-padded window and return the final estimate of
        every sample not yet emitted, in both streams."""
        if self.finished:
            raise RuntimeError("finish called twice")
        self.finished = True
        if self.total == 0:
            return torch.zeros(self.outputs, 0), torch.zeros(self.outputs, 0)
        hop, window = self.settings.hop, self.settings.window
        if self.next_start == 0 or self.next_start - hop + window < self.total:  # StreamingOverlapAdd.finish's rule
            self._run(self.next_start)
        return tuple(self._final(self.emitted[i], self.total, i) for i in range(2))  # type: ignore[return-value]

    # --- one hop boundary ---------------------------------------------------------------------
    def _boundary(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.settings
        while self.next_start + s.window <= t:  # the window [t - window, t); one per boundary
            self._run(self.next_start)
        provisional = None
        current_start = t - s.latency
        refined_start = current_start - s.refine_hops * s.hop
        parts = []
        for stream, start in enumerate((current_start, refined_start)):
            end = start + s.hop
            lo = max(self.emitted[stream], start, 0)
            if end <= lo:
                parts.append(torch.zeros(self.outputs, 0))
                continue
            if t < s.window:  # no full window yet: [0, window) on what has arrived, zero-padded
                if provisional is None:
                    piece = torch.nn.functional.pad(self.input[: t - self.input_offset], (0, s.window - t))
                    provisional = self.process(piece[None])[0].float()
                parts.append(provisional[:, lo:end].clone())
            else:
                parts.append(self._estimate(lo, end))
            self.emitted[stream] = end
        return parts[0], parts[1]

    def _run(self, start: int) -> None:
        """Run the window at ``start`` (zero-padded past the input) and add it to the sums."""
        s = self.settings
        at = start - self.input_offset
        piece = self.input[at : at + s.window]
        keep = piece.shape[0]
        if keep < s.window:
            piece = torch.nn.functional.pad(piece, (0, s.window - keep))
        result = self.process(piece[None])
        if result.shape != (1, self.outputs, s.window):
            raise ValueError(f"process returned shape {tuple(result.shape)}, expected [1, {self.outputs}, {s.window}]")
        end = start + keep - self.sums_offset
        grow = end - self.sums.shape[-1]
        if grow > 0:
            self.sums = torch.cat([self.sums, self.sums.new_zeros(self.outputs, grow)], dim=-1)
            self.weights = torch.cat([self.weights, self.weights.new_zeros(grow)])
        at = start - self.sums_offset
        self.sums[:, at : at + keep] += result[0, :, :keep].float() * self.weight[:keep]
        self.weights[at : at + keep] += self.weight[:keep]
        self.next_start = start + s.hop

    def _estimate(self, lo: int, hi: int) -> torch.Tensor:
        a, b = lo - self.sums_offset, hi - self.sums_offset
        return self.sums[:, a:b] / self.weights[a:b]

    def _final(self, lo: int, hi: int, stream: int) -> torch.Tensor:
        self.emitted[stream] = max(self.emitted[stream], hi)
        return self._estimate(lo, hi) if hi > lo else torch.zeros(self.outputs, 0)

    def _trim(self) -> None:
        """Drop the input no window will read and the sums both streams have emitted."""
        keep_input = min(self.next_start, self.total)
        if self.boundary <= self.settings.window:
            keep_input = 0  # the provisional window reads from 0
        if keep_input > self.input_offset:
            self.input = self.input[keep_input - self.input_offset :]
            self.input_offset = keep_input
        done = min(*self.emitted, self.next_start)  # later windows add to the sums from next_start on
        if done > self.sums_offset:
            cut = min(done - self.sums_offset, self.sums.shape[-1])
            self.sums, self.weights = self.sums[:, cut:], self.weights[cut:]
            self.sums_offset += cut

    def _joined(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts, dim=-1) if parts else torch.zeros(self.outputs, 0)

    # --- what has been emitted ----------------------------------------------------------------
    @property
    def current_samples(self) -> int:
        return self.emitted[0]

    @property
    def refined_samples(self) -> int:
        return self.emitted[1]


def check_stream_decode(decode: str) -> None:
    if decode not in STREAM_DECODES:
        raise ConfigError(f"--decode {decode}: a stream uses {' or '.join(STREAM_DECODES)} (sampled decodes would draw anew in every window)")


class SeparationStream:
    """A live separation with a separator and its queries (what :meth:`marsctl.Separator.stream` returns).

    ``push(block)`` takes the next samples (``[n]``, or ``[channels, n]``, averaged) at the rate
    the stream was opened with and returns ``(current, refined)``: the estimates that are due, at
    :attr:`sample_rate` (``[m]`` tensors for one query, ``[K, m]`` for several). ``finish()``
    returns the rest once the input has ended. :attr:`timing` has the compute per hop.
    """

    def __init__(self, model, queries: torch.Tensor, settings: StreamSettings, *, decode: str = "mode",
                 input_rate: int | None = None, squeeze: bool = True):
        from marsctl.audio import StreamingResampler

        check_stream_decode(decode)
        self.model, self.settings, self.squeeze = model, settings, squeeze
        self.sample_rate = model.config.signal.sample_rate
        device = next(model.parameters()).device
        vectors = queries.to(device)

        @torch.no_grad()
        def process(windows: torch.Tensor) -> torch.Tensor:  # [1, window] -> [1, K, window]
            q = vectors.unsqueeze(0).expand(windows.shape[0], -1, -1)
            return model.separate(windows.to(device), q, decode=decode).cpu()

        self.engine = LiveSeparation(process, settings, vectors.shape[0], self.sample_rate)
        self.resampler = StreamingResampler(int(input_rate or self.sample_rate), self.sample_rate)

    @property
    def latency(self) -> float:
        """Seconds from a sample's arrival to its first estimate."""
        return self.settings.latency / self.sample_rate

    @property
    def hop(self) -> float:
        return self.settings.hop / self.sample_rate

    @property
    def refined_delay(self) -> float:
        """Seconds from a sample's arrival to its refined estimate."""
        return self.settings.refined_delay / self.sample_rate

    @property
    def timing(self) -> StreamTiming:
        return self.engine.timing

    def push(self, block) -> tuple[torch.Tensor, torch.Tensor]:
        wave = torch.as_tensor(block, dtype=torch.float32)
        if wave.ndim == 2:
            wave = wave.mean(dim=0)
        if wave.ndim != 1:
            raise ConfigError(f"expected a block [n] or [channels, n], got shape {tuple(wave.shape)}")
        return self._shaped(self.engine.push(self.resampler.push(wave.cpu())))

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        tail = self.resampler.finish()
        current, refined = self.engine.push(tail) if tail.numel() else (torch.zeros(self.engine.outputs, 0),) * 2
        last_current, last_refined = self.engine.finish()
        return self._shaped((torch.cat([current, last_current], dim=-1), torch.cat([refined, last_refined], dim=-1)))

    def _shaped(self, pair: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return (pair[0][0], pair[1][0]) if self.squeeze else pair
