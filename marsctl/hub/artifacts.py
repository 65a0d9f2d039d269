"""What an artifact directory is: its kind, the files that belong to it, its fingerprints.

An artifact is a directory that one marsctl stage produced (see docs/architecture.md): a
dataset build (``dataset.json`` + manifests + audio), a reward encoder, a separator, an RL
policy (each ``config.json`` + ``model.safetensors``), or an evaluation report
(JSON/CSV/Markdown). Each records its kind: a dataset in its ``dataset.json``, the others in
``artifact.json`` (``{"kind": ...}``, written by every stage), and a pushed one also in its
card's metadata (``marsctl.kind``). This module reads that kind (older artifacts without a
record get a guess from their files, with a note),
lists the files that would be published (never caches, temporary files, locks or token
files), checks them for secrets, fingerprints their content, and reads/writes the
``provenance.json`` record that a stage leaves next to its outputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

from huggingface_hub.utils import filter_repo_objects

from marsctl.errors import MarsctlError
from marsctl.files import sha256_file, write_json_atomic
from marsctl.hub.secrets import redact_secrets

#: Where a stage records how an artifact was made (see :func:`write_provenance`).
PROVENANCE_FILE = "provenance.json"
#: The generated card; excluded from the content fingerprint (it contains the fingerprint).
CARD_FILE = "README.md"
#: ``{"kind": ..., "schema_version": 1}``: what the artifact is (see :func:`write_artifact_kind`);
#: excluded from the content fingerprint like the card (marsctl writes it, also on push).
ARTIFACT_FILE = "artifact.json"

#: kind -> Hub repo type. Evaluation reports are tables, so they go to dataset repos.
KIND_REPO_TYPES: dict[str, str] = {
    "dataset": "dataset",
    "reward-encoder": "model",
    "separator": "model",
    "rl-policy": "model",
    "eval-report": "dataset",
}
KINDS = tuple(KIND_REPO_TYPES)

# Never published. Basename globs are matched in every folder; folder names anywhere in the
# path exclude everything under them. These are fnmatch patterns in the syntax that
# huggingface_hub's ``upload_folder(ignore_patterns=...)`` uses, so the list shown by
# ``marsctl hub push --dry-run`` and the list the library uploads are the same.
_IGNORED_BASENAMES = (
    ".*.tmp*",  # marsctl.files.atomic_path temporaries: .<stem>.<random>.tmp<suffix>
    "*.tmp",
    "*.lock",
    "*.incomplete",  # huggingface_hub partial downloads
    "*.partial",
    "*.part",  # yt-dlp partial downloads
    "*.pyc",
    ".DS_Store",
    ".gitattributes",  # written by the Hub into every repo; not part of the artifact
    # credentials that must never leave the machine
    "token",
    "stored_tokens",
    ".netrc",
    ".env",
    "*.token",
    ".git-credentials",
    "cookies.txt",  # yt-dlp --cookies files are login sessions
    "*.cookies",
)
_IGNORED_FOLDERS = ("__pycache__",)
# Hidden folders are never part of an artifact: .cache, .git, .locks, and the temporary
# folders marsctl stages build next to their target (``.<name>.<random>`` from mkdtemp).
_HIDDEN_FOLDER_PATTERNS = (".*/*", "*/.*/*")
#: ``marsctl data build``'s download scratch space.
_SCRATCH_PATTERNS = ("state/tmp/*",)


#: Training checkpoints (``<run>/checkpoints/step-*``: weights + optimizer/RNG state for
#: resuming) are not part of the published model unless asked for, as with transformers'
#: ``push_to_hub`` (the final model is what others use; checkpoints are for resuming).
CHECKPOINT_PATTERNS = ("checkpoints/*",)


def ignore_patterns(*, include_checkpoints: bool = False) -> list[str]:
    """The fnmatch patterns of files that are not uploaded (caches, temporaries, tokens, checkpoints)."""
    patterns: list[str] = []
    for name in _IGNORED_BASENAMES:
        patterns += [name, f"*/{name}"]
    for folder in _IGNORED_FOLDERS:
        patterns += [f"{folder}/*", f"*/{folder}/*"]
    patterns += [*_HIDDEN_FOLDER_PATTERNS, *_SCRATCH_PATTERNS]
    if not include_checkpoints:
        patterns += list(CHECKPOINT_PATTERNS)
    return patterns


def list_artifact_files(root: Path, *, include_checkpoints: bool = False) -> list[str]:
    """Relative POSIX paths of the files of ``root`` that belong to the artifact, sorted.

    Symlinked files (as in a Hugging Face cache snapshot) are listed like regular files.
    Training checkpoints are left out unless ``include_checkpoints``.
    """
    root = Path(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _IGNORED_FOLDERS and not d.startswith("."))
        for name in filenames:
            found.append((Path(dirpath) / name).relative_to(root).as_posix())
    return sorted(filter_repo_objects(found, ignore_patterns=ignore_patterns(include_checkpoints=include_checkpoints)))


def files_fingerprint(root: Path, files: Iterable[str] | None = None, *, progress: bool = True) -> str:
    """``sha256:<hex>`` over the sorted (path, size, sha256) of the artifact's files.

    The card (README.md) and ``artifact.json`` are left out, since marsctl writes them (the
    card records this fingerprint). Two directories with the same files and bytes have the
    same fingerprint wherever they are (a local build, a pulled Hub snapshot).
    """
    from marsctl.progress import stage_progress

    root = Path(root)
    names = [f for f in (files if files is not None else list_artifact_files(root)) if f not in (CARD_FILE, ARTIFACT_FILE)]
    digest = hashlib.sha256()
    with stage_progress(f"hashing {root.name or root}", len(names), show=progress and len(names) >= 200) as advance:
        for name in sorted(names):
            path = root / name
            digest.update(f"{name}\0{path.stat().st_size}\0{sha256_file(path)}\n".encode())
            advance()
    return "sha256:" + digest.hexdigest()


# ---------------------------------------------------------------------------- provenance


def read_provenance(root: Path) -> dict[str, Any] | None:
    """The ``provenance.json`` of an artifact directory, or None if it has none."""
    path = Path(root) / PROVENANCE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise MarsctlError(f"{path}: unreadable provenance record ({exc})") from exc
    return data if isinstance(data, dict) else None


def write_provenance(
    root: Path,
    *,
    stage: str,
    stage_hash: str,
    config: Any,
    inputs: Mapping[str, Mapping[str, Any]],
    kind: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Record how the artifact in ``root`` was made (atomically, as ``provenance.json``).

    ``stage_hash`` is :func:`marsctl.hub.content_hash` of the stage's config and inputs; it
    is what ``--reuse`` matches. The command line is recorded with anything that looks like
    a token removed.
    """
    from marsctl import __version__

    record = {
        "schema_version": 1,
        "kind": kind,
        "stage": stage,
        "stage_hash": stage_hash,
        "config": config,
        "inputs": {name: dict(value) for name, value in inputs.items()},
        "command": [redact_secrets(arg) for arg in ["marsctl", *sys.argv[1:]]],
        "marsctl_version": __version__,
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **dict(extra or {}),
    }
    write_json_atomic(Path(root) / PROVENANCE_FILE, record)
    return record


