"""The registry of data source kinds: where a recipe's clips come from.

A recipe has exactly one source section; its key is the kind's name::

    name: my-dataset
    soundfont:            # <- the source kind (soundfont, folder, youtube, ...)
      programs: {violin: 40}

Adding a kind = one module + one registration line at the bottom of this file::

    register_source("debian", "marsctl.data.debian:DebianSource", "marsctl.data.debian")

- ``name``: the kind, also the recipe's section key.
- ``config_class``: the frozen dataclass the section is parsed into (with
  :func:`marsctl.config.from_mapping`, so unknown keys are errors); a class, or
  ``"module:Class"`` imported only when a recipe uses the kind.
- ``module``: the dotted path of the module that does the work, imported only when the
  fetch stage runs. It exposes

  - ``plan_units(recipe, dataset_dir, options) -> (list[WorkUnit], list[SkippedRow])``:
    the work units (see :mod:`marsctl.data.records`) and the rows skipped before any attempt;
  - ``run_unit(unit, recipe, dataset_dir) -> list[ClipRecord]``: do one unit (failed items
    become records with ``status="failed"`` and a reason, never exceptions);
  - optionally ``apply_options(recipe, options, dataset_dir) -> DataRecipe``: the recipe with
    the command-line overrides of :class:`marsctl.data.fetch.FetchOptions` that concern it.

``recipe.source`` is the parsed section and ``recipe.source_kind`` its name. A source
config may define ``for_card(self)`` returning a copy without private settings (a cookies
file's location), which is what the dataset card records, and ``relative_to(self, folder)``
returning a copy whose relative paths are resolved against ``folder`` (the recipe file's). The fetch stage runs units on
``getattr(recipe.source, "workers", 1)`` threads.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from marsctl.errors import ConfigError


@dataclass(frozen=True)
class SourceKind:
    name: str
    config: type | str
    module: str

    def config_class(self) -> type:
        if isinstance(self.config, type):
            return self.config
        module_name, _, attr = self.config.partition(":")
        return getattr(importlib.import_module(module_name), attr)

    def load_module(self) -> ModuleType:
        return importlib.import_module(self.module)


_KINDS: dict[str, SourceKind] = {}


def register_source(name: str, config_class: type | str, module: str) -> None:
    """Register a source kind (see the module docstring); registering a name twice is an error."""
    if name in _KINDS:
        raise ValueError(f"source kind {name!r} is already registered")
    if isinstance(config_class, str) and ":" not in config_class:
        raise ValueError(f"source kind {name!r}: config_class must be a class or 'module:Class', got {config_class!r}")
    _KINDS[name] = SourceKind(name, config_class, module)


def source_kinds() -> list[str]:
    """The registered kind names, sorted."""
    return sorted(_KINDS)


def get_source(name: str, where: str = "recipe") -> SourceKind:
    try:
        return _KINDS[name]
    except KeyError:
        raise ConfigError(f"{where}: unknown source kind {name!r}; known kinds: {', '.join(source_kinds())}") from None


def source_module(name: str) -> ModuleType:
    """The module that plans and runs the units of kind ``name``."""
    return get_source(name).load_module()


register_source("soundfont", "marsctl.data.recipe:SoundfontSource", "marsctl.data.soundfont")
register_source("folder", "marsctl.data.recipe:FolderSource", "marsctl.data.folder")
register_source("youtube", "marsctl.data.recipe:YoutubeSource", "marsctl.data.youtube")
register_source("debian", "marsctl.data.debian:DebianSource", "marsctl.data.debian")
register_source("union", "marsctl.data.union:UnionSource", "marsctl.data.union")
