"""marsctl.hub: push to a loopback Hub, pull into the real cache layout, resolve offline.

Every test runs huggingface_hub's own code (HfApi.create_repo/upload_folder,
snapshot_download, hf_hub_download) against tests/hub_server.py on 127.0.0.1: nothing is
mocked on the client side. Xet stays enabled (the default) except in the LFS test, which
sets HF_HUB_DISABLE_XET because the loopback server does not implement Xet storage.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from huggingface_hub import RepoCard
from huggingface_hub import constants as hf_constants

from hub_server import (  # noqa: F401  (fixtures)
    fake_hub,
    go_offline,
    hf_env,
    make_dataset_artifact,
    make_encoder_artifact,
)
from marsctl.errors import MarsctlError
from marsctl.hub import (
    HubRef,
    inspect_artifact,
    list_artifact_files,
    plan_push,
    pull_artifact,
    push_artifact,
    resolve_artifact,
)


# ---------------------------------------------------------------------------- specs


@pytest.mark.parametrize(
    ("spec", "repo_id", "revision", "repo_type"),
    [
        ("org/name", "org/name", None, None),
        ("org/name@v1.0", "org/name", "v1.0", None),
        ("org/name@refs/pr/3", "org/name", "refs/pr/3", None),
        ("datasets/org/vgg-clean@" + "a" * 40, "org/vgg-clean", "a" * 40, "dataset"),
        ("hf://models/org/enc@main", "org/enc", "main", "model"),
    ],
)
def test_hub_ref_parse(spec: str, repo_id: str, revision: str | None, repo_type: str | None) -> None:
    ref = HubRef.parse(spec)
    assert (ref.repo_id, ref.revision, ref.repo_type) == (repo_id, revision, repo_type)
    assert HubRef.parse(str(ref)) == ref


@pytest.mark.parametrize("spec", ["name-only", "org/name@", "a/b/c", "org/na me", "org/--bad"])
def test_hub_ref_rejects_malformed_ids(spec: str) -> None:
    with pytest.raises(MarsctlError):
        HubRef.parse(spec)


def test_resolve_local_paths_win_and_bad_specs_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    # an existing directory is used as is, even when it looks like a Hub id
    assert resolve_artifact("org/name", "model") == Path("org/name")
    assert resolve_artifact(tmp_path / "org", "model") == tmp_path / "org"
    with pytest.raises(MarsctlError, match=r"\./runs/missing: no such file or directory"):
        resolve_artifact("./runs/missing", "model")
    with pytest.raises(MarsctlError, match="not a Hub id"):
        resolve_artifact("no such thing", "model")


# ---------------------------------------------------------------------------- detection


def test_inspect_artifact_kinds(tmp_path: Path) -> None:
    make_dataset_artifact(tmp_path / "ds", junk=False)
    make_encoder_artifact(tmp_path / "enc")
    sep = tmp_path / "sep"
    sep.mkdir()
    (sep / "config.json").write_text(json.dumps({"model": {"base_channels": 32, "kappa": 9.0, "embedding_dim": 384}}))
    (sep / "model.safetensors").write_bytes(b"x")
    rl = tmp_path / "rl"
    rl.mkdir()
    (rl / "config.json").write_text(json.dumps({"rl": {"group_size": 8, "clip_eps": 0.2}, "model": {"kappa": 9}}))
    report = tmp_path / "report"
    report.mkdir()
    (report / "summary.json").write_text(json.dumps({"sdr": {"mean": 5.0}}))
    (report / "per_file.csv").write_text("file,sdr\na,5\n")
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text("{}")

    found = {p.name: inspect_artifact(p) for p in (tmp_path / "ds", tmp_path / "enc", sep, rl, report)}
    assert {name: (i.kind, i.repo_type) for name, i in found.items()} == {
        "ds": ("dataset", "dataset"),
        "enc": ("reward-encoder", "model"),
        "sep": ("separator", "model"),
        "rl": ("rl-policy", "model"),
        "report": ("eval-report", "dataset"),
    }
    with pytest.raises(MarsctlError, match="--kind"):
        inspect_artifact(unknown)
    assert inspect_artifact(unknown, "separator").kind == "separator"
    with pytest.raises(MarsctlError, match="no such artifact directory"):
        inspect_artifact(tmp_path / "nope")


def test_artifact_file_list_leaves_out_caches_temporaries_and_tokens(tmp_path: Path) -> None:
    real = make_dataset_artifact(tmp_path / "ds")
    assert list_artifact_files(tmp_path / "ds") == real


# ---------------------------------------------------------------------------- push


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_push_dataset_sends_exactly_the_artifact_and_a_card(fake_hub, hf_env, tmp_path: Path) -> None:
    token = hf_env["HF_TOKEN"]
    root = tmp_path / "ds"
    real = make_dataset_artifact(root, token=token)

    result = push_artifact(root, "org/toy-ds")

    assert (result.repo_type, result.kind) == ("dataset", "dataset")
    assert ("dataset", "org/toy-ds") in fake_hub.repos
    sent = fake_hub.commits[-1].files
    assert sorted(sent) == sorted([*real, "README.md"])
    for name in real:  # byte for byte what is on disk
        assert sent[name] == (root / name).read_bytes()
    # the token went only where it belongs: the Authorization header, never into a body
    auth = {r.authorization for r in fake_hub.requests if r.authorization}
    assert auth == {f"Bearer {token}"}
    assert all(token.encode() not in body for body in fake_hub.all_received_bytes())
    # the card: parsable, with the kind, the content hash, the recipe and loadable configs
    card = RepoCard(sent["README.md"].decode())
    meta = card.data.to_dict()
    assert meta["marsctl"]["kind"] == "dataset"
    assert meta["marsctl"]["content_sha256"] == result.content_fingerprint
    assert meta["configs"][0]["config_name"] == "clips"
    assert "## Recipe" in card.text and "toy" in card.text and result.content_fingerprint in card.text
    # the local folder now holds the same card
    assert (root / "README.md").read_bytes() == sent["README.md"]
    assert result.spec == f"datasets/org/toy-ds@{fake_hub.commits[-1].sha}"


def test_push_refuses_an_artifact_that_contains_the_token(fake_hub, hf_env, tmp_path: Path) -> None:
    root = tmp_path / "enc"
    make_encoder_artifact(root)
    config = json.loads((root / "config.json").read_text())
    config["hub_token"] = hf_env["HF_TOKEN"]
    (root / "config.json").write_text(json.dumps(config))
    with pytest.raises(MarsctlError, match=r"refusing to push, config\.json contain") as excinfo:
        push_artifact(root, "org/enc")
    assert hf_env["HF_TOKEN"] not in str(excinfo.value)
    assert fake_hub.requests == [] and fake_hub.commits == []


def test_push_without_a_token_says_how_to_log_in(fake_hub, hf_env, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("HF_TOKEN")
    make_encoder_artifact(tmp_path / "enc")
    with pytest.raises(MarsctlError, match="set HF_TOKEN or run `hf auth login`"):
        push_artifact(tmp_path / "enc", "org/enc")
    assert fake_hub.requests == []


def test_push_model_keeps_the_stage_card_and_a_second_push_sends_nothing(fake_hub, hf_env, tmp_path: Path) -> None:
    root = tmp_path / "enc"
    make_encoder_artifact(root)
    first = push_artifact(root, "org/enc")
    assert (first.repo_type, first.kind) == ("model", "reward-encoder")
    card_text = fake_hub.head_files("org/enc")["README.md"].decode()
    assert card_text.count("Aligned in three stages on toy clips.") == 1
    assert "| stage1.text_to_audio_r1 | 0.5 |" in card_text  # metrics table from metrics.json
    assert RepoCard(card_text).data.to_dict()["library_name"] == "marsctl"

    n_commits = len(fake_hub.commits)
    second = push_artifact(root, "org/enc")  # card regenerated identically, notes kept once
    assert len(fake_hub.commits) == n_commits, "an unchanged artifact must not make a new commit"
    assert second.commit == first.commit
    assert (root / "README.md").read_text().count("Aligned in three stages on toy clips.") == 1


def test_an_interrupted_push_resumes_without_resending_committed_files(fake_hub, hf_env, tmp_path: Path) -> None:
    root = tmp_path / "ds"
    make_dataset_artifact(root, junk=False)
    for i in range(300):  # enough files for the upload pipeline to commit in two parts
        (root / "frames" / "dog" / f"clip{i:03d}").mkdir(parents=True)
        (root / "frames" / "dog" / f"clip{i:03d}" / "000.jpg").write_bytes(f"frame {i}".encode() * 20)
    local = list_artifact_files(root)

    fake_hub.fail_commits_after = 1  # the connection dies after the first commit
    with pytest.raises(MarsctlError, match="run the same command again to resume"):
        push_artifact(root, "org/big")
    assert len(fake_hub.commits) == 1 and fake_hub.failed_commit_requests >= 1
    first_batch = set(fake_hub.commits[0].files)
    assert 0 < len(first_batch) < len(local) + 1

    fake_hub.fail_commits_after = None
    push_artifact(root, "org/big")
    resumed = set().union(*(set(c.files) for c in fake_hub.commits[1:]))
    assert resumed and not (resumed & first_batch), "files committed before the interruption were sent again"
    head = fake_hub.head_files("org/big", "dataset")
    assert sorted(set(head) - {".gitattributes"}) == sorted(set(local) | {"README.md"})
    assert all(head[name] == (root / name).read_bytes() for name in local)


def test_push_through_git_lfs_when_xet_is_disabled(fake_hub, hf_env, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    fake_hub.lfs_threshold = 10_000  # like the Hub: big binaries go to LFS storage
    root = tmp_path / "enc"
    make_encoder_artifact(root, weights_bytes=40_000)
    push_artifact(root, "org/enc-lfs")
    commit = fake_hub.commits[-1]
    assert sorted(commit.lfs_files) == ["model.safetensors"]
    assert sorted(commit.regular_files) == ["README.md", "config.json", "metrics.json"]
    weights = (root / "model.safetensors").read_bytes()
    assert fake_hub.lfs_store[_sha(weights)] == weights


def test_dry_run_plan_touches_nothing(hf_env, tmp_path: Path) -> None:
    root = tmp_path / "ds"
    real = make_dataset_artifact(root)
    plan = plan_push(root, "org/ds")
    assert plan.files == sorted([*real, "README.md"])
    assert not (root / "README.md").exists()
    with pytest.raises(MarsctlError, match="leave out '@v2'"):
        plan_push(root, "org/ds@v2")
    with pytest.raises(MarsctlError, match="goes to a dataset repo, not a model repo"):
        plan_push(root, "models/org/ds")
    card = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**card, "status": "building"}))
    with pytest.raises(MarsctlError, match="the dataset build is not finished"):
        plan_push(root, "org/ds")


# ---------------------------------------------------------------------------- pull / resolve


def test_pull_lays_out_the_standard_cache_and_resolves_offline(fake_hub, hf_env, tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "ds"
    real = make_dataset_artifact(root, junk=False)
    pushed = push_artifact(root, "org/toy-ds")

    folder = pull_artifact("org/toy-ds")  # no type given: model tried first, then dataset
    cache = Path(hf_env["HF_HUB_CACHE"])
    repo_folder = cache / "datasets--org--toy-ds"
    assert folder == repo_folder / "snapshots" / pushed.commit
    assert (repo_folder / "refs" / "main").read_text() == pushed.commit
    for name in real:
        assert (folder / name).is_symlink() and (folder / name).read_bytes() == (root / name).read_bytes()
        assert (folder / name).resolve().parent == (repo_folder / "blobs").resolve()

    fake_hub.stop()  # the Hub is gone: everything below is the cache alone
    go_offline(monkeypatch)
    assert resolve_artifact("org/toy-ds", "dataset") == folder
    assert resolve_artifact(f"org/toy-ds@{pushed.commit}", "dataset") == folder
    assert resolve_artifact(pushed.spec, None) == folder
    assert pull_artifact("org/toy-ds") == folder  # pull offline finds the cached copy


def test_pulled_dataset_card_makes_the_manifests_loadable_with_datasets(fake_hub, hf_env, tmp_path: Path) -> None:
    import datasets

    root = tmp_path / "ds"
    make_dataset_artifact(root, junk=False)
    push_artifact(root, "org/toy-ds")
    folder = pull_artifact("datasets/org/toy-ds")
    clips = datasets.load_dataset(str(folder), "clips", split="train")
    assert sorted(clips["clip_id"]) == ["c1", "c2", "c3"]


def test_offline_missing_artifact_says_what_to_pull(hf_env, monkeypatch) -> None:
    go_offline(monkeypatch)
    with pytest.raises(MarsctlError) as excinfo:
        resolve_artifact("org/never-pulled@v1", "dataset")
    message = str(excinfo.value)
    assert "\n" not in message
    assert message.startswith("org/never-pulled@v1: not a local path, and not in the Hugging Face cache")
    assert "HF_HUB_OFFLINE=1" in message and "marsctl hub pull org/never-pulled@v1 --repo-type dataset" in message


def test_offline_resolve_reads_a_cache_laid_out_by_hand(hf_env, monkeypatch) -> None:
    """The documented cache layout (blobs/, refs/, snapshots/ with relative symlinks), built here by hand."""
    commit = "3" * 40
    repo_folder = Path(hf_env["HF_HUB_CACHE"]) / "models--org--enc"
    files = {"config.json": b'{"kind": "reward-encoder"}', "model.safetensors": b"\x08" * 64}
    for name, data in files.items():
        etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (repo_folder / "blobs").mkdir(parents=True, exist_ok=True)
        (repo_folder / "blobs" / etag).write_bytes(data)
        link = repo_folder / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo_folder / "blobs" / etag, link.parent))
    (repo_folder / "refs").mkdir()
    (repo_folder / "refs" / "main").write_text(commit)

    go_offline(monkeypatch)
    folder = resolve_artifact("org/enc", "model")
    assert folder == repo_folder / "snapshots" / commit
    assert inspect_artifact(folder).kind == "reward-encoder"
    assert resolve_artifact("org/enc", None) == folder  # type found from the cache folders
    with pytest.raises(MarsctlError, match="not in the Hugging Face cache"):
        resolve_artifact("org/enc@v9", "model")


def test_online_unknown_repo_and_revision_are_one_line_errors(fake_hub, hf_env, tmp_path: Path) -> None:
    with pytest.raises(MarsctlError, match="no such model or dataset repo on the Hub"):
        resolve_artifact("org/nothing-here", None)
    make_encoder_artifact(tmp_path / "enc")
    push_artifact(tmp_path / "enc", "org/enc")
    with pytest.raises(MarsctlError, match="revision 'v7' not found in model repo org/enc"):
        resolve_artifact("org/enc@v7", "model")


def test_a_push_killed_mid_upload_resumes_when_run_again(fake_hub, hf_env, tmp_path: Path) -> None:
    """A real SIGKILL of the pushing process between two commits, then the same push again."""
    import signal
    import subprocess
    import sys
    import time

    root = tmp_path / "ds"
    make_dataset_artifact(root, junk=False)
    for i in range(300):
        (root / "frames" / "cat" / f"clip{i:03d}").mkdir(parents=True)
        (root / "frames" / "cat" / f"clip{i:03d}" / "000.jpg").write_bytes(f"frame {i}".encode() * 20)
    local = list_artifact_files(root)
    script = f"from marsctl.hub import push_artifact; push_artifact({str(root)!r}, 'org/killed')"
    env = {**os.environ, **hf_env, "HF_ENDPOINT": fake_hub.endpoint, "OMP_NUM_THREADS": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}

    fake_hub.hold_commits_after = 1  # the second commit hangs: kill the client while it waits
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while fake_hub.held_commit_requests == 0 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fake_hub.held_commit_requests == 1, proc.stderr.read() if proc.poll() is not None else "timeout"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    fake_hub.release_held_commits()
    fake_hub.hold_commits_after = None
    assert len(fake_hub.commits) == 1
    first_batch = set(fake_hub.commits[0].files)

    rerun = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    resumed = set().union(*(set(c.files) for c in fake_hub.commits[1:]))
    assert resumed and not (resumed & first_batch), "files committed before the kill were sent again"
    head = fake_hub.head_files("org/killed", "dataset")
    assert sorted(set(head) - {".gitattributes"}) == sorted(set(local) | {"README.md"})


def test_run_directories_leave_out_checkpoints_unless_asked(hf_env, tmp_path: Path) -> None:
    run = tmp_path / "runs" / "sup"
    make_encoder_artifact(run)
    (run / "config.json").write_text(json.dumps({"kind": "marsctl-separator", "separator": {"base_channels": 32}}))
    step = run / "checkpoints" / "step-00000010"
    step.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "training_state.pt"):
        (step / name).write_bytes(b"checkpoint " + name.encode())
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"\x00scalars")
    plan = plan_push(run, "org/sup")
    assert plan.info.kind == "separator" and plan.repo_type == "model"
    assert not [f for f in plan.files if f.startswith("checkpoints/")]
    assert "tensorboard/events.out.tfevents.1.host" in plan.files
    with_ckpt = plan_push(run, "org/sup", include_checkpoints=True)
    assert sorted(set(with_ckpt.files) - set(plan.files)) == [
        "checkpoints/step-00000010/config.json",
        "checkpoints/step-00000010/model.safetensors",
        "checkpoints/step-00000010/training_state.pt",
    ]


def test_eval_report_card_carries_the_report_and_metrics(hf_env, tmp_path: Path) -> None:
    report = tmp_path / "eval"
    report.mkdir()
    (report / "rows.csv").write_text("mixture,source,sdr\nm0,dog,6.5\n")
    (report / "summary.json").write_text(json.dumps({"meta": {"model": "org/sup"}, "overall": {"sdr": {"mean": 6.5}}}))
    (report / "report.md").write_text("| metric | mean |\n|---|---|\n| SDR | 6.50 |\n")
    plan = plan_push(report, "org/sup-eval")
    assert (plan.info.kind, plan.repo_type) == ("eval-report", "dataset")
    assert "## Report (`report.md`)" in plan.card and "| SDR | 6.50 |" in plan.card
    (report / "report.md").unlink()  # no Markdown summary: the numbers of summary.json make the table
    (report / "summary.json").write_text(json.dumps({"overall": [
        {"system": "model", "query_modality": "text", "sdr_mean": 6.5},
        {"system": "oracle-irm", "query_modality": "-", "sdr_mean": 12.25},
    ]}))
    card = plan_push(report, "org/sup-eval").card
    assert "| overall[model/text].sdr_mean | 6.5 |" in card and "| overall[oracle-irm].sdr_mean | 12.25 |" in card


def test_a_pulled_artifact_can_be_pushed_elsewhere_without_touching_the_cache(fake_hub, hf_env, tmp_path: Path) -> None:
    root = tmp_path / "enc"
    real = make_encoder_artifact(root)
    push_artifact(root, "org/enc")
    snapshot = pull_artifact("org/enc", "model")
    card_link = snapshot / "README.md"
    before = (card_link.is_symlink(), card_link.read_bytes())

    mirrored = push_artifact(snapshot, "mirror/enc")
    assert mirrored.repo_type == "model"
    head = fake_hub.head_files("mirror/enc")
    assert all(head[name] == (root / name).read_bytes() for name in real if name != "README.md")
    assert "# enc" in head["README.md"].decode() and "Aligned in three stages" in head["README.md"].decode()
    assert (card_link.is_symlink(), card_link.read_bytes()) == before


def test_stage_card_metadata_survives_repeated_pushes(hf_env, fake_hub, tmp_path: Path) -> None:
    root = tmp_path / "enc"
    make_encoder_artifact(root)
    (root / "README.md").write_text("---\nlicense: cc-by-4.0\ntags: [reward-model, custom-tag]\n---\n# enc\n\nStage notes.\n")
    push_artifact(root, "org/enc")
    push_artifact(root, "org/enc")
    meta = RepoCard(fake_hub.head_files("org/enc")["README.md"].decode()).data.to_dict()
    assert meta["license"] == "cc-by-4.0" and "custom-tag" in meta["tags"] and "marsctl" in meta["tags"]
    assert (root / "README.md").read_text().count("Stage notes.") == 1
    assert len(fake_hub.commits) == 1  # the second push found nothing to change
