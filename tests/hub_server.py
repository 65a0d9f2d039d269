"""A small loopback stand-in for the Hugging Face Hub, for tests.

It implements only the HTTP endpoints that ``huggingface_hub`` 2.4 calls for
``create_repo``, ``upload_folder`` (both the streamed multi-commit pipeline and the legacy
single-commit + LFS path), ``repo_info``, ``list_repo_tree``, ``hf_hub_download`` and
``snapshot_download``, with the same URL layout, headers and JSON shapes as the real Hub
(read from the library's source: ``hf_api.py``, ``_commit_api.py``, ``lfs.py``,
``file_download.py``, ``_snapshot_download.py``). It never implements Xet storage: the
preupload answer is ``regular`` for every file unless ``lfs_threshold`` makes it ``lfs``,
and the Xet path is only ever taken for ``lfs`` files, so tests that want LFS must disable
Xet (``huggingface_hub.constants.HF_HUB_DISABLE_XET = True``, i.e. ``HF_HUB_DISABLE_XET=1``).

Everything it receives is recorded, so a test can check which files were sent, how many
commits there were, and which Authorization header came with each request.

Use it as a context manager::

    with FakeHub() as hub:
        api = HfApi(endpoint=hub.endpoint, token="hf_test")
        ...
        hub.commits[-1].files  # {path: bytes}
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

PREFIX_TO_TYPE = {"models": "model", "datasets": "dataset", "spaces": "space"}


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob, as the Hub reports it for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class ReceivedCommit:
    """One successful commit as the server received it."""

    repo_type: str
    repo_id: str
    revision: str
    summary: str
    sha: str
    #: regular files: their bytes as sent inline (base64) in the commit payload
    regular_files: dict[str, bytes] = field(default_factory=dict)
    #: LFS files: the bytes that were PUT to the LFS upload URL for that oid
    lfs_files: dict[str, bytes] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)

    @property
    def files(self) -> dict[str, bytes]:
        return {**self.regular_files, **self.lfs_files}


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    #: commit sha -> {path: (bytes, is_lfs)}
    trees: dict[str, dict[str, tuple[bytes, bool]]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)


@dataclass
class RequestRecord:
    method: str
    path: str
    authorization: str | None
    body: bytes


class FakeHub:
    """A threaded HTTP server on 127.0.0.1 speaking the Hub's upload/download protocol."""

    def __init__(self, *, lfs_threshold: int | None = None) -> None:
        #: files at least this large are answered ``lfs`` by preupload (None: all regular)
        self.lfs_threshold = lfs_threshold
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_store: dict[str, bytes] = {}
        self.commits: list[ReceivedCommit] = []
        self.requests: list[RequestRecord] = []
        #: after this many successful commits, every commit request fails with HTTP 400
        #: (simulates an upload interrupted half-way); None: never fail
        self.fail_commits_after: int | None = None
        self.failed_commit_requests = 0
        #: after this many successful commits, commit requests wait (unapplied) until
        #: ``release_held_commits()``, then fail: lets a test kill the client mid-upload
        self.hold_commits_after: int | None = None
        self.held_commit_requests = 0
        self._release = threading.Event()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ helpers for tests
    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def head_files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> dict[str, bytes]:
        """The files of a repo at a branch or commit, as the Hub would serve them."""
        repo = self.repo(repo_id, repo_type)
        sha = repo.branches.get(revision, revision)
        return {path: data for path, (data, _) in repo.trees[sha].items()}

    def release_held_commits(self) -> None:
        self._release.set()

    def all_received_bytes(self) -> list[bytes]:
        """Every request body the server received (commit payloads, LFS uploads, ...)."""
        return [r.body for r in self.requests]

    # ------------------------------------------------------------------ protocol
    def _create_repo(self, payload: dict) -> tuple[int, dict]:
        name, org = payload["name"], payload.get("organization")
        repo_id = f"{org}/{name}" if org else name
        repo_type = payload.get("type") or "model"
        key = (repo_type, repo_id)
        if key in self.repos:
            return 409, {"error": "You already created this repo", "url": self._repo_url(repo_type, repo_id)}
        repo = Repo(repo_type=repo_type, repo_id=repo_id, private=payload.get("visibility") == "private")
        initial = hashlib.sha1(f"init {repo_type} {repo_id}".encode()).hexdigest()
        gitattributes = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
        repo.trees[initial] = {".gitattributes": (gitattributes, False)}
        repo.branches["main"] = initial
        self.repos[key] = repo
        return 200, {"url": self._repo_url(repo_type, repo_id)}

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        return f"{self.endpoint}/{prefix}{repo_id}"

    def _resolve(self, repo: Repo, revision: str) -> str | None:
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.trees:
            return revision
        return None

    def _preupload(self, repo: Repo, revision: str, payload: dict) -> dict:
        sha = self._resolve(repo, revision) or repo.branches["main"]
        tree = repo.trees[sha]
        files = []
        for item in payload["files"]:
            is_lfs = self.lfs_threshold is not None and item["size"] >= self.lfs_threshold
            entry: dict[str, Any] = {
                "path": item["path"],
                "uploadMode": "lfs" if is_lfs else "regular",
                "shouldIgnore": False,
            }
            if item["path"] in tree:
                data, remote_lfs = tree[item["path"]]
                # the client compares this oid with sha256 (lfs) or the git sha1 (regular)
                entry["oid"] = hashlib.sha256(data).hexdigest() if remote_lfs else git_blob_sha1(data)
            files.append(entry)
        return {"files": files, "commitOid": sha}

    def _lfs_batch(self, payload: dict) -> dict:
        objects = []
        for obj in payload["objects"]:
            answer: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.lfs_store:
                answer["actions"] = {"upload": {"href": f"{self.endpoint}/lfs-upload/{obj['oid']}"}}
            objects.append(answer)
        return {"transfer": "basic", "objects": objects}

    def _commit(self, repo: Repo, revision: str, body: bytes) -> tuple[int, dict]:
        if self.fail_commits_after is not None and len(self.commits) >= self.fail_commits_after:
            self.failed_commit_requests += 1
            return 400, {"error": "injected failure: the upload was interrupted"}
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = lines[0]["value"]
        parent = self._resolve(repo, revision)
        if parent is None:
            return 404, {"error": f"Revision {revision} not found"}
        tree = dict(repo.trees[parent])
        received = ReceivedCommit(repo.repo_type, repo.repo_id, revision, header["summary"], sha="")
        for item in lines[1:]:
            value = item["value"]
            if item["key"] == "file":
                data = base64.b64decode(value["content"])
                tree[value["path"]] = (data, False)
                received.regular_files[value["path"]] = data
            elif item["key"] == "lfsFile":
                data = self.lfs_store.get(value["oid"])
                if data is None:
                    return 422, {"error": f"LFS object {value['oid']} was never uploaded"}
                tree[value["path"]] = (data, True)
                received.lfs_files[value["path"]] = data
            elif item["key"] in ("deletedFile", "deletedFolder"):
                tree.pop(value["path"], None)
                received.deleted.append(value["path"])
            else:
                return 400, {"error": f"unknown commit key {item['key']}"}
        sha = hashlib.sha1(f"{parent}{len(self.commits)}{sorted(tree)}".encode()).hexdigest()
        received.sha = sha
        repo.trees[sha] = tree
        repo.branches[revision] = sha
        self.commits.append(received)
        url = f"{self._repo_url(repo.repo_type, repo.repo_id)}/commit/{sha}"
        return 200, {"commitUrl": url, "commitOid": sha, "pullRequestUrl": None}

    def _tree_entries(self, tree: dict[str, tuple[bytes, bool]]) -> list[dict]:
        entries = []
        for path in sorted(tree):
            data, is_lfs = tree[path]
            entry: dict[str, Any] = {"type": "file", "path": path, "size": len(data)}
            if is_lfs:
                pointer = _lfs_pointer(hashlib.sha256(data).hexdigest(), len(data))
                entry["oid"] = git_blob_sha1(pointer)
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": len(pointer)}
            else:
                entry["oid"] = git_blob_sha1(data)
            entries.append(entry)
        return entries