# ---------------------------------------------------------------------------- kinds


@dataclass(frozen=True)
class ArtifactInfo:
    """What :func:`inspect_artifact` found out about a directory."""

    path: Path
    kind: str
    #: the artifact's own description: dataset.json or config.json, parsed
    config: dict[str, Any]
    #: the name of the file ``config`` was read from ("dataset.json", "config.json" or "")
    config_file: str
    provenance: dict[str, Any] | None
    #: how the kind was found when it was not recorded (a guess from an older artifact's
    #: files, worth a look); "" when ``artifact.json``, ``dataset.json`` or --kind said it
    kind_note: str = ""

    @property
    def repo_type(self) -> str:
        return KIND_REPO_TYPES[self.kind]


_EVAL_REPORT_FILES = ("summary.json", "metrics.json", "report.json", "results.json")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MarsctlError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise MarsctlError(f"{path}: expected a JSON object")
    return data


def write_artifact_kind(root: str | Path, kind: str) -> Path:
    """Record ``kind`` in ``root/artifact.json`` (atomically); every stage does this for its output."""
    if kind not in KIND_REPO_TYPES:
        raise MarsctlError(f"unknown artifact kind {kind!r}; known: {', '.join(KINDS)}")
    path = Path(root) / ARTIFACT_FILE
    write_json_atomic(path, {"kind": kind, "schema_version": 1})
    return path


def read_artifact_kind(root: str | Path) -> str | None:
    """The kind recorded in ``root/artifact.json``, or None when there is no such file."""
    path = Path(root) / ARTIFACT_FILE
    if not path.is_file():
        return None
    kind = _read_json(path).get("kind")
    if kind not in KIND_REPO_TYPES:
        raise MarsctlError(f"{path}: unknown artifact kind {kind!r}; known: {', '.join(KINDS)}")
    return kind


def _recorded_kind(root: Path, config: Mapping[str, Any], provenance: Mapping[str, Any] | None) -> str | None:
    """A kind named exactly by provenance.json, config.json (``kind``/``artifact_kind``) or the card."""
    candidates = [(provenance or {}).get("kind"), config.get("artifact_kind"), config.get("kind")]
    if (root / CARD_FILE).is_file():
        from marsctl.hub.card import read_card_metadata

        block = read_card_metadata(root / CARD_FILE).get("marsctl")
        candidates.append(block.get("kind") if isinstance(block, dict) else None)
    return next((c for c in candidates if isinstance(c, str) and c in KIND_REPO_TYPES), None)


