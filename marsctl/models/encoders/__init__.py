"""Query/reward encoders: one interface, several implementations, saved as directories.

- :class:`QueryEncoder` (the interface, from :mod:`marsctl.models.encoder_base`);
- :class:`BuiltinEncoder`: offline (packaged MiniLM text tower + small audio/image CNNs);
- :class:`ClapEncoder`: real LAION-CLAP checkpoints (+ an image branch);
- :class:`AnchorFusion`: the reward anchor z* (low-rank bilinear pooling);
- :func:`load_encoder` / :func:`save_encoder`.
"""

from marsctl.models.encoder_base import QueryEncoder
from marsctl.models.encoders.anchor import AnchorFusion
from marsctl.models.encoders.builtin import BuiltinEncoder, BuiltinEncoderConfig
from marsctl.models.encoders.common import ProjectedEncoder
from marsctl.models.encoders.store import load_encoder, save_encoder
from marsctl.models.encoders.towers import AudioCnnConfig, ImageTowerConfig

__all__ = [
    "AnchorFusion",
    "AudioCnnConfig",
    "BuiltinEncoder",
    "BuiltinEncoderConfig",
    "ImageTowerConfig",
    "ProjectedEncoder",
    "QueryEncoder",
    "load_encoder",
    "save_encoder",
]


def __getattr__(name: str):  # the CLAP adapter imports heavy code: only on demand
    if name in ("ClapEncoder", "ClapEncoderConfig"):
        from marsctl.models.encoders import clap

        return getattr(clap, name)
    raise AttributeError(name)
