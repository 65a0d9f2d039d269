"""Bad input never gets a traceback (issue 31): every shipped recipe with each number replaced by
0, a negative value, NaN and infinity loads as a valid config or is one line naming the recipe and
the key; a folder build over a tree with an unreadable file and an unlistable folder logs both and
builds the rest."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from marsctl.config import to_mapping
from marsctl.errors import MarsctlError

REPO = Path(__file__).resolve().parents[1]
#: the recipes a wheel ships (marsctl/recipes is the link to recipes/)
SHIPPED = sorted((REPO / "marsctl" / "recipes").glob("*/*.yaml"))
VALUES = (0, -1, float("nan"), float("inf"))
_MARK = "<the replaced value>"


def _numbers(data, labels=frozenset(), path=()):
    """The paths of every int/float leaf (not bool) of parsed YAML; of a table keyed by the
    recipe's labels (``programs``, ``ranges``) only the first entry: the others are the same field."""
    if isinstance(data, dict):
        items = list(data.items())
        if len(items) > 1 and labels and set(data) <= labels:
            items = items[:1]
        for key, value in items:
            yield from _numbers(value, labels, (*path, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from _numbers(value, labels, (*path, i))
    elif isinstance(data, (int, float)) and not isinstance(data, bool):
        yield path


def _variant_text(data, path, value) -> str:
    """``data`` as YAML text with the number at ``path`` replaced by ``value`` (JSON is YAML's flow
    style; NaN and infinity written the YAML way): much faster than yaml.dump, thousands of times over."""
    node = data
    for part in path[:-1]:
        node = node[part]
    kept, node[path[-1]] = node[path[-1]], _MARK
    try:
        text = json.dumps(data)
    finally:
        node[path[-1]] = kept
    token = ".nan" if math.isnan(value) else ".inf" if math.isinf(value) else repr(value)
    return text.replace(json.dumps(_MARK), token)


def _loader(recipe: Path):
    kind = recipe.parent.name
    if kind == "data":
        from marsctl.data.recipe import load_recipe

        return load_recipe
    if kind == "align":
        from marsctl.align.config import load_align_config

        return load_align_config
    if recipe.stem.startswith("rl"):
        from marsctl.rl.config import load_rl_config

        return load_rl_config
    from marsctl.train.supervised import load_supervised_config

    return load_supervised_config


def _as_json(config) -> str:
    """What a stage writes (dataset card, config.json): strict JSON, which NaN/inf cannot pass."""
    mapping = config.to_mapping() if hasattr(config, "to_mapping") else to_mapping(config)
    return json.dumps(mapping, allow_nan=False, default=str)


def _separator_runs(config, seen: set) -> None:
    """A valid train sup recipe's separator builds and separates a window of its own size (the
    relations window >= n_fft and levels <= the frequency grid hold); channels are shrunk, they do
    not enter the relations."""
    from marsctl.models.separator import Separator

    key = (config.signal, config.architecture.num_levels)
    if key in seen:
        return
    seen.add(key)
    separator_config = config.separator_config(query_dim=4)
    small = type(separator_config)(**{**to_mapping(separator_config), "signal": config.signal, "base_channels": 2,
                                      "max_channel_multiplier": 1, "mask_channels": 2})
    model = Separator(small).eval()
    wave = torch.zeros(1, config.signal.segment_samples)
    with torch.no_grad():
        out = model.separate(wave, torch.ones(1, 4) / 2)
    assert out.shape == wave.shape and torch.isfinite(out).all()


def test_every_shipped_recipe_number_set_to_zero_negative_nan_or_inf_is_one_line_or_valid(tmp_path):
    assert {p.parent.name for p in SHIPPED} == {"data", "align", "train"}
    refused = accepted = 0
    seen: set = set()
    for recipe in SHIPPED:
        original = yaml.safe_load(recipe.read_text(encoding="utf-8"))  # shipped recipes use no aliases
        load = _loader(recipe)
        folder = tmp_path / recipe.parent.name
        folder.mkdir(exist_ok=True)
        labels = frozenset(original.get("labels") or []) if isinstance(original.get("labels"), list) else frozenset()
        for path in _numbers(original, labels):
            for value in VALUES:
                variant = folder / recipe.name  # same name and folder kind: the loader reads it as that recipe
                variant.write_text(_variant_text(original, path, value), encoding="utf-8")
                what = f"{recipe.relative_to(REPO)} {'.'.join(map(str, path))} = {value!r}"
                try:
                    config = load(variant)
                except MarsctlError as exc:
                    message = str(exc)
                    key = next(str(p) for p in reversed(path) if isinstance(p, str))
                    assert "\n" not in message, what
                    assert str(variant) in message, f"{what}: {message}"
                    assert key in message, f"{what}: {message}"
                    refused += 1
                    continue
                assert not (isinstance(value, float) and not math.isfinite(value)), f"{what}: accepted"
                _as_json(config)
                if recipe.parent.name == "train" and hasattr(config, "architecture"):
                    _separator_runs(config, seen)
                accepted += 1
    assert refused and accepted  # both outcomes occur (every NaN and inf is refused above)


def _unprivileged(command: list[str]) -> list[str]:
    """``command`` run so that chmod 000 stops it: root without the capabilities that bypass file modes."""
    if os.geteuid() != 0:
        return command
    if shutil.which("setpriv") is None:
        pytest.skip("running as root and setpriv is missing: chmod 000 does not stop root")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", "--", *command]


def test_folder_build_logs_an_unreadable_file_and_an_unlistable_folder_and_builds_the_rest(tmp_path):
    from data_fixtures import write_tone

    root, out = tmp_path / "tree", tmp_path / "out"
    write_tone(root / "low" / "a.wav", 220, seconds=1.5)
    write_tone(root / "high" / "b.wav", 1760, seconds=1.5)
    write_tone(root / "low" / "secret.wav", 330, seconds=1.5)
    write_tone(root / "high" / "locked" / "c.wav", 880, seconds=1.5)
    recipe = tmp_path / "folder.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "folder-perm", "labels": ["low", "high"], "folder": {"val_fraction": 0.0, "test_fraction": 0.0},
        "filter": {"min_duration_s": 1.0}, "mix": {"mixtures_per_split": {"train": 1}},
    }))
    (root / "low" / "secret.wav").chmod(0o000)
    (root / "high" / "locked").chmod(0o000)
    try:
        command = [sys.executable, "-m", "marsctl.data", "build", str(recipe), "--root", str(root), "--out", str(out), "--quiet"]
        done = subprocess.run(_unprivileged(command), cwd=REPO, capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
    finally:
        (root / "high" / "locked").chmod(0o755)
        (root / "low" / "secret.wav").chmod(0o644)
    assert done.returncode == 1, done.stdout + done.stderr  # built, with a failed file and a skipped folder
    assert "Traceback" not in done.stderr and "PermissionError" not in done.stderr
    log = [json.loads(line) for line in (out / "logs" / "failures.jsonl").read_text().splitlines()]
    assert [e for e in log if e.get("where") == "high/locked" and "cannot list" in e["reason"]], log
    assert [e for e in log if e.get("clip_id") == "low__secret" and "permission denied" in e["reason"].lower()], log
    assert len(log) == 2, log
    card = json.loads((out / "dataset.json").read_text())
    assert card["status"] == "complete"
    import pandas as pd

    clips = pd.read_parquet(out / "manifests" / "clips.parquet")
    assert sorted(clips["clip_id"]) == ["high__b", "low__a"]
