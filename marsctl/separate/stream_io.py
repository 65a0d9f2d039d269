"""Writing a live separation to files as it goes (the work of ``marsctl separate --stream``).

Two files per stream, ``<out>/<input stem>/<query>.wav`` (the current estimate) and
``<query>.refined.wav`` (the refined one), 32-bit float WAV at the separator's rate, grow by a
hop at a time. They are written under their final names, not renamed at the end as batch outputs
are, because they are meant to be read while they grow; instead libsndfile rewrites the header
after every write, so whenever the stream is cut (the input ends or breaks off, Ctrl-C,
SIGTERM, even SIGKILL or a power cut) both files are valid WAV holding every hop written so far.
A cut the program sees (end of input, a broken input, Ctrl-C, SIGTERM) also gets the final
estimate of the samples received but not yet written (:meth:`SeparationStream.finish`).

The input is read on a thread of its own and handed over through a queue, so that a live source
is drained while a hop is being separated and a stop request is seen within
:data:`STOP_POLL_SECONDS` even while the input is silent.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

import soundfile as sf
import torch

from marsctl.errors import MarsctlError
from marsctl.separate.stream import SeparationStream, StreamTiming

#: libsndfile's command to rewrite the header after every write (sndfile.h SFC_SET_UPDATE_HEADER_AUTO)
_SFC_SET_UPDATE_HEADER_AUTO = 0x1061
#: how often the loop looks at the stop request while it waits for input
STOP_POLL_SECONDS = 0.1


class LiveWav:
    """A mono 32-bit float WAV that is a valid file after every :meth:`write`."""

    def __init__(self, path: Path, sample_rate: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.handle = sf.SoundFile(str(path), "w", sample_rate, 1, subtype="FLOAT", format="WAV")
        self.frames = 0
        # soundfile has no public call for it; its cffi handle is libsndfile's own sf_command
        if not sf._snd.sf_command(self.handle._file, _SFC_SET_UPDATE_HEADER_AUTO, sf._ffi.NULL, sf._snd.SF_TRUE):
            self.handle.close()
            raise MarsctlError(f"{path}: this libsndfile cannot keep a WAV header up to date while writing")

    def write(self, samples: torch.Tensor) -> None:
        if samples.numel():
            self.handle.write(samples.numpy())
            self.frames += samples.shape[-1]

    def close(self) -> None:
        self.handle.close()


@dataclasses.dataclass
class StreamReport:
    current: Path
    refined: Path
    #: seconds of input separated (at the separator's rate)
    seconds: float = 0.0
    #: seconds from the first block read to the last sample written
    wall_seconds: float = 0.0
    timing: StreamTiming = dataclasses.field(default_factory=StreamTiming)
    #: stopped on request (Ctrl-C, SIGTERM) before the input ended
    stopped: bool = False
    #: why the input broke off, if it did
    error: str | None = None

    @property
    def real_time_factor(self) -> float:
        """Wall-clock compute seconds per second of input (below 1: faster than real time)."""
        return self.timing.total / self.seconds if self.seconds else 0.0

    @property
    def cpu_real_time_factor(self) -> float:
        """CPU seconds per second of input (what the separation cost, whatever else the machine ran)."""
        return self.timing.cpu_total / self.seconds if self.seconds else 0.0


def stream_paths(out_dir: Path, stem: str, query_stem: str) -> tuple[Path, Path]:
    folder = out_dir / stem
    return folder / f"{query_stem}.wav", folder / f"{query_stem}.refined.wav"


def check_stream_outputs(paths: Iterable[Path], overwrite: bool) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise MarsctlError(f"{existing[0]} exists; use --overwrite to replace it (a stream's outputs are written under their final names)")


def stream_to_files(stream: SeparationStream, blocks: Iterable[torch.Tensor], current: Path, refined: Path, *,
                    stop: threading.Event | None = None, on_hop: Callable[[StreamReport], None] | None = None) -> StreamReport:
    """Separate ``blocks`` (mono, at the stream's input rate) live into the two files; see the module docstring.

    ``stop``, once set, ends the stream as if the input had ended. A broken input (an
    :class:`~marsctl.errors.MarsctlError` while reading) ends it too, with the reason in
    ``report.error``. ``on_hop`` is called after each write."""
    stop = stop or threading.Event()
    report = StreamReport(current, refined)
    items: queue.Queue = queue.Queue()
    done = object()

    def read() -> None:
        try:
            for block in blocks:
                items.put(block)
                if stop.is_set():
                    break
        except MarsctlError as exc:
            items.put(exc)
        except OSError as exc:
            items.put(MarsctlError(f"{getattr(exc, 'filename', None) or 'input'}: the stream broke off ({exc.strerror or exc})"))
        finally:
            items.put(done)

    writers = [LiveWav(current, stream.sample_rate)]
    try:
        writers.append(LiveWav(refined, stream.sample_rate))
        threading.Thread(target=read, daemon=True, name="marsctl-stream-reader").start()
        started = None
        while not stop.is_set():
            try:
                item = items.get(timeout=STOP_POLL_SECONDS)
            except queue.Empty:
                continue
            if item is done:
                break
            if isinstance(item, MarsctlError):
                report.error = str(item)
                break
            started = started or time.monotonic()
            _write(writers, stream.push(item), report, stream)
            if on_hop is not None:
                on_hop(report)
        report.stopped = stop.is_set()
        while report.stopped:  # what was read before the stop request is separated too
            try:
                item = items.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, torch.Tensor):
                _write(writers, stream.push(item), report, stream)
        _write(writers, stream.finish(), report, stream)
        report.wall_seconds = time.monotonic() - started if started else 0.0
    finally:
        for writer in writers:
            writer.close()
    return report


def _write(writers: list[LiveWav], pair: tuple[torch.Tensor, torch.Tensor], report: StreamReport, stream: SeparationStream) -> None:
    for writer, samples in zip(writers, pair):
        writer.write(samples.reshape(-1) if samples.ndim > 1 and samples.shape[0] == 1 else samples)
    report.seconds = writers[0].frames / stream.sample_rate
    report.timing = stream.timing
