"""hub push never publishes the token (in any file, of any size) or files outside the artifact;
artifacts record their kind, older ones get a guess with a note."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hub_server import fake_hub, hf_env, make_encoder_artifact  # noqa: F401  (fixtures)
from marsctl.errors import MarsctlError
from marsctl.hub import inspect_artifact, plan_push, push_artifact
from marsctl.hub.secrets import find_secrets


def test_a_token_past_64_mib_is_found(hf_env, tmp_path: Path) -> None:
    """Before: files above 64 MiB were not scanned, so a long log with the token was uploaded."""
    root = tmp_path / "enc"
    make_encoder_artifact(root)
    big = root / "weights.bin"  # not a text suffix: only the exact token is looked for
    with open(big, "wb") as handle:
        handle.truncate(65 * 1024 * 1024)  # sparse: cheap to make, read as zeros
        handle.seek(0, 2)
        handle.write(f"token={hf_env['HF_TOKEN']}\n".encode())
    with pytest.raises(MarsctlError, match=r"refusing to push, weights\.bin contain") as err:
        plan_push(root, "org/enc")
    assert hf_env["HF_TOKEN"] not in str(err.value)


@pytest.mark.parametrize("chunk_size", [7, 16, 33])
def test_the_token_is_found_across_chunk_boundaries(tmp_path: Path, chunk_size: int) -> None:
    token = "hf_" + "Ab1" * 12
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 200)
    for offset in range(0, 3 * chunk_size):  # the token starts at every position within a few chunks
        data = b"\0" * offset + token.encode() + b"\0" * 50
        (tmp_path / "blob.bin").write_bytes(data)
        assert find_secrets(tmp_path, ["blob.bin", "model.safetensors"], token, chunk_size=chunk_size) == ["blob.bin"], offset
    # token-shaped strings in text files, across boundaries too
    (tmp_path / "notes.jsonl").write_text('{"a": 1}\n' * 5 + '{"key": "hf_' + "x" * 34 + '"}\n')
    assert find_secrets(tmp_path, ["notes.jsonl"], None, chunk_size=chunk_size) == ["notes.jsonl"]
    (tmp_path / "notes.jsonl").write_text('{"a": 1}\n' * 8)
    assert find_secrets(tmp_path, ["notes.jsonl"], token, chunk_size=chunk_size) == []


def test_push_with_a_small_scan_chunk_still_refuses(fake_hub, hf_env, tmp_path: Path) -> None:
    root = tmp_path / "enc"
    make_encoder_artifact(root)
    (root / "run.out").write_bytes(b"x" * 1000 + hf_env["HF_TOKEN"].encode() + b"y" * 1000)
    with pytest.raises(MarsctlError, match=r"run\.out contain"):
        plan_push(root, "org/enc", scan_chunk_bytes=64)
    with pytest.raises(MarsctlError, match=r"run\.out contain"):
        push_artifact(root, "org/enc")
    assert fake_hub.commits == []


def test_symlinks_leaving_the_artifact_are_refused(fake_hub, hf_env, tmp_path: Path) -> None:
    """Before: a symlink to a key file outside the artifact was uploaded as a regular file."""
    secret = tmp_path / "id_ed25519"
    secret.write_text("PRIVATE KEY\n")
    root = tmp_path / "enc"
    make_encoder_artifact(root)
    (root / "inside.json").symlink_to(root / "config.json")  # a link within the artifact is fine
    assert "inside.json" in plan_push(root, "org/enc").files
    (root / "extra").mkdir()
    (root / "extra" / "key.txt").symlink_to(secret)
    with pytest.raises(MarsctlError, match=r"extra/key\.txt link\(s\) to files outside the artifact"):
        push_artifact(root, "org/enc")
    (root / "extra" / "key.txt").unlink()
    (root / "outside_dir").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(MarsctlError, match=r"outside_dir/ link\(s\) to files outside the artifact"):
        plan_push(root, "org/enc")
    assert fake_hub.commits == []


def _separator_like(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"model": {"base_channels": 32, "kappa": 9.0}}))
    (root / "model.safetensors").write_bytes(b"x")
    return root


def test_recorded_kind_wins_and_a_guess_says_so(tmp_path: Path) -> None:
    from marsctl.hub.artifacts import write_artifact_kind

    old = _separator_like(tmp_path / "old")
    info = inspect_artifact(old)
    assert info.kind == "separator" and "guessed" in info.kind_note and "--kind" in info.kind_note
    assert inspect_artifact(old, "separator").kind_note == ""
    # an RL policy's config looks like a separator's; its record says what it is
    policy = _separator_like(tmp_path / "policy")
    write_artifact_kind(policy, "rl-policy")
    info = inspect_artifact(policy)
    assert (info.kind, info.kind_note) == ("rl-policy", "")
    (policy / "artifact.json").write_text(json.dumps({"kind": "weights"}))
    with pytest.raises(MarsctlError, match="artifact.json: unknown artifact kind 'weights'"):
        inspect_artifact(policy)


def test_a_stage_output_records_its_kind(tmp_path: Path) -> None:
    from marsctl.hub import run_stage

    out = tmp_path / "run"

    def train() -> None:
        _separator_like(out)

    run_stage("train.rl", {"lr": 1e-4}, {}, out, train, kind="rl-policy")
    assert json.loads((out / "artifact.json").read_text())["kind"] == "rl-policy"
    assert inspect_artifact(out).kind == "rl-policy" and inspect_artifact(out).kind_note == ""
