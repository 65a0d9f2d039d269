"""Separating batches of files into an output folder (the work of ``marsctl separate``).

* Each input gets ``<out>/<path relative to the folder given, without suffix>/<name>.wav``
  (and ``<name>.residual.wav`` = mixture - estimate with ``residual``), ``<name>`` being
  :meth:`Query.output_stem`; two different queries of one run that would share a name both
  get the hash. No output ever leaves ``out``: an input whose output folder would (a mapping
  row ``../x.wav``) fails with one line. Existing outputs are kept unless ``overwrite``; a
  missing residual is added without rewriting the estimate beside it.
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
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

import soundfile as sf
import torch

from marsctl.audio import is_audio_path, open_audio_stream
from marsctl.errors import AudioError, MarsctlError
from marsctl.files import atomic_path
from marsctl.models.encoder_base import QueryEncoder
from marsctl.models.separator import LoadedSeparator
from marsctl.separate.apply import SeparateOptions, apply_with_options
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
    return folder / f"{stem}.wav", folder / f"{stem}.residual.wav"


@dataclasses.dataclass
class _Output:
    query: Query
    target: Path | None  # None: keep the existing estimate
    residual: Path | None


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
    embeddings: dict[Query, torch.Tensor] = {}
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
                new_target = options.overwrite or not target.exists()
                new_residual = options.residual and (options.overwrite or not residual.exists())
                if not new_target:
                    report.kept_existing.append(target)
                if not (new_target or new_residual) or query in failed_queries:
                    continue
                if query not in embeddings:
                    try:
                        embeddings[query] = embed_query(encoder, query, sample_rate)
                    except MarsctlError as exc:  # reported once for the query, not for every file
                        failed_queries.add(query)
                        report.failures.append((Path(names[query]), f"query {names[query]}: {exc}"))
                        continue
                todo.append(_Output(query, target if new_target else None, residual if new_residual else None))
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
            report.failures.append((path, f"{path}: cannot write its outputs ({where}: {reason})"))
        if on_file is not None:
            on_file(path)
    return report


def _separate_file(
    model: LoadedSeparator, encoder: QueryEncoder, path: Path, todo: list[_Output], embeddings: dict[Query, torch.Tensor],
    options: SeparateOptions, seed: int, progress: Callable[[float, float], None] | None,
) -> list[Path]:
    """Stream one file through the separator into its outputs; returns the paths written."""
    sample_rate = model.model.config.signal.sample_rate
    stream = open_audio_stream(path, sample_rate)
    mixture_lag: collections.deque[torch.Tensor] = collections.deque()  # mixture blocks not yet matched by estimates
    done = 0

    def blocks() -> Iterator[torch.Tensor]:
        nonlocal done
        for block in stream:
            mixture_lag.append(block)
            yield block
            done += block.shape[-1]
            if progress is not None:
                progress(done / sample_rate, max(stream.duration, done / sample_rate))

    queries = torch.stack([embeddings[o.query] for o in todo])
    estimates = apply_with_options(model.model, blocks(), queries, options, seed, encoder)
    finals = [p for o in todo for p in (o.target, o.residual) if p is not None]
    with contextlib.ExitStack() as stack:
        temporary = {final: stack.enter_context(atomic_path(final)) for final in finals}
        files = {final: stack.enter_context(sf.SoundFile(str(tmp), "w", sample_rate, 1, subtype="FLOAT", format="WAV")) for final, tmp in temporary.items()}
        for block in estimates:
            mixture = _take(mixture_lag, block.shape[-1])
            for output, estimate in zip(todo, block):
                if output.target is not None:
                    files[output.target].write(estimate.numpy())
                if output.residual is not None:
                    files[output.residual].write((mixture - estimate).numpy())
    return finals


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
