"""The source-kind registry, recipe names that cannot escape data/, and recipes from a built wheel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml
from typer.testing import CliRunner

from marsctl.cli.data import data_app
from marsctl.data import load_clips, sources
from marsctl.data.build import build
from marsctl.data.fetch import FetchOptions
from marsctl.data.recipe import load_recipe, recipe_from_mapping
from marsctl.data.records import ClipRecord, SkippedRow, WorkUnit, fingerprint
from marsctl.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


# --- a complete source kind, defined here: one config class, plan_units, run_unit --------------

@dataclass(frozen=True)
class ToneSource:
    """Sine tones: label -> frequency (Hz); ``clips`` clips per label and split."""

    freqs: dict[str, float]
    clips: int = 2
    seconds: float = 2.5


def plan_units(recipe, dataset_dir, options):
    units = []
    for label, freq in recipe.source.freqs.items():
        items = [(label, split, k, freq) for split in ("train", "test") for k in range(recipe.source.clips)]
        units.append(WorkUnit(unit_id=f"tone-{label}", items=items, description=label, fingerprint=fingerprint(items)))
    return units, [SkippedRow("row 9", "a skipped row", "malformed_row")]


def run_unit(unit, recipe, dataset_dir):
    records = []
    sr = recipe.signal.sample_rate
    for label, split, k, freq in unit.items:
        t = np.arange(int(recipe.source.seconds * sr)) / sr
        rel = f"clips/{label}/{label}-{split}-{k}.flac"
        (dataset_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(dataset_dir / rel), (0.2 * np.sin(2 * np.pi * freq * (1 + 0.01 * k) * t)).astype(np.float32), sr)
        records.append(ClipRecord(clip_id=f"{label}-{split}-{k}", label=label, split=split, source="tone",
                                  audio_path=rel, duration_s=recipe.source.seconds, sample_rate=sr))
    return records


@pytest.fixture
def tone_kind(monkeypatch):
    monkeypatch.setattr(sources, "_KINDS", dict(sources._KINDS))  # restored after the test
    sources.register_source("tone", ToneSource, __name__)
    return "tone"


def test_a_new_kind_is_one_module_and_one_registration(tone_kind, tmp_path):
    recipe = recipe_from_mapping({
        "name": "tones", "tone": {"freqs": {"low": 220.0, "high": 880.0}},
        "filter": {"min_duration_s": 1.0}, "mix": {"mixtures_per_split": {"test": 2}},
    })
    assert recipe.source_kind == "tone" and recipe.source == ToneSource({"low": 220.0, "high": 880.0})
    assert recipe.soundfont is None and recipe.folder is None and recipe.youtube is None
    summary = build(recipe, tmp_path / "ds", FetchOptions(progress=False))
    assert summary.kept == 8 and summary.skipped == {"malformed_row": 1}
    assert sorted(set(load_clips(tmp_path / "ds")["label"])) == ["high", "low"]
    assert "tone" in (tmp_path / "ds" / "dataset.json").read_text()
    # the card's recipe reads back as the same recipe
    from marsctl.data.build import read_card_recipe

    assert read_card_recipe(tmp_path / "ds") == recipe
    with pytest.raises(ValueError, match="already registered"):
        sources.register_source("tone", ToneSource, __name__)


def test_unknown_kind_is_one_line_naming_the_file_and_the_kinds(tmp_path):
    path = tmp_path / "odd.yaml"
    path.write_text("name: odd\ndebain:\n  packages: [x]\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "'debain'" in message
    for kind in ("folder", "soundfont", "youtube"):
        assert kind in message
    # before: the fetch if-chain treated any other kind as youtube; now the CLI says so in one line
    result = CliRunner().invoke(data_app, ["build", str(path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "unknown source kind" in result.output
    assert not (tmp_path / "o").exists()


def test_exactly_one_source_section():
    with pytest.raises(ConfigError, match="exactly one source section.*got none"):
        recipe_from_mapping({"name": "x"}, "r.yaml")
    with pytest.raises(ConfigError, match="exactly one source section.*got folder, youtube"):
        recipe_from_mapping({"name": "x", "folder": {}, "youtube": {}}, "r.yaml")
    with pytest.raises(ConfigError, match=r"r\.yaml\.folder: unknown key\(s\) rooot"):
        recipe_from_mapping({"name": "x", "folder": {"rooot": "/"}}, "r.yaml")


def test_every_shipped_recipe_parses_and_the_card_hides_cookies(tmp_path):
    from marsctl.data.recipe import available_recipes

    names = available_recipes()
    assert {"soundfont", "folder", "vggsound-clean", "music-clean"} <= set(names)
    kinds = {load_recipe(n).source_kind for n in names}
    assert {"soundfont", "folder", "youtube"} <= kinds
    recipe = load_recipe("vggsound-clean").with_source(cookies_file="/home/me/cookies.txt")
    assert recipe.youtube.cookies_file == "/home/me/cookies.txt"
    assert recipe.to_mapping()["youtube"]["cookies_file"] is None


@pytest.mark.parametrize("name", ["../../ESCAPED", "/abs", "a/b", ".hidden", "..", ""])
def test_a_recipe_name_cannot_leave_data(tmp_path, monkeypatch, name):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    root = work / "tree" / "low"
    root.mkdir(parents=True)
    sf.write(str(root / "a.wav"), np.zeros(16000, dtype=np.float32), 16000)
    recipe = work / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": name, "folder": {}}))
    result = CliRunner().invoke(data_app, ["build", str(recipe), "--root", str(work / "tree"), "--quiet"])
    assert result.exit_code == 2, result.output
    assert "must be a plain name" in result.output and str(recipe) in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]
    assert sorted(p.name for p in work.iterdir()) == ["r.yaml", "tree"]


def _has_bdist_wheel() -> bool:
    import importlib.util

    import setuptools

    major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


@pytest.mark.skipif(not _has_bdist_wheel(), reason="needs setuptools>=70.1 or the wheel package (the test extra)")
def test_recipes_ship_inside_a_built_wheel(tmp_path):
    """A non-editable install: build the wheel, unpack it, run it from a folder with no recipes/ (~15 s)."""
    src = tmp_path / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("marsctl", "recipes"):
        shutil.copytree(REPO / name, src / name, symlinks=True, ignore=ignore)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(src)],
        check=True, capture_output=True, cwd=tmp_path,
    )
    (wheel,) = (tmp_path / "dist").glob("marsctl-*.whl")
    shipped = sorted(str(p.relative_to(REPO)) for p in (REPO / "recipes").glob("*/*.yaml"))
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert {f"marsctl/{p}" for p in shipped} <= names
        zf.extractall(tmp_path / "site")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"), COLUMNS="200")

    def marsctl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "marsctl", *args], cwd=elsewhere, env=env, capture_output=True, text=True)

    where = subprocess.run([sys.executable, "-c", "import marsctl; print(marsctl.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.strip().startswith(str(tmp_path / "site"))
    listing = marsctl("data", "recipes")
    assert listing.returncode == 0, listing.stderr
    for p in (REPO / "recipes" / "data").glob("*.yaml"):
        assert p.stem in listing.stdout
    fetched = marsctl("data", "fetch", "soundfont", "--limit", "0", "--out", "ds", "--quiet")
    assert fetched.returncode == 0, fetched.stdout + fetched.stderr
    assert '"recipe": "soundfont"' in (elsewhere / "ds" / "dataset.json").read_text()
    for kind, name in (("align", "quick"), ("train", "soundfont-small")):
        found = subprocess.run(
            [sys.executable, "-c", f"from marsctl.recipe_paths import find_recipe; print(find_recipe({kind!r}, {name!r}))"],
            cwd=elsewhere, env=env, capture_output=True, text=True, check=True,
        )
        assert found.stdout.strip().startswith(str(tmp_path / "site"))


@pytest.mark.parametrize("command", [["data"], ["data", "build"], ["data", "fetch"], ["data", "filter"], ["data", "mix"],
                                     ["data", "recipes"], ["hub", "push"], ["hub", "pull"]])
def test_help_reads_at_80_columns(command):
    """Before: '<int range> [x>=1]' and '<bool>' type columns squeezed the text, and tables cut names with '…'."""
    from marsctl.cli.main import app

    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in result.output and "<int range>" not in result.output
    assert not [line for line in lines if "<bool>" in line and "--help" not in line]


def test_recipes_table_reads_at_80_columns():
    result = CliRunner().invoke(data_app, ["recipes"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert "…" not in result.output and "vggsound-clean" in result.output and "music-clean" in result.output