def _kind_from_config(config: Mapping[str, Any]) -> str | None:
    """Kind named by the config itself, or guessed from its keys."""
    for key in ("artifact_kind", "kind", "artifact", "artifact_type", "model_type", "type"):
        value = config.get(key)
        if isinstance(value, str):
            kind = _kind_from_word(value)
            if kind:
                return kind
    keys = " ".join(_flat_keys(config)).lower()
    if re.search(r"\b(group_size|clip_eps|ppo|reward_weights|lambda_kl|kl_coef)", keys):
        return "rl-policy"
    # a separator's config may carry its query encoder's settings, so check it first
    if re.search(r"(unet|u_net|base_channels|kappa|num_levels)", keys):
        return "separator"
    if re.search(r"(anchor|text_tower|audio_tower|image_tower|embedding_dim|projection)", keys):
        return "reward-encoder"
    return None


def _kind_from_word(value: str) -> str | None:
    word = value.lower().replace("_", "-")
    if word in KIND_REPO_TYPES:
        return word
    if "policy" in word or word in ("rl", "train-rl", "train.rl"):
        return "rl-policy"
    if "encoder" in word or word == "align":
        return "reward-encoder"
    if "separator" in word or "unet" in word or word in ("train-sup", "train.sup"):
        return "separator"
    if "eval" in word or "report" in word:
        return "eval-report"
    if "dataset" in word or word.startswith("data"):
        return "dataset"
    return None


def _flat_keys(mapping: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in mapping.items():
        keys.append(f"{prefix}{key}")
        if isinstance(value, Mapping):
            keys += _flat_keys(value, f"{prefix}{key}.")
    return keys


def inspect_artifact(path: str | Path, kind: str | None = None) -> ArtifactInfo:
    """The kind of the artifact directory ``path`` (or check the given ``kind``).

    The kind is read, first match wins, from: ``dataset.json`` (a dataset); ``artifact.json``;
    the ``kind`` in ``provenance.json``, in ``config.json`` or in the card's ``marsctl.kind``
    metadata (exactly a kind's name). An older artifact without these gets a guess, with a
    ``kind_note`` saying so: ``config.json`` naming something like a kind
    (``model_type: unet`` ...) or keys typical of one (``anchor``/``embedding_dim`` -> reward encoder,
    ``kappa``/``base_channels`` -> separator, ``group_size``/``clip_eps`` -> RL policy); a
    folder of metric tables (``summary.json``/``metrics.json``/CSV, no weights) -> evaluation
    report. Anything else needs ``kind``.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise MarsctlError(f"{root}: no such artifact directory")
    if not root.is_dir():
        raise MarsctlError(f"{root}: an artifact is a directory (with config.json or dataset.json)")
    if kind is not None and kind not in KIND_REPO_TYPES:
        raise MarsctlError(f"unknown artifact kind {kind!r}; known: {', '.join(KINDS)}")
    provenance = read_provenance(root)
    config: dict[str, Any] = {}
    config_file = ""
    note = ""
    if (root / "dataset.json").is_file():
        config, config_file = _read_json(root / "dataset.json"), "dataset.json"
        detected: str | None = "dataset"
    else:
        if (root / "config.json").is_file():
            config, config_file = _read_json(root / "config.json"), "config.json"
        detected = read_artifact_kind(root) or _recorded_kind(root, config, provenance)
        if detected is None and config:
            detected = _kind_from_config(config)
            note = f"guessed from config.json (no {ARTIFACT_FILE}: an artifact made before marsctl recorded kinds)"
        if detected is None:
            has_weights = any(root.glob("*.safetensors")) or any(root.glob("*.pt"))
            has_tables = any((root / f).is_file() for f in _EVAL_REPORT_FILES) or any(root.glob("*.csv"))
            if has_tables and not has_weights:
                detected = "eval-report"
                note = f"guessed from its metric tables (no {ARTIFACT_FILE})"
                for name in _EVAL_REPORT_FILES:
                    if (root / name).is_file() and not config:
                        config, config_file = _read_json(root / name), name
                        break
    final = kind or detected
    if final is None:
        raise MarsctlError(
            f"{root}: cannot tell what kind of artifact this is (no dataset.json or {ARTIFACT_FILE}, and "
            f"config.json does not name one); pass --kind {{{','.join(KINDS)}}}"
        )
    if kind is not None or detected is None:
        note = ""
    elif note:
        note = f"kind {final!r} {note}; pass --kind to be sure"
    return ArtifactInfo(path=root, kind=final, config=config, config_file=config_file, provenance=provenance,
                        kind_note=note)
