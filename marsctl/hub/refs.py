"""Artifact references: a local path, or a Hub id with an optional revision.

Every ``--data``, ``--model`` and ``--encoder`` option goes through
:func:`resolve_artifact`. Accepted forms::

    ./runs/encoder                 a local directory (anything that exists on disk wins)
    org/name                       a Hub repo, default branch
    org/name@v1.0                  ... at a branch, tag or commit
    datasets/org/name@<sha>        ... forcing the repo type (also models/...)
    hf://datasets/org/name@main    ... the same with the hf:// scheme

A Hub id is downloaded with ``huggingface_hub.snapshot_download`` into the standard
Hugging Face cache (``HF_HUB_CACHE``, by default ``~/.cache/huggingface/hub``) and the
snapshot folder is returned. With ``HF_HUB_OFFLINE=1`` nothing touches the network: a
previously pulled artifact resolves from the cache, and a missing one is a one-line error
saying which ``marsctl hub pull`` to run.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import httpx2
from huggingface_hub import constants as hf_constants
from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import validate_repo_id

from marsctl.errors import MarsctlError

REPO_TYPES = ("model", "dataset")
_TYPE_PREFIXES = {"models": "model", "datasets": "dataset"}
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class ArtifactNotFound(MarsctlError):
    """The Hub (or, offline, the cache) has no such artifact."""

    def __init__(self, spec: str, reason: str):
        self.spec, self.reason = spec, reason
        super().__init__(f"{spec}: {reason}")


@dataclass(frozen=True)
class HubRef:
    """A Hub repository, with the revision and repo type if the spec gave them."""

    repo_id: str
    revision: str | None = None
    repo_type: str | None = None

    @classmethod
    def parse(cls, spec: str) -> "HubRef":
        """Parse ``[hf://][models/|datasets/]org/name[@revision]``; raise MarsctlError if it is not one."""
        text = spec.strip()
        if text.startswith("hf://"):
            text = text[len("hf://"):]
        repo_type = None
        head, _, rest = text.partition("/")
        if head in _TYPE_PREFIXES and rest.count("/") >= 1:
            repo_type, text = _TYPE_PREFIXES[head], rest
        repo_id, at, revision = text.partition("@")
        if at and not revision:
            raise MarsctlError(f"{spec!r}: empty revision after '@' (use org/name@branch-tag-or-commit)")
        if not _HUB_ID_RE.match(repo_id):
            raise MarsctlError(f"{spec!r} is not a Hub repo id (expected org/name or org/name@revision)")
        try:
            validate_repo_id(repo_id)
        except HFValidationError as exc:
            raise MarsctlError(f"{spec!r} is not a valid Hub repo id: {exc}") from None
        return cls(repo_id=repo_id, revision=revision or None, repo_type=repo_type)

    def __str__(self) -> str:
        prefix = f"{self.repo_type}s/" if self.repo_type else ""
        return f"{prefix}{self.repo_id}" + (f"@{self.revision}" if self.revision else "")


def looks_like_local_path(spec: str) -> bool:
    """True for specs that can only be a path: absolute, ./, ../, ~, or with a backslash."""
    return spec.startswith(("/", "./", "../", "~", ".\\")) or "\\" in spec or spec in (".", "..")


def is_offline() -> bool:
    return hf_constants.is_offline_mode()


def _pull_hint(ref: HubRef, repo_type: str | None) -> str:
    kind = f" --repo-type {repo_type}" if repo_type and not ref.repo_type else ""
    return f"marsctl hub pull {ref}{kind}"


def _cached_types(ref: HubRef, cache_dir: str | Path | None) -> list[str]:
    root = Path(cache_dir or hf_constants.HF_HUB_CACHE)
    return [t for t in REPO_TYPES if (root / repo_folder_name(repo_id=ref.repo_id, repo_type=t)).is_dir()]


def download_snapshot(
    ref: HubRef,
    repo_type: str | None = None,
    *,
    cache_dir: str | Path | None = None,
    endpoint: str | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> Path:
    """Snapshot of ``ref`` in the Hugging Face cache, downloading what is missing.

    ``repo_type`` (or the type in the spec) picks model or dataset; when neither gives one,
    a model repo is tried first, then a dataset repo. Every failure is a one-line
    :class:`MarsctlError` that says what to do.
    """
    wanted = ref.repo_type or repo_type
    offline = local_files_only or is_offline()
    endpoint = endpoint or hf_constants.ENDPOINT  # one endpoint for the API calls and the file URLs
    if wanted:
        candidates = [wanted]
    elif offline:
        candidates = _cached_types(ref, cache_dir) or ["model"]
    else:
        candidates = list(REPO_TYPES)
    last_missing: Exception | None = None
    for candidate in candidates:
        try:
            folder = snapshot_download(
                ref.repo_id,
                repo_type=candidate,
                revision=ref.revision,
                cache_dir=cache_dir,
                endpoint=endpoint,
                token=token,
                local_files_only=local_files_only,
            )
            return Path(folder)
        except GatedRepoError as exc:
            raise MarsctlError(
                f"{ref}: the Hub repo is gated; accept its terms on the Hub and log in (hf auth login or HF_TOKEN)"
            ) from exc
        except RepositoryNotFoundError as exc:
            last_missing = exc
            continue
        except RevisionNotFoundError as exc:
            raise MarsctlError(f"{ref}: revision {ref.revision!r} not found in {candidate} repo {ref.repo_id}") from exc
        except IncompleteSnapshotError as exc:
            raise MarsctlError(
                f"{ref}: the cached copy is incomplete and the Hub cannot be reached; run `{_pull_hint(ref, candidate)}` "
                "with network access"
            ) from exc
        except LocalEntryNotFoundError as exc:
            if offline:
                why = "HF_HUB_OFFLINE=1 is set" if is_offline() else "only the local cache was searched"
                raise ArtifactNotFound(
                    str(ref), f"not in the Hugging Face cache ({why}); run `{_pull_hint(ref, wanted)}` with network "
                    "access first"
                ) from exc
            raise MarsctlError(
                f"{ref}: the Hub could not be reached and it is not in the Hugging Face cache; check the network "
                f"(HF_ENDPOINT={endpoint}) and run `{_pull_hint(ref, wanted)}`"
            ) from exc
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else "?"
            raise MarsctlError(f"{ref}: the Hub answered HTTP {status} ({_first_line(exc)})") from exc
        except ValueError as exc:  # huggingface_hub refuses a file name such as ../x (it would land outside the cache)
            raise MarsctlError(f"{ref}: the repo holds a file whose name is not a safe path ({_first_line(exc)}); nothing of it was used") from exc
        except (httpx2.HTTPError, OSError) as exc:
            raise MarsctlError(
                f"{ref}: download interrupted ({type(exc).__name__}: {_first_line(exc)}); run the same command again "
                "to resume (finished files stay in the Hugging Face cache)"
            ) from exc
    kinds = " or ".join(candidates) + " repo"
    raise ArtifactNotFound(
        str(ref), f"no such {kinds} on the Hub, or it is private (log in with `hf auth login` or set HF_TOKEN)"
    ) from last_missing


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def resolve_artifact(
    spec: str | os.PathLike[str],
    repo_type: str | None = None,
    *,
    cache_dir: str | Path | None = None,
    endpoint: str | None = None,
    token: str | bool | None = None,
) -> Path:
    """Local directory for an artifact spec: the path itself, or the cached Hub snapshot.

    ``repo_type`` is what the option expects ("dataset" for ``--data``, "model" for
    ``--model``/``--encoder``; None to try both). A path that exists is always used as is;
    a spec that is neither an existing path nor a Hub id is an error naming it.
    """
    if isinstance(spec, Path):
        if not spec.expanduser().exists():
            raise MarsctlError(f"{spec}: no such file or directory")
        return spec.expanduser()
    text = os.fspath(spec)
    local = Path(text).expanduser()
    if local.exists():
        return local
    if looks_like_local_path(text):
        raise MarsctlError(f"{text}: no such file or directory")
    try:
        ref = HubRef.parse(text)
    except MarsctlError:
        raise MarsctlError(f"{text}: no such local path, and not a Hub id (org/name[@revision])") from None
    if repo_type is not None and repo_type not in REPO_TYPES:
        raise MarsctlError(f"repo type must be one of {', '.join(REPO_TYPES)}, got {repo_type!r}")
    try:
        return download_snapshot(ref, repo_type, cache_dir=cache_dir, endpoint=endpoint, token=token)
    except ArtifactNotFound as exc:
        # it may have been meant as a local path: say that it is not one either
        raise ArtifactNotFound(text, f"not a local path, and {exc.reason}") from exc


def pull_artifact(
    spec: str,
    repo_type: str | None = None,
    *,
    cache_dir: str | Path | None = None,
    endpoint: str | None = None,
    token: str | bool | None = None,
) -> Path:
    """Download a Hub artifact into the standard cache (or find it there offline); return its folder."""
    ref = HubRef.parse(spec)
    if repo_type is not None and repo_type not in REPO_TYPES:
        raise MarsctlError(f"repo type must be one of {', '.join(REPO_TYPES)}, got {repo_type!r}")
    return download_snapshot(ref, repo_type, cache_dir=cache_dir, endpoint=endpoint, token=token)


def optional_artifact(spec: str | os.PathLike[str] | None, repo_type: str | None = None) -> Path | None:
    """The artifact directory a spec names, or None for built-in names (``builtin``, ``laion-clap:...``).

    For options like ``--encoder`` that take either a name or an artifact: stages use it
    to fingerprint the artifact as a stage input.
    """
    if spec is None or not os.fspath(spec):
        return None
    text = os.fspath(spec)
    if Path(text).expanduser().exists():
        return Path(text).expanduser()
    if ":" in text.split("/", 1)[0] or "/" not in text:
        return None  # a name such as "builtin" or "laion-clap:630k-audioset"
    return resolve_artifact(text, repo_type)
