"""The stage cache: ``--reuse`` and ``--push-to`` for every long stage.

A stage's result is keyed by :func:`content_hash` of its config and its inputs (input
artifacts are identified by the stage hash in their ``provenance.json``, or else by the
sha256 of their files). The key is recorded in the output's ``provenance.json`` and, once
pushed, in the repo card. A stage uses :class:`StageCache` like this::

    cache = StageCache("align", config, inputs={"data": data_dir, "encoder": encoder_dir}, kind="reward-encoder")
    cache.check_push_to(push_to)           # fail now, not after hours of work
    if reuse and (found := cache.lookup(out_dir, push_to=push_to)) is not None:
        return found                       # same config + inputs: nothing to recompute
    cache.begin(out_dir)                   # a stale provenance.json goes before any rewrite
    ... run the stage, writing into out_dir ...
    cache.record(out_dir)                  # provenance.json, written last (atomically)
    if push_to:
        cache.publish(out_dir, push_to)    # marsctl hub push out_dir push_to

:func:`run_stage` does all of this in one call. ``lookup`` looks, in order, at ``out_dir``
itself, the Hugging Face cache copy of ``push_to``, the Hub's ``push_to`` (unless offline),
then every marsctl artifact in the Hugging Face cache. A hit found elsewhere is linked into
an absent or empty ``out_dir`` (hard links to the cache blobs, or copies across file
systems; marsctl replaces files atomically and never writes into them in place, so the
cache is not changed through the links).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Mapping

from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download, scan_cache_dir
from huggingface_hub.errors import CacheNotFound, EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
from rich.console import Console

from marsctl.errors import MarsctlError
from marsctl.hub.artifacts import (
    ARTIFACT_FILE,
    CARD_FILE,
    KIND_REPO_TYPES,
    list_artifact_files,
    read_provenance,
    write_artifact_kind,
    write_provenance,
)
from marsctl.hub.card import card_stage_hash
from marsctl.hub.secrets import redact_secrets
from marsctl.recorded_paths import portable_command, portable_mapping, portable_path
from marsctl.hub.refs import HubRef, download_snapshot, is_offline

_log = Console(stderr=True)


def _canonical(value: Any) -> Any:
    """JSON-ready, order-independent form of a config value."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _canonical(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)  # 1.0 and 1 are the same setting
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise MarsctlError(f"cannot hash config value of type {type(value).__name__}: {value!r}")


@dataclasses.dataclass(frozen=True)
class FileSelection:
    """A stage input that is some of the files of a folder (a folder recipe's root: the files the build
    reads), named relative to ``root``. Its fingerprint hashes those files only."""

    root: Path
    files: tuple[str, ...]

    def __fspath__(self) -> str:
        return os.fspath(self.root)


def _regular_files_fingerprint(root: Path, names: list[str]) -> str:
    """:func:`files_fingerprint`'s digest over ``names``, reading regular files only.

    Anything else (a symlink to a device such as ``/dev/urandom``, a FIFO, a folder, a file that
    cannot be read) is not read: it enters the digest by name and reason, with one logged line.
    A folder of regular files gets exactly :func:`files_fingerprint`'s value.
    """
    import stat

    from marsctl.files import sha256_file
    from marsctl.progress import stage_progress

    root = Path(root)
    names = sorted(n for n in names if n not in (CARD_FILE, ARTIFACT_FILE))
    digest = hashlib.sha256()
    with stage_progress(f"hashing {root.name or root}", len(names), show=len(names) >= 200) as advance:
        for name in names:
            path = root / name
            reason = None
            try:
                info = path.stat()  # a symlink's target (a Hugging Face snapshot links to its blobs)
                if stat.S_ISREG(info.st_mode):
                    digest.update(f"{name}\0{info.st_size}\0{sha256_file(path)}\n".encode())
                else:
                    reason = "not a regular file"
            except OSError as exc:
                reason = f"cannot be read ({exc.strerror or exc})"
            if reason is not None:
                _log.print(f"{path}: left out of the input fingerprint: {reason}", highlight=False, soft_wrap=True, markup=False)
                digest.update(f"{name}\0skipped\0{reason}\n".encode())
            advance()
    return "sha256:" + digest.hexdigest()


