"""Separating batches of files into an output folder (the work of ``marsctl separate``).

* Each input gets ``<out>/<path relative to the folder given, without suffix>/<name>.wav``
  (``.flac`` with ``format="flac"``; and ``<name>.residual.wav`` = mixture - estimate with
  ``residual``), mono (channels averaged), at the input's rate unless ``sample_rate`` is given
  (the separator runs at its own rate; its estimate is resampled back), ``<name>`` being
  :meth:`Query.output_stem`; two different queries of one run that would share a name both
  get the hash. No output ever leaves ``out``: an input whose output folder would (a mapping
  row ``../x.wav``) fails with one line. Existing outputs are kept unless ``overwrite``; a
  missing residual is written with its estimate (both rewritten), so that estimate + residual is
  always the mixture.
* An output that is not finite (NaN/Inf: an input beyond what float32 audio holds) fails the file;
  nothing is written for it.
* Files are streamed: read in blocks (:func:`marsctl.audio.open_audio_stream`), separated
  chunk by chunk (:func:`marsctl.separate.apply.apply_separator`) and written block by block
  to temporary names that are renamed when the file is done, so memory stays flat with length
  and no half-written output is left under a final name.
* A file that fails (missing, unreadable, corrupt, not audio, output not writable) is recorded
  with a one-line reason and the batch goes on; a query that cannot be embedded (a missing
  query image) is reported once, not once per file.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import glob
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import soundfile as sf
import torch

from marsctl.audio import StreamingResampler, is_audio_path, open_audio_stream
from marsctl.errors import AudioError, MarsctlError
from marsctl.files import atomic_path
from marsctl.models.encoder_base import QueryEncoder
from marsctl.models.separator import LoadedSeparator
from marsctl.separate.apply import SeparateOptions, apply_with_options, mixture_level_gain
from marsctl.separate.inputs import InputFile
from marsctl.separate.queries import Query, embed_query

#: called with (file, seconds done, seconds in the file) while a file is separated
ProgressCallback = Callable[[Path, float, float], None]


@dataclasses.dataclass
class SeparationReport:
    written: list[Path] = dataclasses.field(default_factory=list)
    kept_existing: list[Path] = dataclasses.field(default_factory=list)
    skipped_non_audio: list[Path] = dataclasses.field(default_factory=list)
    failures: list[tuple[Path, str]] = dataclasses.field(default_factory=list)


def check_output_folder(out_dir: Path) -> None:
    """Create ``out_dir`` and check that files can be written in it; one line otherwise."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except FileExistsError:
        raise MarsctlError(f"--out {out_dir}: exists and is not a folder") from None
    except OSError as exc:
        reason = "permission denied" if isinstance(exc, PermissionError) else (exc.strerror or str(exc))
        raise MarsctlError(f"--out {out_dir}: cannot write there ({reason})") from None


def output_names(queries: Iterable[Query]) -> dict[Query, str]:
    """The output stem of every query of a run; queries that would share a stem get the hash."""
    by_stem: dict[str, set[Query]] = collections.defaultdict(set)
    for query in queries:
        by_stem[query.output_stem()].add(query)
    return {q: q.output_stem(hashed=len(same) > 1) for same in by_stem.values() for q in same}


def output_paths(options: SeparateOptions, item: InputFile, stem: str) -> tuple[Path, Path]:
    """The estimate and residual paths of ``item``; raises when they would be outside ``options.out_dir``."""
    root = options.out_dir.resolve()
    folder = (root / item.relative).resolve()
    if not folder.is_relative_to(root):
        raise MarsctlError(f"{item.path}: its outputs would be written outside --out {options.out_dir} ({options.out_dir / item.relative}); nothing written")
    folder = options.out_dir / folder.relative_to(root)
    return folder / f"{stem}.{options.format}", folder / f"{stem}.residual.{options.format}"


@dataclasses.dataclass
class _Output:
    query: Query
    target: Path | None  # None: keep the existing estimate
    residual: Path | None
    #: the query's key in the embeddings: the query, or (query, file) for a span of that file
    key: object = None


