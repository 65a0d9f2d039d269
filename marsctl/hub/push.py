"""Publishing an artifact directory to a Hub repo of the right type, with a generated card.

The upload is ``HfApi.upload_folder``. In huggingface_hub 2.x (with ``hf_xet``, a default
dependency) that call *is* the large-folder upload: a streamed pipeline that commits big
folders in several commits and resumes an interrupted upload when the same call is run
again (files already committed are skipped by comparing object ids with the Hub, chunks
already uploaded are deduplicated by Xet storage). The 1.x ``upload_large_folder`` is gone
from 2.x; re-running ``marsctl hub push`` is how a user resumes.

Never uploaded: the patterns of :func:`marsctl.hub.artifacts.ignore_patterns` (caches,
``.*.tmp*`` temporaries, locks, ``__pycache__``, token files). A push refuses to start if
any file to send contains the current token or a token-shaped string, or is a symlink
leading outside the artifact. The card's metadata records the kind (``marsctl.kind``). The token comes from
``HF_TOKEN`` or the ``hf auth login`` file through huggingface_hub, and is never printed.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx2
from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError

from marsctl.errors import MarsctlError
from marsctl.files import write_text_atomic
from marsctl.hub.artifacts import (
    ARTIFACT_FILE,
    CARD_FILE,
    ArtifactInfo,
    files_fingerprint,
    ignore_patterns,
    inspect_artifact,
    list_artifact_files,
)
from marsctl.hub.secrets import SCAN_CHUNK_BYTES, find_secrets, links_leaving, redact_secrets
from marsctl.hub.card import render_card
from marsctl.hub.refs import HubRef, is_offline


@dataclass(frozen=True)
class PushPlan:
    """What a push will send (computed without any network access)."""

    info: ArtifactInfo
    repo_id: str
    files: list[str]
    card: str
    content_fingerprint: str
    include_checkpoints: bool = False

    @property
    def repo_type(self) -> str:
        return self.info.repo_type


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    repo_type: str
    kind: str
    commit: str
    commit_url: str
    files: list[str]
    content_fingerprint: str
    #: set when the kind was guessed (an older artifact with no kind record)
    kind_note: str = ""

    @property
    def spec(self) -> str:
        """How to refer to exactly this upload: ``[datasets/]org/name@<commit>``."""
        prefix = "datasets/" if self.repo_type == "dataset" else ""
        return f"{prefix}{self.repo_id}@{self.commit}"


def _current_token(token: str | bool | None) -> str | None:
    if isinstance(token, str):
        return token
    if token is False:
        return None
    return get_token()


def check_can_push(repo_id: str, token: str | bool | None = None) -> str:
    """Fail early (before a long stage runs) if a push to ``repo_id`` cannot work; return the token."""
    HubRef.parse(repo_id)
    if is_offline():
        raise MarsctlError(f"cannot push to {repo_id}: HF_HUB_OFFLINE=1 is set")
    current = _current_token(token)
    if not current:
        raise MarsctlError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a write token is needed to push)")
    return current


def plan_push(
    path: str | Path,
    repo_id: str,
    *,
    kind: str | None = None,
    include_checkpoints: bool = False,
    token: str | bool | None = None,
    scan_chunk_bytes: int = SCAN_CHUNK_BYTES,
) -> PushPlan:
    """Inspect the artifact, list the files to send, check them for secrets, render the card.

    Refused: a file that holds the current token (every file, any size, read in chunks of
    ``scan_chunk_bytes``) or a token-shaped string (text files), and a symlink that leads
    outside the artifact.
    """
    ref = HubRef.parse(repo_id)
    if ref.revision:
        raise MarsctlError(f"{repo_id}: push goes to the repo's default branch; leave out '@{ref.revision}'")
    info = inspect_artifact(path, kind)
    if ref.repo_type and ref.repo_type != info.repo_type:
        raise MarsctlError(
            f"{info.path}: a {info.kind} goes to a {info.repo_type} repo, not a {ref.repo_type} repo ({repo_id})"
        )
    status = info.config.get("status") if info.kind == "dataset" else None
    if status not in (None, "complete"):
        raise MarsctlError(f"{info.path}: the dataset build is not finished (status {status!r}); rerun `marsctl data build` first")
    files = list_artifact_files(info.path, include_checkpoints=include_checkpoints)
    if not [f for f in files if f not in (CARD_FILE, ARTIFACT_FILE)]:
        raise MarsctlError(f"{info.path}: nothing to push (the directory has no artifact files)")
    leaving = links_leaving(info.path, files)
    if leaving:
        raise MarsctlError(
            f"{info.path}: refusing to push, {', '.join(leaving[:5])} link(s) to files outside the artifact; "
            "copy what belongs to it in, or remove the link"
        )
    offenders = find_secrets(info.path, files, _current_token(token), chunk_size=scan_chunk_bytes)
    if offenders:
        raise MarsctlError(
            f"{info.path}: refusing to push, {', '.join(offenders[:5])} contain(s) a Hugging Face token; remove it"
        )
    fingerprint = files_fingerprint(info.path, files)
    card = render_card(info, repo_id=ref.repo_id, files=files, content_fingerprint=fingerprint,
                       token=_current_token(token))
    if CARD_FILE not in files:
        files = sorted([*files, CARD_FILE])
    return PushPlan(info=info, repo_id=ref.repo_id, files=files, card=card, content_fingerprint=fingerprint,
                    include_checkpoints=include_checkpoints)


def push_artifact(
    path: str | Path,
    repo_id: str,
    *,
    kind: str | None = None,
    include_checkpoints: bool = False,
    private: bool | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
    token: str | bool | None = None,
) -> PushResult:
    """Push the artifact directory ``path`` to ``repo_id`` (created if needed) with a generated card.

    The card is written into the directory as README.md first (atomically), so the pushed
    folder and the local one stay identical; a snapshot of the Hugging Face cache (a pulled
    artifact pushed to another repo) is left untouched and sent through a temporary folder
    of links instead. Run it again after an interruption to resume.
    Training checkpoints (``checkpoints/``) are sent only with ``include_checkpoints``.
    """
    current = check_can_push(repo_id, token)
    plan = plan_push(path, repo_id, kind=kind, include_checkpoints=include_checkpoints, token=token)
    root = plan.info.path
    api = HfApi(endpoint=endpoint, token=token)
    message = commit_message or f"marsctl: push {plan.info.kind} ({plan.content_fingerprint[:19]})"
    with contextlib.ExitStack() as stack:
        if is_cache_snapshot(root):
            # a pulled artifact (e.g. mirrored to another repo): the cache stays untouched
            folder = stack.enter_context(_linked_copy(root, plan.files, plan.card))
        else:
            write_text_atomic(root / CARD_FILE, plan.card)
            folder = root
        info = _upload(api, plan, folder, message=message, private=private, current=current)
    return PushResult(
        repo_id=plan.repo_id,
        repo_type=plan.repo_type,
        kind=plan.info.kind,
        commit=info.oid,
        commit_url=info.commit_url,
        files=plan.files,
        content_fingerprint=plan.content_fingerprint,
        kind_note=plan.info.kind_note,
    )


def is_cache_snapshot(path: Path) -> bool:
    """Whether ``path`` is a snapshot folder of the Hugging Face cache (``<type>s--org--name/snapshots/<sha>``)."""
    resolved = Path(path).resolve()
    return resolved.parent.name == "snapshots" and "--" in resolved.parent.parent.name


@contextlib.contextmanager
def _linked_copy(root: Path, files: list[str], card: str) -> Iterator[Path]:
    """A temporary folder of symlinks to ``root``'s files, plus the card: what to upload."""
    with tempfile.TemporaryDirectory(prefix="marsctl-push-") as tmp:
        folder = Path(tmp)
        for name in files:
            if name == CARD_FILE:
                continue
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).symlink_to((root / name).resolve())
        (folder / CARD_FILE).write_text(card, encoding="utf-8")
        yield folder


def _upload(api: HfApi, plan: PushPlan, folder: Path, *, message: str, private: bool | None, current: str) -> Any:
    """create_repo + upload_folder, with the library's errors turned into one-line MarsctlErrors."""
    root = plan.info.path
    try:
        api.create_repo(plan.repo_id, repo_type=plan.repo_type, private=private, exist_ok=True)
        return api.upload_folder(
            repo_id=plan.repo_id,
            repo_type=plan.repo_type,
            folder_path=folder,
            commit_message=message,
            ignore_patterns=ignore_patterns(include_checkpoints=plan.include_checkpoints),
        )
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        first = redact_secrets((str(exc).strip().splitlines() or ["error"])[0], current)
        raise MarsctlError(
            f"push of {root} to {plan.repo_type} repo {plan.repo_id} failed (HTTP {status}: {first}); "
            "run the same command again to resume, files already committed are skipped"
        ) from None
    except (httpx2.HTTPError, OSError, RuntimeError) as exc:
        raise MarsctlError(
            f"push of {root} to {plan.repo_id} was interrupted ({redact_secrets(str(exc), current)}); "
            "run the same command again to resume"
        ) from None