def _split_repo_path(parts: list[str]) -> tuple[str, list[str]]:
    """``[org, name, rest...]`` -> ``("org/name", rest)``."""
    return f"{parts[0]}/{parts[1]}", parts[2:]


def _make_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # silence the default stderr log
            pass

        # -------------------------------------------------------------- plumbing
        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        break
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                return b"".join(chunks)
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                  content_type: str = "application/json", head: bool = False) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if not head and body:
                self.wfile.write(body)

        def _json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps(data).encode(), headers)

        def _error(self, status: int, code: str, message: str, head: bool = False,
                   extra: dict[str, str] | None = None) -> None:
            headers = {"X-Error-Code": code, "X-Error-Message": message, **(extra or {})}
            self._send(status, json.dumps({"error": message}).encode(), headers, head=head)

        def _record(self, body: bytes) -> None:
            with hub._lock:
                hub.requests.append(RequestRecord(self.command, self.path, self.headers.get("Authorization"), body))

        # -------------------------------------------------------------- verbs
        def do_HEAD(self) -> None:
            self._record(b"")
            self._get(head=True)

        def do_GET(self) -> None:
            self._record(b"")
            self._get(head=False)

        def do_POST(self) -> None:
            body = self._read_body()
            self._record(body)
            if (
                hub.hold_commits_after is not None
                and "/commit/" in self.path
                and len(hub.commits) >= hub.hold_commits_after
            ):
                with hub._lock:
                    hub.held_commit_requests += 1
                hub._release.wait(timeout=120)
                self._json(503, {"error": "held commit released unapplied"})
                return
            with hub._lock:
                self._post(body)

        def do_PUT(self) -> None:
            body = self._read_body()
            self._record(body)
            path = urlsplit(self.path).path
            if path.startswith("/lfs-upload/"):
                oid = path.rsplit("/", 1)[1]
                if hashlib.sha256(body).hexdigest() != oid:
                    self._json(400, {"error": "sha256 mismatch"})
                    return
                with hub._lock:
                    hub.lfs_store[oid] = body
                self._send(200, b"", {"ETag": f'"{oid}"'})
                return
            self._error(404, "NotFound", f"no PUT route for {path}")

        # -------------------------------------------------------------- routes
        def _post(self, body: bytes) -> None:
            url = urlsplit(self.path)
            parts = [unquote(p) for p in url.path.strip("/").split("/")]
            if parts == ["api", "repos", "create"]:
                status, data = hub._create_repo(json.loads(body))
                self._json(status, data)
                return
            if parts == ["api", "validate-yaml"]:
                content = json.loads(body)["content"]
                errors = []
                if content.startswith("---"):
                    try:
                        yaml.safe_load(content.split("---")[1])
                    except yaml.YAMLError as exc:
                        errors.append({"message": str(exc)})
                self._json(400 if errors else 200, {"errors": errors, "warnings": []})
                return
            if len(parts) >= 6 and parts[0] == "api" and parts[1] in PREFIX_TO_TYPE:
                repo_type = PREFIX_TO_TYPE[parts[1]]
                repo_id, rest = _split_repo_path(parts[2:])
                repo = hub.repos.get((repo_type, repo_id))
                if repo is None:
                    self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
                    return
                revision = unquote("/".join(rest[1:]))
                if rest[0] == "preupload":
                    self._json(200, hub._preupload(repo, revision, json.loads(body)))
                    return
                if rest[0] == "commit":
                    status, data = hub._commit(repo, revision, body)
                    self._json(status, data)
                    return
            # LFS batch: /{prefix}{org}/{name}.git/info/lfs/objects/batch
            if parts[-4:] == ["info", "lfs", "objects", "batch"]:
                self._json(200, hub._lfs_batch(json.loads(body)), {"Content-Type": "application/vnd.git-lfs+json"})
                return
            self._error(404, "NotFound", f"no POST route for {url.path}")

        def _get(self, head: bool) -> None:
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            parts = [unquote(p) for p in url.path.strip("/").split("/")]
            with hub._lock:
                # /api/{models|datasets}/{org}/{name}[/revision/{rev} | /tree/{rev}[/{path}]]
                if len(parts) >= 4 and parts[0] == "api" and parts[1] in PREFIX_TO_TYPE:
                    repo_type = PREFIX_TO_TYPE[parts[1]]
                    repo_id, rest = _split_repo_path(parts[2:])
                    repo = hub.repos.get((repo_type, repo_id))
                    if repo is None:
                        self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head)
                        return
                    revision = rest[1] if len(rest) >= 2 else "main"
                    sha = hub._resolve(repo, revision)
                    if sha is None:
                        self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
                        return
                    tree = repo.trees[sha]
                    if not rest or rest[0] == "revision":
                        siblings = [{"rfilename": p} for p in sorted(tree)]
                        self._json(200, {"id": repo_id, "sha": sha, "private": repo.private, "siblings": siblings})
                        return
                    if rest[0] == "tree":
                        prefix = "/".join(rest[2:])
                        recursive = query.get("recursive", ["False"])[0].lower() == "true"
                        entries = [
                            e for e in hub._tree_entries(tree)
                            if (not prefix or e["path"].startswith(prefix + "/"))
                            and (recursive or "/" not in e["path"][len(prefix) + 1 if prefix else 0:])
                        ]
                        self._json(200, entries)
                        return
                # /{prefix}/{org}/{name}/resolve/{rev}/{path...}
                repo_type = "model"
                if parts and parts[0] in ("datasets", "spaces"):
                    repo_type = PREFIX_TO_TYPE[parts[0]]
                    parts = parts[1:]
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo_id = f"{parts[0]}/{parts[1]}"
                    repo = hub.repos.get((repo_type, repo_id))
                    if repo is None:
                        self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head)
                        return
                    sha = hub._resolve(repo, parts[3])
                    if sha is None:
                        self._error(404, "RevisionNotFound", f"Invalid rev id: {parts[3]}", head)
                        return
                    filename = "/".join(parts[4:])
                    if filename not in repo.trees[sha]:
                        self._error(404, "EntryNotFound", f"{filename} does not exist", head,
                                    {"X-Repo-Commit": sha})
                        return
                    data, is_lfs = repo.trees[sha][filename]
                    headers = {"X-Repo-Commit": sha}
                    if is_lfs:
                        headers["X-Linked-Etag"] = f'"{hashlib.sha256(data).hexdigest()}"'
                        headers["X-Linked-Size"] = str(len(data))
                        headers["ETag"] = f'"{git_blob_sha1(data)}"'
                    else:
                        headers["ETag"] = f'"{git_blob_sha1(data)}"'
                    self._send(200, data, headers, content_type="application/octet-stream", head=head)
                    return
            self._error(404, "NotFound", f"no GET route for {url.path}", head)

    return Handler