def separate_jobs(
    model: LoadedSeparator,
    encoder: QueryEncoder,
    jobs: Iterable[tuple[InputFile, Query]],
    options: SeparateOptions,
    on_file: Callable[[Path], None] | None = None,
    on_progress: ProgressCallback | None = None,
) -> SeparationReport:
    """Run every (file, query) job, grouped by file; see the module docstring."""
    report = SeparationReport()
    sample_rate = model.model.config.signal.sample_rate
    by_file: dict[Path, list[tuple[InputFile, Query]]] = {}
    for item, query in jobs:
        by_file.setdefault(item.path, []).append((item, query))
    names = output_names(q for file_jobs in by_file.values() for _, q in file_jobs)
    embeddings: dict[object, torch.Tensor] = {}
    failed_queries: set[Query] = set()
    claimed: dict[Path, Path] = {}
    for index, (path, file_jobs) in enumerate(by_file.items()):
        try:
            todo = []
            for item, query in file_jobs:
                target, residual = output_paths(options, item, names[query])
                owner = claimed.setdefault(target, path)
                if owner != path:
                    raise MarsctlError(f"output {target} would also be written for {owner}; rename one of the inputs")
                new_residual = options.residual and (options.overwrite or not residual.exists())
                # a new residual comes with its estimate: an older estimate (another seed, model or
                # setting) beside it would not sum with it to the mixture
                new_target = options.overwrite or not target.exists() or new_residual
                if not new_target:
                    report.kept_existing.append(target)
                if not (new_target or new_residual) or query in failed_queries:
                    continue
                key = (query, path) if query.spans else query
                if query.spans:  # taken from this file: a failure is this file's
                    embeddings[key] = embed_query(encoder, query, sample_rate, mixture=path)
                elif key not in embeddings:
                    try:
                        embeddings[key] = embed_query(encoder, query, sample_rate)
                    except MarsctlError as exc:  # reported once for the query, not for every file
                        failed_queries.add(query)
                        report.failures.append((Path(names[query]), f"query {names[query]}: {exc}"))
                        continue
                todo.append(_Output(query, target if new_target else None, residual if new_residual else None, key))
            if todo:
                if not is_audio_path(path) and path.exists() and not path.is_dir():
                    raise AudioError(path, f"not an audio file (suffix '{path.suffix}' is not a supported audio or video format)")
                progress = None if on_progress is None else (lambda done, total, p=path: on_progress(p, done, total))
                report.written += _separate_file(model, encoder, path, todo, embeddings, options, options.seed + index, progress)
        except MarsctlError as exc:
            report.failures.append((path, str(exc) if str(path) in str(exc) else f"{path}: {exc}"))
        except (OSError, sf.SoundFileError) as exc:
            where = getattr(exc, "filename", None) or path
            reason = "permission denied" if isinstance(exc, PermissionError) else (getattr(exc, "strerror", None) or str(exc).splitlines()[0])
            if _disk_full(exc, options.out_dir):  # libsndfile says only "System error."
                where, reason = options.out_dir, "no space left on the device: the disk is full"
            report.failures.append((path, f"{path}: cannot write its outputs ({where}: {reason})"))
        if on_file is not None:
            on_file(path)
    return report


