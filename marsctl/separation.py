"""Separating files and folders with a trained separator (the library behind ``marsctl separate``).

* Inputs are files or folders (searched recursively); every format :func:`marsctl.audio.
  load_audio` reads is accepted. Files with a non-audio suffix found inside folders are
  skipped and counted; a non-audio file named explicitly is an error for that file.
* Each input gets ``<out>/<path relative to the folder given, without suffix>/<query slug>.wav``
  (and ``<query slug>.residual.wav`` = mixture - estimate with ``residual``). Existing
  outputs are kept unless ``overwrite``.
* Long files are processed in chunks of the model's training window with cross-faded
  overlap-add (:func:`marsctl.audio.overlap_add`), ``batch_size`` chunks at a time, so
  model memory is bounded whatever the length. All queries of one file share the U-Net
  pass (the U-Net does not depend on the query).
* ``decode``: ``mode`` (= P, the supervised mask; default), ``mean`` of the Beta policy,
  or one ``sample`` (seeded per file by ``seed``), or ``best-of-N``: N samples re-ranked by the
  query encoder (:mod:`marsctl.rl.decode`).
* A file that fails (missing, corrupt, not audio) is recorded with a one-line reason
  and the batch goes on; the caller reports failures and exits non-zero.

Queries: text (several texts compose), an audio file, an image file, or any mix of them
(fused with equal weights), optionally with a negative text query; a CSV/JSON mapping
file gives a different query per file (:func:`read_query_mapping`).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from marsctl.audio import is_audio_path, load_audio, overlap_add, save_audio
from marsctl.errors import AudioError, ConfigError, MarsctlError
from marsctl.models.encoder_base import QueryEncoder
from marsctl.models.query import compose, fuse, negative_query
from marsctl.models.separator import LoadedSeparator, Separator, load_separator

DECODES = ("mode", "mean", "sample")
#: directory of the model shipped inside the package (used when no --model is given)
DEFAULT_MODEL_DIR = Path(__file__).parent / "pretrained" / "separator"  # marsctl.pretrained.DEFAULT_SEPARATOR_DIR


@dataclasses.dataclass(frozen=True)
class Query:
    """What to extract: texts (composed), audio clips, images; minus an optional negative text."""

    texts: tuple[str, ...] = ()
    audio: tuple[str, ...] = ()
    images: tuple[str, ...] = ()
    negative: tuple[str, ...] = ()
    negative_strength: float = 0.5

    def __post_init__(self) -> None:
        if not (self.texts or self.audio or self.images):
            raise ConfigError("a query needs a text, an audio file or an image")

    def slug(self) -> str:
        """A readable, file-system-safe name for outputs: 'dog-barking', 'audio-example', 'piano+violin-not-drums'."""
        parts = list(self.texts) + [f"audio-{Path(p).stem}" for p in self.audio] + [f"image-{Path(p).stem}" for p in self.images]
        text = "+".join(parts) + ("-not-" + "+".join(self.negative) if self.negative else "")
        slug = re.sub(r"[^a-z0-9+]+", "-", text.lower()).strip("-") or "query"
        if len(slug) > 80:
            slug = slug[:71].rstrip("-") + "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
        return slug


@torch.no_grad()
def embed_query(encoder: QueryEncoder, query: Query, sample_rate: int = 16_000) -> torch.Tensor:
    """The fused, unit-norm query vector ``[D]`` (see :mod:`marsctl.models.query`)."""
    parts: dict[str, torch.Tensor] = {}
    if query.texts:
        parts["text"] = compose(encoder.embed_text(list(query.texts)).float().cpu())
    if query.audio:
        waves = [torch.from_numpy(load_audio(p, sample_rate)) for p in query.audio]
        parts["audio"] = compose(encoder.embed_audio([w.to(encoder.device) for w in waves], sample_rate).float().cpu())
    if query.images:
        parts["image"] = compose(encoder.embed_image(torch.stack([load_image(p) for p in query.images]).to(encoder.device)).float().cpu())
    q = fuse(parts)
    if query.negative:
        q = negative_query(q, compose(encoder.embed_text(list(query.negative)).float().cpu()), query.negative_strength)
    return q


def load_image(path: str | Path, size: int = 224) -> torch.Tensor:
    """An RGB image as ``[3, size, size]`` in [0, 1]; errors name the file."""
    from torchvision.io import ImageReadMode, decode_image

    path = Path(path)
    if not path.is_file():
        raise MarsctlError(f"{path}: no such image file")
    try:
        image = decode_image(str(path), mode=ImageReadMode.RGB).float() / 255.0
    except (RuntimeError, ValueError) as exc:
        raise MarsctlError(f"{path}: not a readable image ({str(exc).splitlines()[0]})") from exc
    return torch.nn.functional.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False)[0]


@dataclasses.dataclass(frozen=True)
class InputFile:
    path: Path
    #: output folder relative to --out: the path relative to the folder given, without suffix
    relative: Path


def find_inputs(paths: Sequence[str | Path]) -> tuple[list[InputFile], list[Path]]:
    """Files to separate (folders searched recursively, sorted) and non-audio files skipped in folders."""
    found: list[InputFile] = []
    skipped: list[Path] = []
    for given in map(Path, paths):
        if given.is_dir():
            for path in sorted(p for p in given.rglob("*") if p.is_file() and not p.name.startswith(".")):
                if is_audio_path(path):
                    found.append(InputFile(path, path.relative_to(given).with_suffix("")))
                else:
                    skipped.append(path)
        else:
            found.append(InputFile(given, Path(given.stem)))  # missing/non-audio: reported when loaded
    return found, skipped


def read_query_mapping(path: str | Path) -> list[tuple[InputFile, Query]]:
    """Per-file queries from CSV (columns ``path``, ``query`` and optionally ``query_audio``,
    ``query_image``, ``negative``) or JSON (``{"file": "query", ...}`` or a list of objects with
    those keys). Several texts in one cell are separated by ``|``. Relative paths (files and
    query files) are relative to the mapping file; outputs mirror that layout."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such query mapping file")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            data = json.loads(text)
            rows = [{"path": k, "query": v} for k, v in data.items()] if isinstance(data, dict) else data
        elif path.suffix.lower() in (".csv", ".tsv"):
            rows = list(csv.DictReader(text.splitlines(), delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
        else:
            raise ConfigError(f"{path}: query mapping must be .csv, .tsv or .json")
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as exc:
        raise ConfigError(f"{path}: cannot parse the query mapping ({exc})") from exc
    if not isinstance(rows, list):
        raise ConfigError(f"{path}: expected an object or a list of objects")
    out = []
    base = path.parent

    def split(value) -> tuple[str, ...]:
        if value is None:
            return ()
        items = value if isinstance(value, list) else str(value).split("|")
        return tuple(s.strip() for s in items if str(s).strip())

    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not row.get("path"):
            raise ConfigError(f"{path}: entry {number} has no 'path'")
        file = Path(row["path"])
        full = file if file.is_absolute() else base / file
        rel = Path(file.name).with_suffix("") if file.is_absolute() else file.with_suffix("")
        try:
            query = Query(
                texts=split(row.get("query")),
                audio=tuple(str(p if Path(p).is_absolute() else base / p) for p in split(row.get("query_audio"))),
                images=tuple(str(p if Path(p).is_absolute() else base / p) for p in split(row.get("query_image"))),
                negative=split(row.get("negative")),
            )
        except ConfigError:
            raise ConfigError(f"{path}: entry {number} ({row['path']}) has no query") from None
        out.append((InputFile(full, rel), query))
    return out


@dataclasses.dataclass(frozen=True)
class SeparateOptions:
    out_dir: Path = Path("separated")
    decode: str = "mode"
    residual: bool = False
    overwrite: bool = False
    #: chunk length in samples (default: the model's training window)
    chunk_samples: int | None = None
    overlap: float = 0.25
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        from marsctl.rl.decode import parse_best_of

        if self.decode not in DECODES and parse_best_of(self.decode) is None:
            raise ConfigError(f"unknown decode {self.decode!r}; expected one of {', '.join(DECODES)} or best-of-N (e.g. best-of-8)")


@dataclasses.dataclass
class SeparationReport:
    written: list[Path] = dataclasses.field(default_factory=list)
    kept_existing: list[Path] = dataclasses.field(default_factory=list)
    skipped_non_audio: list[Path] = dataclasses.field(default_factory=list)
    failures: list[tuple[Path, str]] = dataclasses.field(default_factory=list)


def output_paths(options: SeparateOptions, item: InputFile, query: Query) -> tuple[Path, Path]:
    folder = options.out_dir / item.relative
    return folder / f"{query.slug()}.wav", folder / f"{query.slug()}.residual.wav"


@torch.no_grad()
def separate_waveform(
    model: Separator, waveform: torch.Tensor, queries: torch.Tensor, options: SeparateOptions, seed: int | None = None,
    encoder: QueryEncoder | None = None,
) -> torch.Tensor:
    """One mono waveform ``[T]`` and ``K`` query vectors ``[K, D]`` -> ``[K, T]`` estimates, chunked."""
    device = next(model.parameters()).device
    chunk = options.chunk_samples or model.config.signal.segment_samples
    queries = queries.to(device)
    from marsctl.rl.decode import best_of_n_separate, parse_best_of

    best_of = parse_best_of(options.decode)
    if best_of is not None and encoder is None:
        raise ConfigError(f"--decode {options.decode} needs the query encoder to score the samples")

    def process(chunks: torch.Tensor) -> torch.Tensor:  # [N, chunk] -> [N, K, chunk]
        q = queries.unsqueeze(0).expand(chunks.shape[0], -1, -1)
        if best_of is not None:  # --decode best-of-N: N samples re-ranked by the encoder (marsctl.rl.decode)
            return best_of_n_separate(model, chunks.to(device), q, best_of, encoder)
        return model.separate(chunks.to(device), q, decode=options.decode)

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(options.seed if seed is None else seed)
        return overlap_add(process, waveform.to(device), chunk, overlap=options.overlap, batch_size=options.batch_size).cpu()


def separate_jobs(
    model: LoadedSeparator,
    encoder: QueryEncoder,
    jobs: Iterable[tuple[InputFile, Query]],
    options: SeparateOptions,
    on_file: Callable[[Path], None] | None = None,
) -> SeparationReport:
    """Run every (file, query) job, grouped by file; see the module docstring."""
    report = SeparationReport()
    sample_rate = model.model.config.signal.sample_rate
    by_file: dict[Path, list[tuple[InputFile, Query]]] = {}
    for item, query in jobs:
        by_file.setdefault(item.path, []).append((item, query))
    embeddings: dict[Query, torch.Tensor] = {}
    claimed: dict[Path, Path] = {}
    for index, (path, file_jobs) in enumerate(by_file.items()):
        try:
            todo = []
            for item, query in file_jobs:
                target, residual = output_paths(options, item, query)
                owner = claimed.setdefault(target, path)
                if owner != path:
                    raise MarsctlError(f"output {target} would also be written for {owner}; rename one of the inputs")
                if not options.overwrite and target.exists() and (not options.residual or residual.exists()):
                    report.kept_existing.append(target)
                    continue
                if query not in embeddings:
                    embeddings[query] = embed_query(encoder, query, sample_rate)
                todo.append((query, target, residual))
            if todo:
                if not is_audio_path(path) and path.exists() and not path.is_dir():
                    raise AudioError(path, f"not an audio file (suffix '{path.suffix}' is not a supported audio or video format)")
                wave = torch.from_numpy(load_audio(path, sample_rate))
                estimates = separate_waveform(model.model, wave, torch.stack([embeddings[q] for q, _, _ in todo]), options, seed=options.seed + index, encoder=encoder)
                for (query, target, residual), estimate in zip(todo, estimates):
                    report.written.append(save_audio(target, estimate, sample_rate))
                    if options.residual:
                        report.written.append(save_audio(residual, wave - estimate, sample_rate))
        except MarsctlError as exc:
            report.failures.append((path, str(exc) if str(path) in str(exc) else f"{path}: {exc}"))
        if on_file is not None:
            on_file(path)
    return report


def default_model_spec() -> Path:
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise MarsctlError("no default model is installed with this copy of marsctl; pass --model DIR (a 'marsctl train sup' run directory)")
    return DEFAULT_MODEL_DIR


def load_model_and_encoder(model_spec: str | Path | None, encoder_spec: str | None = None, device: str | torch.device = "cpu"):
    """The separator (``model_spec`` or the embedded default) and the query encoder it was trained with."""
    from marsctl.models.encoders import load_encoder

    loaded = load_separator(model_spec if model_spec is not None else default_model_spec(), device=device)
    encoder = load_encoder(encoder_spec or loaded.encoder, device=device)
    if encoder.embedding_dim != loaded.model.config.query_dim:
        raise MarsctlError(
            f"encoder {encoder_spec or loaded.encoder} gives {encoder.embedding_dim}-d queries; the separator in {loaded.directory} expects {loaded.model.config.query_dim}"
        )
    return loaded, encoder
