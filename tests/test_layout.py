"""The package layout's rules (docs/architecture.md): imports point downward, inference does not
load training code, the data package does not import the CLI."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "marsctl"


def _loaded_after_import(module: str, watched: tuple[str, ...]) -> list[str]:
    code = f"import sys, {module}; print(' '.join(m for m in {watched!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return out.split()


@pytest.mark.parametrize("module", ["marsctl.separate", "marsctl.eval"])
def test_inference_does_not_import_training(module):
    assert _loaded_after_import(module, ("marsctl.rl", "marsctl.train", "marsctl.align", "marsctl.cli")) == []


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", ["data", "audio", "metrics", "models", "eval", "separate", "train", "rl", "align", "hub"])
def test_library_packages_never_import_the_cli(package):
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in sorted((PACKAGE / package).rglob("*.py"))
        if any(name == "marsctl.cli" or name.startswith("marsctl.cli.") for name in _imported_modules(path))
    ]
    assert offenders == []