def input_fingerprint(value: str | os.PathLike[str] | bytes | FileSelection | None) -> str | None:
    """Identity of one stage input.

    An artifact directory with a ``provenance.json`` is identified by its stage hash (so a
    local build and its pulled Hub copy are the same input); any other directory by the
    sha256 of its regular files; a :class:`FileSelection` by the sha256 of its files; a file by
    its sha256; ``bytes`` by their sha256.
    """
    if value is None:
        return None
    if isinstance(value, bytes):
        return "bytes:sha256:" + hashlib.sha256(value).hexdigest()
    if isinstance(value, FileSelection):
        return "files:" + _regular_files_fingerprint(value.root, list(value.files))
    path = Path(value).expanduser()
    if path.is_dir():
        provenance = read_provenance(path)
        if provenance and isinstance(provenance.get("stage_hash"), str):
            return "stage:" + provenance["stage_hash"]
        return "files:" + _regular_files_fingerprint(path, list_artifact_files(path))
    if path.is_file():
        from marsctl.files import sha256_file

        return "file:sha256:" + sha256_file(path)
    raise MarsctlError(f"{path}: stage input not found (pass a resolved local path)")


def content_hash(config: Any, inputs: Mapping[str, Any] | None = None, *, stage: str | None = None) -> str:
    """``sha256:<hex>`` of a stage's config (dataclass or mapping) and its inputs.

    Key order, dataclass vs dict, and ``1`` vs ``1.0`` do not change the hash; any setting
    or input byte does. Pass only what determines the result (not output paths, worker
    counts or log settings), and the input artifacts as resolved local paths.
    """
    fingerprints = {name: input_fingerprint(value) for name, value in sorted((inputs or {}).items())}
    return _hash_payload(stage, config, fingerprints)


def _hash_payload(stage: str | None, config: Any, fingerprints: Mapping[str, str | None]) -> str:
    payload = {"stage": stage, "config": _canonical(config), "inputs": dict(sorted(fingerprints.items()))}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def materialize(source: Path, target: Path) -> Path:
    """Make ``target`` hold the artifact files of ``source`` (hard links where possible).

    Files are linked under a temporary name and the folder renamed at the end, so an
    interrupted call never leaves a half-filled ``target``.
    """
    target = Path(target)
    staging = target.with_name(f".{target.name}.tmp-materialize")
    shutil.rmtree(staging, ignore_errors=True)
    for name in list_artifact_files(source):
        src = (Path(source) / name).resolve()
        dst = staging / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    if target.exists():
        target.rmdir()  # only ever called on an empty target
    os.replace(staging, target)
    return target


