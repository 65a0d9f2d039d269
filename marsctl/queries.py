"""Query embeddings of a dataset's sources: the one query builder of training, RL and evaluation.

A source is queried by its class label (text), by audio of its class, or by a video frame
(image); several modalities are fused, ``q = normalize(sum_m w_m e_m)``
(:func:`marsctl.models.query.fuse`).

* Training batches (``train sup``, ``train rl``): :meth:`QueryBuilder.batch` embeds each
  source's label, its own audio and its first frame (the modalities asked for) and fuses them
  with Query-Mixup weights drawn from the step's generator (equal weights without Query-Mixup).
* Evaluation of fixed mixtures (``eval --model``): :meth:`QueryBuilder.source` gives one
  source's query for one modality, ``text`` (the label), ``audio`` (*another* kept clip of the
  same class in the split, the first in manifest order, never the source itself), ``image`` (the
  source's first frame) or ``omni`` (those of the three that exist, fused with equal weights).

Embeddings are computed without gradients, in float32. Those of :meth:`QueryBuilder.source` are
cached on the CPU; :meth:`QueryBuilder.batch` stays on the encoder's device (no round trip through
the host) and decodes and embeds each frame once, one at a time (an image's query does not depend
on the rest of the batch, so a resumed run's equals an uninterrupted run's), then reuses it.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import torch

from marsctl.audio import load_audio
from marsctl.errors import MarsctlError
from marsctl.models.encoder_base import QueryEncoder
from marsctl.models.query import MODALITIES, fuse, query_mixup_weights

#: what :meth:`QueryBuilder.source` accepts: each modality, or the three fused
SOURCE_MODALITIES = (*MODALITIES, "omni")
IMAGE_SIZE = 224


class QueryBuilder:
    """Query embeddings for the sources of ``dataset_dir`` (see the module docstring).

    ``modalities`` and ``mixup`` configure :meth:`batch`; ``split`` is where :meth:`source`
    looks for another clip of a class (audio queries)."""

    def __init__(
        self,
        encoder: QueryEncoder,
        dataset_dir: str | Path,
        sample_rate: int,
        modalities: Sequence[str] = ("text",),
        mixup: bool = True,
        split: str = "test",
    ):
        bad = [m for m in modalities if m not in MODALITIES]
        if bad or not modalities:
            raise MarsctlError(f"query modalities must be a non-empty subset of {MODALITIES}, got {list(modalities)}")
        self.encoder, self.root, self.sample_rate = encoder, Path(dataset_dir), sample_rate
        self.modalities, self.mixup, self.split = tuple(modalities), mixup, split
        self._text_cache: dict[str, torch.Tensor] = {}
        self._cache: dict[tuple[str, str], torch.Tensor] = {}
        self._frame_cache: dict[str, torch.Tensor] = {}  # first frame -> its embedding, on the encoder's device
        self._clips_by_label: dict[str, list[tuple[str, str]]] | None = None

    # --- one embedding per modality ------------------------------------------------------
    @torch.no_grad()
    def text(self, labels: Sequence[str]) -> torch.Tensor:
        """``[N, D]`` text embeddings of the labels, each embedded on its own: a padded batch of
        labels can round differently (the last bit), which made a resumed run's queries differ
        from an uninterrupted run's, whose cache was filled by other batches."""
        for label in labels:
            if label not in self._text_cache:
                self._text_cache[label] = self.encoder.embed_text([label])[0].float().cpu()
        return torch.stack([self._text_cache[label] for label in labels])

    @torch.no_grad()
    def frame_embeddings(self, frame_paths: Sequence[Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``[N, D]`` embeddings of each source's first frame on the encoder's device (zeros without
        one) and a CPU mask of the sources that have one; each frame decoded and embedded once."""
        from marsctl.separate.queries import load_image

        device = self.encoder.device
        for paths in frame_paths:
            if paths and paths[0] not in self._frame_cache:
                image = load_image(self.root / paths[0])[None].to(device)
                self._frame_cache[paths[0]] = self.encoder.embed_image(image)[0].float()
        zeros = torch.zeros(self.encoder.embedding_dim, device=device)
        embeddings = torch.stack([self._frame_cache[paths[0]] if paths else zeros for paths in frame_paths])
        return embeddings, torch.tensor([bool(paths) for paths in frame_paths])

    @torch.no_grad()
    def image(self, frame_paths: Sequence[str]) -> torch.Tensor | None:
        """``[D]``: the embedding of a source's first frame (None without frames)."""
        if not frame_paths:
            return None
        key = ("image", frame_paths[0])
        if key not in self._cache:
            from marsctl.separate.queries import load_image

            image = load_image(self.root / frame_paths[0])[None].to(self.encoder.device)
            self._cache[key] = self.encoder.embed_image(image)[0].float().cpu()
        return self._cache[key]

    @torch.no_grad()
    def audio_example(self, label: str, clip_id: str) -> torch.Tensor | None:
        """``[D]``: the embedding of another kept clip of ``label`` in the split (None when there is none)."""
        if self._clips_by_label is None:
            from marsctl.data.manifest import load_clips

            clips = load_clips(self.root, kept_only=True, split=self.split)
            self._clips_by_label = defaultdict(list)
            for other_id, other_label, path in zip(clips["clip_id"], clips["label"], clips["audio_path"]):
                self._clips_by_label[other_label].append((other_id, path))
        other = next((path for other_id, path in self._clips_by_label.get(label, []) if other_id != clip_id), None)
        if other is None:
            return None
        key = ("audio", other)
        if key not in self._cache:
            wave = torch.from_numpy(load_audio(self.root / other, self.sample_rate))
            self._cache[key] = self.encoder.embed_audio([wave.to(self.encoder.device)], self.sample_rate)[0].float().cpu()
        return self._cache[key]

    # --- what the trainers and the evaluation ask for ----------------------------------------
    def source(self, modality: str, label: str, clip_id: str, frame_paths: Sequence[str]) -> torch.Tensor | None:
        """``[D]``: the query of one source of a fixed mixture for ``modality`` (None when it has none)."""
        if modality == "text":
            return self.text([label])[0]
        if modality == "audio":
            return self.audio_example(label, clip_id)
        if modality == "image":
            return self.image(frame_paths)
        if modality != "omni":
            raise MarsctlError(f"unknown query modality {modality!r}; expected one of {', '.join(SOURCE_MODALITIES)}")
        parts = {"text": self.text([label])[0]}
        for name, embedding in (("audio", self.audio_example(label, clip_id)), ("image", self.image(frame_paths))):
            if embedding is not None:
                parts[name] = embedding
        return fuse(parts)

    @torch.no_grad()
    def batch(self, batch: dict[str, Any], generator: torch.Generator | None) -> torch.Tensor:
        """``[B, S, D]`` queries of every source of a training batch (``labels``, ``sources``,
        ``frame_paths`` as collated by :func:`marsctl.train.data.collate`), on the encoder's device."""
        labels = [label for item in batch["labels"] for label in item]
        n = len(labels)
        device = self.encoder.device
        embeddings: dict[str, torch.Tensor] = {}
        available: dict[str, torch.Tensor] = {}
        for modality in self.modalities:
            if modality == "text":
                embeddings["text"] = self.text(labels).to(device, non_blocking=True)
            elif modality == "audio":
                sources = batch["sources"].reshape(n, -1)
                embeddings["audio"] = self.encoder.embed_audio(sources.to(device, non_blocking=True), self.sample_rate).float()
            elif modality == "image":
                frames = [p for item, item_labels in zip(batch["frame_paths"], batch["labels"]) for p in (item or [[]] * len(item_labels))]
                if any(frames):
                    embeddings["image"], has = self.frame_embeddings(frames)
                    available["image"] = has.float()
        if self.mixup and len(embeddings) > 1:
            weights = query_mixup_weights(n, list(embeddings), generator)  # Query-Mixup: random, sum 1
        else:
            weights = {m: torch.ones(n) for m in embeddings}
        for modality, mask in available.items():
            weights[modality] = weights[modality] * mask  # a source without a frame gets no image weight
        total = sum(weights.values())
        fused = fuse(embeddings, {m: w / total for m, w in weights.items()})
        return fused.reshape(len(batch["labels"]), -1, fused.shape[-1])
