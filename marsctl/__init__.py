"""marsctl: the MARS-Sep toolkit (query-conditioned sound separation with RL fine-tuning).

The public Python API, loaded on first use so that ``import marsctl`` stays light::

    import marsctl

    separator = marsctl.Separator.from_pretrained("default")   # a run folder, or org/name@rev
    violin = separator.separate("mix.flac", query="violin")   # [T] tensor at separator.sample_rate

- :class:`Separator` (:mod:`marsctl.separate`): separation from code, as ``marsctl separate``;
- :func:`score` (:mod:`marsctl.eval`): the metrics of ``marsctl eval``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> module that defines it
_LAZY = {"Separator": "marsctl.separate", "score": "marsctl.eval"}

__all__ = ["Separator", "__version__", "score"]

if TYPE_CHECKING:
    from marsctl.eval import score
    from marsctl.separate import Separator


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'marsctl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
