"""Dataset builders: recipes, fetch (a source kind of :mod:`marsctl.data.sources`), filter, mix, manifests.

See :mod:`marsctl.data.manifest` for the dataset layout and the manifest schema.
"""

from marsctl.data.manifest import load_clips, load_mixtures

__all__ = ["load_clips", "load_mixtures"]
