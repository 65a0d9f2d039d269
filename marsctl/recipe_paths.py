"""Where shipped recipes are found: one lookup for data, align and train recipes.

The repository keeps recipes at the top level (``recipes/<kind>/<name>.yaml``);
``marsctl/recipes`` is a symlink to it, which setuptools follows, so a built wheel holds
copies in ``marsctl/recipes/<kind>/`` (package data) and an editable install reads the
repository's files. A recipe is looked up in the package first, then in
``./recipes/<kind>/`` (the current directory). An existing file, or a spec ending in
``.yaml``/``.yml`` or holding a ``/``, is taken as a path as given.
"""

from __future__ import annotations

from pathlib import Path

from marsctl.errors import ConfigError

#: the recipe folders (``kind`` in :func:`find_recipe`)
KINDS = ("data", "align", "train")
_PACKAGE = Path(__file__).resolve().parent


def recipe_dirs(kind: str) -> list[Path]:
    """The folders searched for ``kind`` recipes, in order (existing or not)."""
    if kind not in KINDS:
        raise ValueError(f"recipe kind must be one of {', '.join(KINDS)}, got {kind!r}")
    dirs = [
        _PACKAGE / "recipes" / kind,  # installed wheel, or the symlink in a checkout
        _PACKAGE.parent / "recipes" / kind,  # a checkout where the symlink did not survive
        Path.cwd() / "recipes" / kind,
    ]
    unique: list[Path] = []
    for d in dirs:
        if d.is_dir() and all(not d.samefile(u) for u in unique):
            unique.append(d)
    return unique


def list_recipes(kind: str) -> list[str]:
    """The names of the ``kind`` recipes found (sorted, no duplicates)."""
    return sorted({p.stem for d in recipe_dirs(kind) for p in d.glob("*.yaml")})


def find_recipe(kind: str, spec: str | Path) -> Path:
    """The file of a recipe given by name (``soundfont``) or path; one-line error naming the known ones."""
    path = Path(spec)
    if path.is_file():
        return path
    if path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        raise ConfigError(f"{path}: no such recipe file")
    for d in recipe_dirs(kind):
        candidate = d / f"{spec}.yaml"
        if candidate.is_file():
            return candidate
    known = list_recipes(kind)
    raise ConfigError(f"unknown recipe {str(spec)!r} in recipes/{kind}; known: {', '.join(known) or 'none'} (or give a YAML path)")
