"""A Hub repo with a file named ``../x`` is one line, not a ValueError; ``data: ~/x`` in a training recipe is
the home folder's x (issue 32, small items)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hub_server import fake_hub, hf_env, make_dataset_artifact  # noqa: F401  (fixtures)
from marsctl.errors import MarsctlError
from marsctl.hub import pull_artifact, push_artifact


def test_a_repo_file_named_dot_dot_is_one_line(fake_hub, hf_env, tmp_path: Path) -> None:
    make_dataset_artifact(tmp_path / "ds", junk=False)
    pushed = push_artifact(tmp_path / "ds", "org/evil")
    repo = next(r for r in fake_hub.repos.values() if r.repo_id == "org/evil")
    repo.trees[pushed.commit]["../escape.txt"] = (b"outside the cache", False)
    with pytest.raises(MarsctlError, match="not a safe path") as caught:
        pull_artifact("datasets/org/evil")
    assert "\n" not in str(caught.value)
    assert not (Path(hf_env["HF_HUB_CACHE"]) / "escape.txt").exists()


def test_a_recipe_data_path_with_a_tilde_is_expanded(tmp_path: Path, monkeypatch) -> None:
    from marsctl.train.supervised import load_supervised_config

    monkeypatch.setenv("HOME", str(tmp_path))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: ~/datasets/union\n")
    assert load_supervised_config(recipe).data == str(tmp_path / "datasets" / "union")
