"""The stage cache: content_hash, provenance, --reuse (local, Hub, cache) and --push-to."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from hub_server import fake_hub, go_offline, hf_env, make_encoder_artifact  # noqa: F401  (fixtures)
from marsctl.config import SignalConfig
from marsctl.errors import MarsctlError
from marsctl.hub import StageCache, content_hash, input_fingerprint, list_artifact_files, read_provenance


@dataclasses.dataclass(frozen=True)
class ToyStageConfig:
    signal: SignalConfig = SignalConfig()
    learning_rate: float = 1e-3
    steps: int = 10


def test_content_hash_is_stable_and_sensitive(tmp_path: Path) -> None:
    base = content_hash(ToyStageConfig(), stage="align")
    assert base.startswith("sha256:") and len(base) == len("sha256:") + 64
    # the same settings written differently hash the same
    as_mapping = {"steps": 10, "learning_rate": 0.001, "signal": dataclasses.asdict(SignalConfig())}
    assert content_hash(as_mapping, stage="align") == base
    assert content_hash({**as_mapping, "steps": 10.0}, stage="align") == base
    # any setting, the stage name, or an input changes it
    assert content_hash(ToyStageConfig(steps=11), stage="align") != base
    assert content_hash(ToyStageConfig(signal=SignalConfig(hop_length=128)), stage="align") != base
    assert content_hash(ToyStageConfig(), stage="train.sup") != base
    source = tmp_path / "source_list.csv"
    source.write_text("id,label\n1,dog\n")
    with_input = content_hash(ToyStageConfig(), {"source_list": source}, stage="align")
    assert with_input != base
    source.write_text("id,label\n1,cat\n")
    assert content_hash(ToyStageConfig(), {"source_list": source}, stage="align") != with_input
    with pytest.raises(MarsctlError, match="stage input not found"):
        content_hash(ToyStageConfig(), {"data": tmp_path / "missing"})
    with pytest.raises(MarsctlError, match="cannot hash config value"):
        content_hash({"callback": object()})


def test_directory_inputs_are_identified_by_provenance_or_by_their_bytes(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    make_encoder_artifact(raw)
    by_bytes = input_fingerprint(raw)
    assert by_bytes.startswith("files:sha256:")
    (raw / "README.md").write_text("a different card does not change the artifact")
    assert input_fingerprint(raw) == by_bytes
    (raw / "config.json").write_text('{"kind": "reward-encoder", "embedding_dim": 9}')
    assert input_fingerprint(raw) != by_bytes
    # once a stage recorded it, the stage hash is the identity (cheap, and equal for Hub copies)
    stage = StageCache("align", {"steps": 3}, kind="reward-encoder")
    stage.record(raw)
    assert input_fingerprint(raw) == "stage:" + stage.key


def test_record_then_reuse_from_the_output_directory(tmp_path: Path) -> None:
    out = tmp_path / "enc"
    cache = StageCache("align", ToyStageConfig(), kind="reward-encoder", cache_dir=tmp_path / "no-cache")
    assert cache.lookup(out) is None
    make_encoder_artifact(out)
    assert cache.lookup(out) is None  # no provenance: the run may not have finished
    record = cache.record(out)
    assert read_provenance(out) == record and record["stage_hash"] == cache.key
    assert cache.lookup(out) == out
    changed = StageCache("align", ToyStageConfig(steps=99), kind="reward-encoder", cache_dir=tmp_path / "no-cache")
    assert changed.lookup(out) is None
    changed.begin(out)  # a rerun with other settings starts: the old record must go
    assert read_provenance(out) is None and cache.lookup(out) is None
    cache.begin(out)  # harmless when nothing is recorded


def test_push_to_then_reuse_from_the_hub_and_offline_from_the_cache(fake_hub, hf_env, tmp_path: Path, monkeypatch) -> None:
    data = tmp_path / "data.csv"
    data.write_text("clip,label\na,dog\n")
    first = StageCache("align", ToyStageConfig(), {"data": data}, kind="reward-encoder")
    out = tmp_path / "run1" / "enc"
    make_encoder_artifact(out)
    first.record(out)
    result = first.publish(out, "org/enc")
    assert result.repo_type == "model" and "provenance.json" in fake_hub.head_files("org/enc")

    # another machine: same config and inputs, empty output directory, nothing in its cache
    again = StageCache("align", ToyStageConfig(), {"data": data}, kind="reward-encoder")
    out2 = tmp_path / "run2" / "enc"
    found = again.lookup(out2, push_to="org/enc")
    assert found == out2
    assert list_artifact_files(out2) == list_artifact_files(out)
    assert all((out2 / f).read_bytes() == (out / f).read_bytes() for f in list_artifact_files(out))
    assert again.matches(out2)

    # a different config does not reuse it, and a repo that was never pushed is just a miss
    other = StageCache("align", ToyStageConfig(learning_rate=3e-4), {"data": data}, kind="reward-encoder")
    assert other.lookup(tmp_path / "run3", push_to="org/enc") is None
    assert again.lookup(tmp_path / "run4", push_to="org/never-pushed") is not None  # found via the cache scan

    # offline, with no --push-to: the Hugging Face cache is scanned for the stage hash
    fake_hub.stop()
    go_offline(monkeypatch)
    found_offline = again.lookup()
    assert found_offline is not None and again.matches(found_offline)
    assert Path(hf_env["HF_HUB_CACHE"]) in found_offline.parents
    assert other.lookup() is None


def test_materialize_does_not_touch_a_non_empty_output(fake_hub, hf_env, tmp_path: Path) -> None:
    stage = StageCache("align", ToyStageConfig(), kind="reward-encoder")
    src = tmp_path / "src"
    make_encoder_artifact(src)
    stage.publish(src, "org/enc")  # publish records provenance first
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "checkpoint-step100.safetensors").write_bytes(b"partial run")
    found = stage.lookup(busy, push_to="org/enc")
    assert found is not None and found != busy
    assert sorted(os.listdir(busy)) == ["checkpoint-step100.safetensors"]
    assert json.loads((found / "provenance.json").read_text())["stage_hash"] == stage.key


def test_a_bad_push_to_fails_before_the_stage_runs(hf_env, monkeypatch) -> None:
    stage = StageCache("data.build", {"recipe": "toy"}, kind="dataset")
    stage.check_push_to(None)  # nothing to check
    stage.check_push_to("org/toy")  # token in HF_TOKEN, online
    with pytest.raises(MarsctlError, match="not a Hub repo id"):
        stage.check_push_to("just-a-name")
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(MarsctlError, match="no Hugging Face token"):
        stage.check_push_to("org/toy")
    go_offline(monkeypatch)
    with pytest.raises(MarsctlError, match="HF_HUB_OFFLINE=1"):
        stage.check_push_to("org/toy")


def test_run_stage_runs_once_then_reuses_and_pushes(fake_hub, hf_env, tmp_path: Path) -> None:
    from marsctl.hub import run_stage

    calls = []

    def build(out: Path) -> None:
        calls.append(out)
        make_encoder_artifact(out)

    out = tmp_path / "enc"
    first = run_stage("align", ToyStageConfig(), {}, out, lambda: build(out), kind="reward-encoder",
                      reuse=True, push_to="org/enc")
    assert (first.reused, len(calls)) == (False, 1) and first.pushed.repo_id == "org/enc"
    assert read_provenance(out)["stage"] == "align"
    again = run_stage("align", ToyStageConfig(), {}, out, lambda: build(out), kind="reward-encoder", reuse=True)
    assert (again.reused, again.path, len(calls)) == (True, out, 1)
    elsewhere = tmp_path / "other" / "enc"  # empty output, same settings: comes from the Hub/cache
    third = run_stage("align", ToyStageConfig(), {}, elsewhere, lambda: build(elsewhere), kind="reward-encoder",
                      reuse=True, push_to="org/enc")
    assert (third.reused, third.path, len(calls)) == (True, elsewhere, 1)
    # without --reuse the stage runs even though a match exists
    fourth = run_stage("align", ToyStageConfig(), {}, out, lambda: build(out), kind="reward-encoder")
    assert (fourth.reused, len(calls)) == (False, 2)


def test_optional_artifact_tells_names_from_artifacts(tmp_path: Path, monkeypatch) -> None:
    from marsctl.hub import optional_artifact

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "enc").mkdir(parents=True)
    for name in (None, "", "builtin", "laion-clap:630k-audioset", "laion-clap:/ckpt/music.pt"):
        assert optional_artifact(name, "model") is None
    assert optional_artifact("runs/enc", "model") == Path("runs/enc")
    with pytest.raises(MarsctlError, match="no such file or directory"):
        optional_artifact("./runs/missing", "model")
