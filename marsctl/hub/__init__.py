"""Artifacts on the Hugging Face Hub: resolve, pull, push, and the stage cache.

- :func:`resolve_artifact` turns ``--data``/``--model``/``--encoder`` values (a local path or
  ``org/name[@revision]``) into a local directory, through the standard Hugging Face cache;
  works offline (``HF_HUB_OFFLINE=1``) for anything pulled before.
- :func:`pull_artifact` downloads a Hub artifact into that cache.
- :func:`push_artifact` publishes an artifact directory (dataset build, reward encoder,
  separator, RL policy, eval report) to a dataset or model repo with a generated card;
  interrupted uploads resume when run again. An artifact's kind is recorded in its
  ``artifact.json`` (:func:`write_artifact_kind`; a dataset's in ``dataset.json``).
- :func:`content_hash` and :class:`StageCache` give every long stage ``--reuse`` and
  ``--push-to``.
"""

from marsctl.hub.artifacts import (
    ARTIFACT_FILE,
    KIND_REPO_TYPES,
    KINDS,
    PROVENANCE_FILE,
    ArtifactInfo,
    files_fingerprint,
    ignore_patterns,
    inspect_artifact,
    list_artifact_files,
    read_provenance,
    write_artifact_kind,
)
from marsctl.hub.push import PushPlan, PushResult, check_can_push, plan_push, push_artifact
from marsctl.hub.refs import HubRef, optional_artifact, pull_artifact, resolve_artifact
from marsctl.hub.stage import StageCache, StageOutcome, content_hash, input_fingerprint, run_stage

__all__ = [
    "ARTIFACT_FILE",
    "ArtifactInfo",
    "HubRef",
    "KINDS",
    "KIND_REPO_TYPES",
    "PROVENANCE_FILE",
    "PushPlan",
    "PushResult",
    "StageCache",
    "StageOutcome",
    "check_can_push",
    "content_hash",
    "files_fingerprint",
    "ignore_patterns",
    "input_fingerprint",
    "inspect_artifact",
    "list_artifact_files",
    "optional_artifact",
    "plan_push",
    "pull_artifact",
    "push_artifact",
    "read_provenance",
    "resolve_artifact",
    "run_stage",
    "write_artifact_kind",
]
