"""Progressive alignment of the query/reward encoder (``marsctl align``).

- :mod:`marsctl.align.config`: one typed config per stage, recipes under ``recipes/align``;
- :mod:`marsctl.align.data`: clips manifest, crops, batches with acoustically close hard negatives;
- :mod:`marsctl.align.losses`: symmetric InfoNCE, triplet, consistency, anchor (z*) losses;
- :mod:`marsctl.align.metrics`: held-out R@1/R@5 and the target-vs-mixture similarity gap;
- :mod:`marsctl.align.trainer`: the stage loop, checkpoints, resume (:func:`run_alignment`).
"""

from marsctl.align.config import AlignConfig, load_align_config
from marsctl.align.trainer import Reporter, run_alignment

__all__ = ["AlignConfig", "Reporter", "load_align_config", "run_alignment"]