@dataclasses.dataclass
class StageCache:
    """Reuse and publication of one stage's output, keyed by config + inputs."""

    stage: str
    config: Any
    inputs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: artifact kind for the card and the Hub repo type (see marsctl.hub.artifacts.KINDS)
    kind: str | None = None
    endpoint: str | None = None
    cache_dir: str | Path | None = None

    @cached_property
    def input_fingerprints(self) -> dict[str, str | None]:
        return {name: input_fingerprint(value) for name, value in sorted(self.inputs.items())}

    @cached_property
    def key(self) -> str:
        """:func:`content_hash` of the config and inputs (computed once)."""
        return _hash_payload(self.stage, self.config, self.input_fingerprints)

    @property
    def repo_type(self) -> str:
        return KIND_REPO_TYPES.get(self.kind or "", "model")

    # ------------------------------------------------------------------ lookup
    def matches(self, folder: Path) -> bool:
        """Whether ``folder`` is a finished output of this stage with this key."""
        provenance = read_provenance(folder) if Path(folder).is_dir() else None
        return bool(provenance) and provenance.get("stage_hash") == self.key

    def lookup(self, out_dir: str | Path | None = None, *, push_to: str | None = None) -> Path | None:
        """A finished artifact with this stage hash, or None. See the module docstring for the order."""
        if out_dir is not None and self.matches(Path(out_dir)):
            return Path(out_dir)
        found = None
        if push_to:
            found = self._from_repo(HubRef.parse(push_to))
        if found is None:
            found = self._from_cache_scan()
        if found is None:
            return None
        _log.print(f"reusing {found} (stage hash {self.key[:19]}...)", highlight=False, soft_wrap=True)
        if out_dir is not None:
            out = Path(out_dir)
            if not out.exists() or (out.is_dir() and not any(out.iterdir())):
                return materialize(found, out)
        return found

    def _from_repo(self, ref: HubRef) -> Path | None:
        """The pushed repo at its latest revision (cache first, then the Hub) if its card matches."""
        repo_type = ref.repo_type or self.repo_type
        attempts = [True] if is_offline() else [True, False]
        for local_only in attempts:
            try:
                card = hf_hub_download(
                    ref.repo_id, CARD_FILE, repo_type=repo_type, revision=ref.revision,
                    cache_dir=self.cache_dir, endpoint=self.endpoint or hf_constants.ENDPOINT,
                    local_files_only=local_only,
                )
            except (LocalEntryNotFoundError, EntryNotFoundError):
                continue
            except HfHubHTTPError:
                return None  # repo not pushed yet (or not readable): nothing to reuse
            if card_stage_hash(Path(card)) != self.key:
                continue
            # the card's snapshot folder is named by its commit: pull exactly that commit
            commit = Path(card).parent.name
            return download_snapshot(HubRef(ref.repo_id, commit, repo_type), cache_dir=self.cache_dir,
                                     endpoint=self.endpoint, local_files_only=local_only)
        return None

    def _from_cache_scan(self) -> Path | None:
        try:
            info = scan_cache_dir(self.cache_dir or hf_constants.HF_HUB_CACHE)
        except CacheNotFound:
            return None
        best: tuple[float, Path] | None = None
        for repo in info.repos:
            for revision in repo.revisions:
                card = Path(revision.snapshot_path) / CARD_FILE
                if card.is_file() and card_stage_hash(card) == self.key:
                    if self.matches(Path(revision.snapshot_path)) and (best is None or revision.last_modified > best[0]):
                        best = (revision.last_modified, Path(revision.snapshot_path))
        return best[1] if best else None

    # ------------------------------------------------------------------ record / publish
    def begin(self, out_dir: str | Path) -> None:
        """Call when the stage starts (re)writing ``out_dir``: drops a provenance.json left by a
        run with other settings, so a half-updated directory never passes for the old artifact."""
        path = Path(out_dir) / "provenance.json"
        provenance = read_provenance(Path(out_dir)) if path.is_file() else None
        if provenance is not None and provenance.get("stage_hash") != self.key:
            path.unlink()

    def record(self, out_dir: str | Path, *, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Write ``artifact.json`` (the kind) and ``provenance.json`` into the finished ``out_dir`` (call it last)."""
        # paths as marsctl.recorded_paths records them: relative to out_dir, Hub ids or ~/..., --cookies redacted
        inputs = {
            name: {"spec": portable_path(os.fspath(value), out_dir) if isinstance(value, (str, os.PathLike)) else None,
                   "fingerprint": self.input_fingerprints[name]}
            for name, value in sorted(self.inputs.items())
        }
        if self.kind and self.kind != "dataset":  # a dataset's dataset.json says what it is
            write_artifact_kind(out_dir, self.kind)
        config = _canonical(self.config)
        config = portable_mapping(config, out_dir) if isinstance(config, Mapping) else config
        command = portable_command([redact_secrets(arg) for arg in ["marsctl", *sys.argv[1:]]], out_dir)
        return write_provenance(Path(out_dir), stage=self.stage, stage_hash=self.key, config=config,
                                inputs=inputs, kind=self.kind, extra={"command": command, **dict(extra or {})})

    def check_push_to(self, push_to: str | None) -> None:
        """Call before the stage runs: a bad ``--push-to`` (malformed id, no token, offline) fails now."""
        if push_to:
            from marsctl.hub.push import check_can_push

            check_can_push(push_to)

    def publish(self, out_dir: str | Path, push_to: str, **kwargs: Any):
        """Push the finished ``out_dir`` to ``push_to`` (see :func:`marsctl.hub.push_artifact`)."""
        from marsctl.hub.push import push_artifact

        if not self.matches(Path(out_dir)):
            self.record(out_dir)
        return push_artifact(out_dir, push_to, kind=self.kind, endpoint=self.endpoint, **kwargs)


@dataclasses.dataclass(frozen=True)
class StageOutcome:
    """What :func:`run_stage` did."""

    #: the artifact: ``artifact_dir`` or, when reused, where the reused artifact is
    path: Path
    reused: bool
    #: the push result when ``push_to`` was given (a :class:`marsctl.hub.PushResult`)
    pushed: Any = None


def run_stage(
    stage: str,
    config: Any,
    inputs: Mapping[str, Any],
    artifact_dir: str | Path,
    run: Callable[[], Any],
    *,
    kind: str,
    reuse: bool = False,
    push_to: str | None = None,
) -> StageOutcome:
    """``--reuse`` / ``--push-to`` around one stage, in one call (see :class:`StageCache`).

    Checks ``push_to`` first (so a missing token fails before hours of work), returns a
    matching artifact when ``reuse`` finds one, else calls ``run()`` (which must leave the
    finished artifact in ``artifact_dir``; a mapping it returns is recorded as metrics),
    records ``provenance.json`` and pushes.
    """
    cache = StageCache(stage, config, inputs, kind=kind)
    cache.check_push_to(push_to)
    if reuse and (found := cache.lookup(artifact_dir, push_to=push_to)) is not None:
        return StageOutcome(found, reused=True)
    cache.begin(artifact_dir)
    result = run()
    # a mapping returned by run() is recorded as the artifact's metrics (shown on its card)
    cache.record(artifact_dir, extra={"metrics": dict(result)} if isinstance(result, Mapping) and result else None)
    pushed = cache.publish(artifact_dir, push_to) if push_to else None
    return StageOutcome(Path(artifact_dir), reused=False, pushed=pushed)