def _separate_file(
    model: LoadedSeparator, encoder: QueryEncoder, path: Path, todo: list[_Output], embeddings: dict[Query, torch.Tensor],
    options: SeparateOptions, seed: int, progress: Callable[[float, float], None] | None,
) -> list[Path]:
    """Stream one file through the separator into its outputs; returns the paths written.

    The file is read (channels averaged) at the output rate (``options.sample_rate``, or its own),
    resampled to the model's rate for the separator, and the estimates resampled back, so that a
    residual is the mixture at the output rate minus the estimate. At the model's rate both
    resamplers are the identity."""
    model_rate = model.model.config.signal.sample_rate
    stream = open_audio_stream(path, options.sample_rate)  # None: the file's own rate
    rate = stream.sample_rate
    to_model, from_model = StreamingResampler(rate, model_rate), StreamingResampler(model_rate, rate)
    mixture_lag: collections.deque[torch.Tensor] = collections.deque()  # mixture blocks not yet matched by estimates
    done = 0

    def blocks() -> Iterator[torch.Tensor]:
        nonlocal done
        for block in stream:
            mixture_lag.append(block)
            yield to_model.push(block)
            done += block.shape[-1]
            if progress is not None:
                progress(done / rate, max(stream.duration, done / rate))
        yield to_model.finish()
        if progress is not None:
            progress(done / rate, done / rate)  # read to the end: the file's length is now known

    def at_output_rate(estimates: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Estimate blocks ``[K, m]`` resampled to the output rate, cut to the mixture's length."""
        if from_model.identity:
            yield from estimates
            return
        resamplers = [StreamingResampler(model_rate, rate) for _ in todo]
        emitted = 0
        for block in estimates:
            if block.shape[-1]:
                out = torch.stack([r.push(channel) for r, channel in zip(resamplers, block)])
                emitted += out.shape[-1]
                yield out
        tail = torch.stack([r.finish() for r in resamplers])[:, : max(done - emitted, 0)]
        yield tail
        if emitted + tail.shape[-1] < done:  # a rounding short of the mixture: pad with silence
            yield torch.zeros(len(todo), done - emitted - tail.shape[-1])

    queries = torch.stack([embeddings[o.query if o.key is None else o.key] for o in todo])
    gain = _level_gain(model.model, path, options, rate, model_rate) if options.normalize_level else None
    estimates = at_output_rate(apply_with_options(model.model, (b for b in blocks() if b.numel()), queries, options, seed, encoder, gain))
    finals = [p for o in todo for p in (o.target, o.residual) if p is not None]
    subtype, container = options.output_subtype, options.format.upper()
    pcm = subtype.startswith("PCM")
    for final in finals:  # what a killed run left for these outputs (32 MB a minute of float WAV)
        remove_stale_temporaries(final)
    with contextlib.ExitStack() as stack:
        temporary = {final: stack.enter_context(atomic_path(final)) for final in finals}
        files = {final: stack.enter_context(sf.SoundFile(str(tmp), "w", rate, 1, subtype=subtype, format=container)) for final, tmp in temporary.items()}
        for block in estimates:
            if not from_model.identity:  # never past the mixture read so far
                block = block[:, : min(block.shape[-1], _lag_samples(mixture_lag))]
            mixture = _take(mixture_lag, block.shape[-1])
            if not bool(torch.isfinite(block).all()):  # never a NaN/Inf output under a final name
                raise AudioError(path, "the separated audio is not finite (NaN or Inf; the input's level is beyond what "
                                       "float32 audio holds?); nothing written for this file")
            for output, estimate in zip(todo, block):
                if output.target is not None:
                    files[output.target].write(_for_subtype(estimate, pcm))
                if output.residual is not None:
                    files[output.residual].write(_for_subtype(mixture - estimate, pcm))
    return finals


def _disk_full(exc: BaseException, out_dir: Path) -> bool:
    if getattr(exc, "errno", None) == errno.ENOSPC:
        return True
    try:
        return isinstance(exc, sf.SoundFileError) and shutil.disk_usage(out_dir).free < (1 << 20)
    except OSError:
        return False


def remove_stale_temporaries(final: Path) -> None:
    """Remove the temporary files a killed run left for ``final`` (``atomic_path``'s
    ``.<stem>.<8 characters>.tmp<suffix>`` beside it); nothing else is touched."""
    pattern = re.compile(rf"^\.{re.escape(final.stem)}\.[a-z0-9_]{{8}}\.tmp{re.escape(final.suffix)}$")
    with contextlib.suppress(OSError):
        for leftover in final.parent.glob(f".{glob.escape(final.stem)}.*.tmp{glob.escape(final.suffix)}"):
            if pattern.match(leftover.name) and leftover.is_file() and not leftover.is_symlink():
                leftover.unlink(missing_ok=True)


def _level_gain(model, path: Path, options: SeparateOptions, rate: int, model_rate: int) -> float:
    """The file's :func:`~marsctl.separate.apply.mixture_level_gain`, from a first streamed pass over it."""
    resampler = StreamingResampler(rate, model_rate)

    def blocks() -> Iterator[torch.Tensor]:
        for block in open_audio_stream(path, options.sample_rate):
            yield resampler.push(block)
        yield resampler.finish()

    return mixture_level_gain(model, blocks())


def _for_subtype(wave: torch.Tensor, pcm: bool) -> np.ndarray:
    """The samples to write: as they are for float files; clipped to full scale for integer (PCM) ones."""
    return wave.clamp(-1.0, 1.0).numpy() if pcm else wave.numpy()


def _lag_samples(lag: collections.deque[torch.Tensor]) -> int:
    return sum(block.shape[-1] for block in lag)


def _take(lag: collections.deque[torch.Tensor], count: int) -> torch.Tensor:
    """The next ``count`` mixture samples from the queue of blocks read but not yet written."""
    parts = []
    while count > 0:
        head = lag.popleft()
        parts.append(head[:count])
        if head.shape[-1] > count:
            lag.appendleft(head[count:])
        count -= parts[-1].shape[-1]
    return torch.cat(parts) if parts else torch.zeros(0)
