"""Dataset manifests: the contract between the data stages and everything downstream.

A dataset directory built by ``marsctl data build`` looks like this::

    <dataset>/dataset.json                          card: recipe name and config, counts, schema version
    <dataset>/clips/<label>/<clip_id>.flac          16 kHz mono source clips
    <dataset>/frames/<label>/<clip_id>/000.jpg ...  1 fps, 224x224 frames (absent for audio-only recipes)
    <dataset>/manifests/clips.parquet               one row per fetched clip, kept AND dropped
    <dataset>/manifests/mixtures.parquet            one row per fixed (evaluation) mixture
    <dataset>/mixtures/<split>/<mixture_id>/mixture.wav and <source_label>.wav
    <dataset>/logs/failures.jsonl                   items that could not be fetched or were skipped, with the reason
    <dataset>/state/                                per-item records that make every stage resumable

Manifests are Hugging Face ``datasets`` tables saved as Parquet (the ``datasets`` feature
types travel in the Parquet schema metadata). All paths inside them are relative to the
dataset directory and use ``/``; the loaders refuse a manifest with an absolute path or one
climbing out with ``..`` (:data:`PATH_COLUMNS`), so nothing reads files outside the dataset
through a manifest.

``clips.parquet`` (:data:`CLIP_FEATURES`):

=================  ==============  =====================================================
column             type            meaning
=================  ==============  =====================================================
clip_id            string          unique, file-system-safe id (``<youtube_id>_<start>``, ...)
label              string          class label as written in the recipe / source list
split              string          ``train`` | ``val`` | ``test``
audio_path         string          ``clips/<label>/<clip_id>.flac``
frame_paths        list<string>    ``frames/<label>/<clip_id>/000.jpg``...; ``[]`` if none
duration_s         float64         clip length in seconds
sample_rate        int32           always the signal config's rate (16000)
source             string          where it came from (youtube id + start, file, render params)
keep               bool            passed every filter check
drop_reason        string          ``""`` when kept, else ``check:detail`` of the first failed check
silence_ratio      float64         fraction of 50 ms frames quieter than the silence threshold
clip_ratio         float64         fraction of samples at or above the clipping level
loudness_lufs      float64         integrated loudness, ITU-R BS.1770 (-120 for digital silence)
rms_db             float64         RMS level in dBFS
peak_db            float64         sample peak in dBFS
semantic_margin    float64 (null)  cos(audio, own label) - max cos(audio, other label); null if not run
group              string          recording group (a melody, a recording); ``""`` if the source has none
soundfont          string          the soundfont that rendered the clip; ``""`` for recorded audio
family             string          in a union dataset, the member dataset it came from; else ``""``
=================  ==============  =====================================================

``mixtures.parquet`` (:data:`MIXTURE_FEATURES`): ``mixture_id``, ``split``, ``mixture_path``,
``source_clip_ids``, ``source_labels``, ``source_paths`` (each source *as it sits in the mix*),
``source_frame_paths`` (list of lists), ``source_offsets`` (sample offset of the crop in
each clip), ``gains`` (gain applied to each clip), ``snr_db`` (null for the OmniSep
``/2`` recipe), ``seed``, ``source_families`` (each source's ``family``) and ``pair_type``
(``within`` / ``across`` families when the recipe's ``mix.pairing`` drew it, else ``""``).

Columns added after a dataset was built (:data:`ADDED_COLUMNS`) read as their default.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Mapping

import datasets
import pyarrow.parquet as pq

from marsctl.errors import MarsctlError
from marsctl.files import atomic_path

#: bumped when a column changes meaning or disappears
SCHEMA_VERSION = 1

CLIPS_MANIFEST = "manifests/clips.parquet"
MIXTURES_MANIFEST = "manifests/mixtures.parquet"
CARD_FILE = "dataset.json"

CLIP_FEATURES = datasets.Features(
    {
        "clip_id": datasets.Value("string"),
        "label": datasets.Value("string"),
        "split": datasets.Value("string"),
        "audio_path": datasets.Value("string"),
        "frame_paths": datasets.Sequence(datasets.Value("string")),
        "duration_s": datasets.Value("float64"),
        "sample_rate": datasets.Value("int32"),
        "source": datasets.Value("string"),
        "keep": datasets.Value("bool"),
        "drop_reason": datasets.Value("string"),
        "silence_ratio": datasets.Value("float64"),
        "clip_ratio": datasets.Value("float64"),
        "loudness_lufs": datasets.Value("float64"),
        "rms_db": datasets.Value("float64"),
        "peak_db": datasets.Value("float64"),
        "semantic_margin": datasets.Value("float64"),
        "group": datasets.Value("string"),
        "soundfont": datasets.Value("string"),
        "family": datasets.Value("string"),
    }
)

MIXTURE_FEATURES = datasets.Features(
    {
        "mixture_id": datasets.Value("string"),
        "split": datasets.Value("string"),
        "mixture_path": datasets.Value("string"),
        "source_clip_ids": datasets.Sequence(datasets.Value("string")),
        "source_labels": datasets.Sequence(datasets.Value("string")),
        "source_paths": datasets.Sequence(datasets.Value("string")),
        "source_frame_paths": datasets.Sequence(datasets.Sequence(datasets.Value("string"))),
        "source_offsets": datasets.Sequence(datasets.Value("int64")),
        "gains": datasets.Sequence(datasets.Value("float64")),
        "snr_db": datasets.Value("float64"),
        "seed": datasets.Value("int64"),
        "source_families": datasets.Sequence(datasets.Value("string")),
        "pair_type": datasets.Value("string"),
    }
)

#: columns newer than schema version 1's first manifests -> how to fill them in an older file
ADDED_COLUMNS: dict[str, Any] = {"group": "", "soundfont": "", "family": "", "pair_type": "", "source_families": None}

SPLITS = ("train", "val", "test")


class ManifestError(MarsctlError):
    """A manifest is missing or does not follow the schema."""


def write_manifest(path: str | Path, rows: Iterable[Mapping[str, Any]], features: datasets.Features) -> Path:
    """Write ``rows`` as a ``datasets`` table in Parquet, atomically; columns must match ``features``."""
    rows = list(rows)
    names = list(features)
    columns: dict[str, list[Any]] = {name: [] for name in names}
    for i, row in enumerate(rows):
        missing = [n for n in names if n not in row and n not in ADDED_COLUMNS]
        extra = [k for k in row if k not in columns]
        if missing or extra:
            raise ManifestError(f"{path}: row {i} does not match the schema (missing {missing}, unknown {extra})")
        for name in names:
            columns[name].append(row[name] if name in row else _added_default(name, row))
    table = datasets.Dataset.from_dict(columns, features=features)
    path = Path(path)
    with atomic_path(path) as tmp:
        # the Arrow table carries the ``datasets`` features in its schema metadata
        pq.write_table(table.data.table, str(tmp))
    return path


def write_clips(dataset_dir: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write ``manifests/clips.parquet`` (rows sorted by split, label, clip_id for stable output)."""
    ordered = sorted(rows, key=lambda r: (SPLITS.index(r["split"]) if r["split"] in SPLITS else 9, r["label"], r["clip_id"]))
    return write_manifest(Path(dataset_dir) / CLIPS_MANIFEST, ordered, CLIP_FEATURES)