# ---------------------------------------------------------------------------- pytest fixtures
# (imported by the tests/test_hub*.py modules; kept here so that no conftest is needed)

import secrets  # noqa: E402
import string  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


def random_token() -> str:
    """A fresh string shaped like a Hugging Face user access token."""
    alphabet = string.ascii_letters + string.digits
    return "hf_" + "".join(secrets.choice(alphabet) for _ in range(34))


@pytest.fixture
def hf_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """An isolated Hugging Face home + cache, online, with a fresh token in HF_TOKEN.

    huggingface_hub reads some settings once at import (constants.*); those are patched
    too, and the same values are exported for subprocesses.
    """
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    cache = home / "hub"
    token = random_token()
    env = {"HF_HOME": str(home), "HF_HUB_CACHE": str(cache), "HF_TOKEN": token}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "HF_HUB_DISABLE_XET"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    return env


@pytest.fixture
def fake_hub(hf_env: dict[str, str], monkeypatch: pytest.MonkeyPatch):
    """A running :class:`FakeHub`; huggingface_hub's default endpoint points at it."""
    from huggingface_hub import constants

    with FakeHub() as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        yield hub


def go_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """What HF_HUB_OFFLINE=1 does, for the current process."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


# ---------------------------------------------------------------------------- test artifacts


def write_tone(path: Path, freq: float, seconds: float = 0.25, sr: int = 16_000) -> None:
    import numpy as np
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype("float32"), sr, subtype="PCM_24")


def make_dataset_artifact(root: Path, *, junk: bool = True, token: str | None = None) -> list[str]:
    """A small dataset build laid out as `marsctl data build` writes it; returns its real files.

    With ``junk``, also the things a push must never send: an atomic-write temporary, a
    huggingface upload cache, __pycache__, a lock file, a ``token`` file holding the token,
    a hidden half-written frames folder and the download scratch folder.
    """
    import datasets

    clips = [("dog", "c1", 440.0, "train"), ("dog", "c2", 470.0, "test"), ("cat", "c3", 880.0, "test")]
    for label, clip_id, freq, _ in clips:
        write_tone(root / "clips" / label / f"{clip_id}.flac", freq)
    table = datasets.Dataset.from_dict({
        "clip_id": [c[1] for c in clips],
        "label": [c[0] for c in clips],
        "split": [c[3] for c in clips],
        "audio_path": [f"clips/{c[0]}/{c[1]}.flac" for c in clips],
        "frame_paths": [[] for _ in clips],
        "keep": [True, True, True],
        "drop_reason": ["", "", ""],
    })
    (root / "manifests").mkdir(parents=True, exist_ok=True)
    table.to_parquet(str(root / "manifests" / "clips.parquet"))
    write_tone(root / "mixtures" / "test" / "m0" / "mixture.wav", 600.0)
    (root / "dataset.json").write_text(json.dumps({
        "schema_version": 1, "recipe": {"name": "toy", "classes": ["dog", "cat"], "sample_rate": 16000},
        "counts": {"clips": 3, "kept": 3, "mixtures": 1},
    }, indent=2))
    real = ["clips/cat/c3.flac", "clips/dog/c1.flac", "clips/dog/c2.flac", "dataset.json",
            "manifests/clips.parquet", "mixtures/test/m0/mixture.wav"]
    if junk:
        (root / "clips" / "dog" / ".c4.k2j3h4.tmp.flac").write_bytes(b"half-written")
        (root / ".cache" / "huggingface" / "upload").mkdir(parents=True)
        (root / ".cache" / "huggingface" / "upload" / "dataset.json.metadata").write_text("state")
        (root / "__pycache__").mkdir()
        (root / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0pyc")
        (root / "manifests" / "clips.parquet.lock").write_text("")
        (root / "token").write_text(token or random_token())
        (root / "frames" / "dog" / ".c9.x8y7z6").mkdir(parents=True)  # a half-extracted frames folder
        (root / "frames" / "dog" / ".c9.x8y7z6" / "000.jpg").write_bytes(b"\xff\xd8 partial")
        (root / "state" / "tmp" / "c9.abc").mkdir(parents=True)  # data build's download scratch
        (root / "state" / "tmp" / "c9.abc" / "video.mp4.part").write_bytes(b"partial download")
    return real


def make_encoder_artifact(root: Path, *, weights_bytes: int = 4096) -> list[str]:
    """A reward-encoder directory: config.json + model.safetensors + its own README card + metrics."""
    import torch
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    n = max(1, weights_bytes // 4)
    save_file({"audio_head.weight": torch.arange(n, dtype=torch.float32)}, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({"kind": "reward-encoder", "embedding_dim": 8, "base": "builtin"}))
    (root / "metrics.json").write_text(json.dumps({"stage1": {"text_to_audio_r1": 0.5, "gap": 0.12}}))
    (root / "README.md").write_text("# toy encoder\n\nAligned in three stages on toy clips.\n")
    return ["README.md", "config.json", "metrics.json", "model.safetensors"]
