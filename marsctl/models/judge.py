"""Text-audio scores of separated audio, and whether two encoders are the same weights.

A *judge* is an encoder that scores an estimate against its label without having been
optimised against: 100 x cos(text embedding of the label, audio embedding of the
estimate). The same score computed with the encoder that RL maximised (the model's own
query/reward encoder) is not independent: RL raises it by construction, so the evaluation
reports it beside the judge's score under its own name (``reward_encoder_score``).

:func:`encoder_fingerprint` identifies an encoder's weights (type, config and a hash of every
persistent tensor), so that a "judge" that is really the reward encoder can be caught.
Used by ``marsctl eval --judge`` (:mod:`marsctl.eval.model`) and RL validation
(:mod:`marsctl.rl.judge`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Sequence

import torch

from marsctl.models.encoder_base import QueryEncoder

#: the score a row carries for each kind of encoder (``marsctl eval`` columns, RL metrics)
JUDGE_SCORE = "judge_score"
REWARD_ENCODER_SCORE = "reward_encoder_score"


class TextAudioScorer:
    """100 x cos(text embedding of each label, audio embedding of each estimate) with one encoder.

    Label embeddings are cached; estimates are embedded at ``sample_rate`` (the encoder resamples)."""

    def __init__(self, encoder: QueryEncoder, sample_rate: int):
        self.encoder, self.sample_rate = encoder, sample_rate
        self._texts: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, labels: Sequence[str], estimates: torch.Tensor) -> torch.Tensor:
        """``S`` labels and estimates ``[S, T]`` -> ``[S]`` scores in [-100, 100]."""
        for label in labels:  # one text per call: a label's vector never depends on the others
            if label not in self._texts:
                self._texts[label] = self.encoder.embed_text([label])[0].float().cpu()
        text = torch.stack([self._texts[label] for label in labels])
        audio = self.encoder.embed_audio([e.float().to(self.encoder.device) for e in estimates], self.sample_rate).float().cpu()
        return (text * audio).sum(-1) * 100.0


def encoder_fingerprint(encoder: QueryEncoder) -> str:
    """A SHA-256 (hex) of what makes the encoder compute what it computes: its class, its config
    (``config_mapping()`` where it has one: this names pretrained trunks that are not stored, e.g.
    a LAION-CLAP checkpoint) and every tensor of its ``persistent_state_dict()`` (or ``state_dict()``):
    name, dtype, shape and bytes. Equal fingerprints mean the same weights."""
    digest = hashlib.sha256()
    kind = getattr(encoder, "encoder_type", None) or f"{type(encoder).__module__}.{type(encoder).__qualname__}"
    config = encoder.config_mapping() if hasattr(encoder, "config_mapping") else {}
    digest.update(json.dumps({"type": kind, "config": config}, sort_keys=True, default=str).encode())
    state = encoder.persistent_state_dict() if hasattr(encoder, "persistent_state_dict") else encoder.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"\n{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