def write_mixtures(dataset_dir: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write ``manifests/mixtures.parquet`` (rows in the given order)."""
    return write_manifest(Path(dataset_dir) / MIXTURES_MANIFEST, rows, MIXTURE_FEATURES)


def _load(path: Path, features: datasets.Features) -> datasets.Dataset:
    if not path.is_file():
        raise ManifestError(f"{path}: no such manifest (build the dataset with 'marsctl data build' first)")
    try:
        table = pq.read_table(str(path))
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise ManifestError(f"{path}: not a readable Parquet manifest ({exc})") from exc
    missing = [name for name in features if name not in table.column_names and name not in ADDED_COLUMNS]
    if missing:
        raise ManifestError(f"{path}: missing column(s) {', '.join(missing)}")
    ds = datasets.Dataset(table)
    for name in features:
        if name not in ds.column_names:  # a manifest written before the column existed
            rows = ds.select_columns(["source_labels"]) if name == "source_families" else [{}] * len(ds)
            ds = ds.add_column(name, [_added_default(name, row) for row in rows], feature=features[name])
    _check_paths(path, ds)
    return ds


#: columns holding paths relative to the dataset directory (a string, a list, or a list of lists)
PATH_COLUMNS = ("audio_path", "frame_paths", "mixture_path", "source_paths", "source_frame_paths")


def is_dataset_relative(text: str) -> bool:
    """Whether ``text`` is a relative path that stays inside the dataset (no absolute path, ``..`` or ``\\``)."""
    if "\\" in text or "\x00" in text:
        return False
    path = PurePosixPath(text)
    return not path.is_absolute() and ".." not in path.parts and not (path.parts and ":" in path.parts[0])


def _check_paths(path: Path, ds: datasets.Dataset) -> None:
    """Refuse a manifest whose paths point outside its dataset (one line naming the row and column)."""
    id_column = "clip_id" if "clip_id" in ds.column_names else "mixture_id"
    for column in PATH_COLUMNS:
        if column not in ds.column_names:
            continue
        for i, value in enumerate(ds[column]):
            for text in _strings(value):
                if not is_dataset_relative(text):
                    raise ManifestError(
                        f"{path}: row {i} ({ds[i][id_column]}): {column} {text!r} is not a path inside the dataset "
                        "(absolute, or climbs out with '..')"
                    )


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def dataset_file(dataset_dir: str | Path, relative: str) -> Path:
    """``dataset_dir / relative`` for a path read from a manifest; refuses one that leaves the dataset."""
    if not is_dataset_relative(relative):
        raise ManifestError(f"{dataset_dir}: {relative!r} is not a path inside the dataset (absolute, or climbs out with '..')")
    return Path(dataset_dir) / relative


def _added_default(name: str, row: Mapping[str, Any]) -> Any:
    """The value of a column of :data:`ADDED_COLUMNS` that a row (or an older file) lacks."""
    if name == "source_families":
        return [""] * len(row.get("source_labels") or [])
    return ADDED_COLUMNS[name]


def load_clips(dataset_dir: str | Path, *, kept_only: bool = False, split: str | None = None) -> datasets.Dataset:
    """The clips manifest of a dataset as a ``datasets.Dataset`` (in memory).

    ``kept_only`` keeps the rows that passed the filter; ``split`` selects one split.
    """
    ds = _load(Path(dataset_dir) / CLIPS_MANIFEST, CLIP_FEATURES)
    if kept_only or split is not None:
        keep = ds["keep"]
        splits = ds["split"]
        indices = [i for i in range(len(ds)) if (not kept_only or keep[i]) and (split is None or splits[i] == split)]
        ds = ds.select(indices)
    return ds


def training_labels(dataset_dir: str | Path) -> list[str]:
    """The sorted classes of a dataset's kept training clips: what a separator trained on it knows
    (recorded as ``labels`` in its ``config.json``; ``marsctl separate`` notes queries far from all of them)."""
    return sorted(set(load_clips(dataset_dir, kept_only=True, split="train")["label"]))


def load_mixtures(dataset_dir: str | Path, *, split: str | None = None) -> datasets.Dataset:
    """The fixed mixtures manifest of a dataset as a ``datasets.Dataset`` (in memory)."""
    ds = _load(Path(dataset_dir) / MIXTURES_MANIFEST, MIXTURE_FEATURES)
    if split is not None:
        splits = ds["split"]
        ds = ds.select([i for i in range(len(ds)) if splits[i] == split])
    return ds
