"""What to extract: queries (text, audio, image, negative), their output names, their
embedding, and the per-file mapping files of ``marsctl separate --queries``.

Output names: :meth:`Query.slug` is the readable part (``dog-barking``,
``piano+violin-not-drums``, ``audio-bark``; Unicode letters are kept). When the slug
loses something that tells two queries apart (case, punctuation, several spaces, a ``+``
inside a text, a non-default negative strength), :meth:`Query.output_stem` adds eight hex
digits of a hash of the exact query, so "dog barking" and "Dog-Barking!" never share a
file, in one run or across runs. A text with no letter or digit is rejected.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import torch

from marsctl.audio import load_audio
from marsctl.errors import ConfigError, MarsctlError
from marsctl.models.encoder_base import QueryEncoder
from marsctl.models.query import compose, fuse, negative_query

DEFAULT_NEGATIVE_STRENGTH = 0.5
#: longest slug, in UTF-8 bytes (file systems allow 255 per name)
MAX_SLUG_BYTES = 80
_NOT_NAME = re.compile(r"(?:[^\w+]|_)+")
_WORD = re.compile(r"[^\W_]")
#: a text the slug keeps exactly: lowercase words separated by single spaces
_EXACT_TEXT = re.compile(r"[^\W_]+(?: [^\W_]+)*")


@dataclasses.dataclass(frozen=True)
class Query:
    """What to extract: texts (composed), audio clips, images; minus an optional negative text."""

    texts: tuple[str, ...] = ()
    audio: tuple[str, ...] = ()
    images: tuple[str, ...] = ()
    negative: tuple[str, ...] = ()
    negative_strength: float = DEFAULT_NEGATIVE_STRENGTH

    def __post_init__(self) -> None:
        if not (self.texts or self.audio or self.images):
            raise ConfigError("a query needs a text, an audio file or an image")
        for text in self.texts + self.negative:
            if not _WORD.search(text):
                raise ConfigError(f"query text {text!r} has no letter or digit; give a description such as 'dog barking'")

    def slug(self) -> str:
        """A readable, file-system-safe name: 'dog-barking', 'audio-example', 'piano+violin-not-drums'."""
        text = self._joined()
        slug = _NOT_NAME.sub("-", text.lower()).strip("-") or "query"
        if len(slug.encode()) > MAX_SLUG_BYTES:
            cut = slug
            while len(cut.encode()) > MAX_SLUG_BYTES - 9:
                cut = cut[:-1]
            slug = cut.rstrip("-") + "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
        return slug

    def exact_hash(self) -> str:
        """Eight hex digits identifying the exact query (texts, files, negative, strength)."""
        fields = [self.texts, self.audio, self.images, self.negative, self.negative_strength]
        return hashlib.sha1(json.dumps(fields, ensure_ascii=False).encode()).hexdigest()[:8]

    def is_lossy(self) -> bool:
        """True when :meth:`slug` drops something that can tell queries apart."""
        texts_exact = all(_EXACT_TEXT.fullmatch(t) and t == t.lower() for t in self.texts + self.negative)
        strength_default = not self.negative or self.negative_strength == DEFAULT_NEGATIVE_STRENGTH
        return not (texts_exact and strength_default)

    def output_stem(self, hashed: bool = False) -> str:
        """The output file name without suffix: the slug, plus the exact hash when the slug is
        lossy (or ``hashed``, which a run asks for when two queries would share a name)."""
        return f"{self.slug()}-{self.exact_hash()}" if (hashed or self.is_lossy()) else self.slug()

    def _joined(self) -> str:
        parts = list(self.texts) + [f"audio-{Path(p).stem}" for p in self.audio] + [f"image-{Path(p).stem}" for p in self.images]
        return "+".join(parts) + ("-not-" + "+".join(self.negative) if self.negative else "")


@torch.no_grad()
def embed_query(encoder: QueryEncoder, query: Query, sample_rate: int = 16_000) -> torch.Tensor:
    """The fused, unit-norm query vector ``[D]`` (see :mod:`marsctl.models.query`)."""
    parts: dict[str, torch.Tensor] = {}
    if query.texts:
        parts["text"] = compose(encoder.embed_text(list(query.texts)).float().cpu())
    if query.audio:
        waves = [torch.from_numpy(load_audio(p, sample_rate)) for p in query.audio]
        parts["audio"] = compose(encoder.embed_audio([w.to(encoder.device) for w in waves], sample_rate).float().cpu())
    if query.images:
        parts["image"] = compose(encoder.embed_image(torch.stack([load_image(p) for p in query.images]).to(encoder.device)).float().cpu())
    q = fuse(parts)
    if query.negative:
        q = negative_query(q, compose(encoder.embed_text(list(query.negative)).float().cpu()), query.negative_strength)
    return q


def load_image(path: str | Path, size: int = 224) -> torch.Tensor:
    """An RGB image as ``[3, size, size]`` in [0, 1]; errors name the file."""
    from torchvision.io import ImageReadMode, decode_image

    path = Path(path)
    if not path.is_file():
        raise MarsctlError(f"{path}: no such image file")
    try:
        image = decode_image(str(path), mode=ImageReadMode.RGB).float() / 255.0
    except PermissionError:
        raise MarsctlError(f"{path}: permission denied") from None
    except (RuntimeError, ValueError, OSError) as exc:
        raise MarsctlError(f"{path}: not a readable image ({str(exc).splitlines()[0]})") from exc
    return torch.nn.functional.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False)[0]


#: cosine (in the query encoder's text space) below which a text query counts as far from every
#: class the separator was trained on. Measured with the built-in MiniLM text tower on the 10
#: instrument names: synonyms and variants score 0.74-1.0 ("guitar" -> acoustic guitar 0.87,
#: "sax" 0.84, "trumpet solo" 0.79), unseen classes 0.14-0.58 ("piano" 0.57, "dog barking"
#: 0.23); "fiddle" (0.50) is a false alarm: the warning never stops a run.
OUT_OF_VOCABULARY_COSINE = 0.6


@dataclasses.dataclass(frozen=True)
class VocabularyNote:
    """A text query far from every known class, with the nearest known classes and cosines."""

    query: str
    nearest: tuple[tuple[str, float], ...]

    @property
    def nearest_text(self) -> str:
        """The nearest known classes with their cosines, e.g. ``violin (0.52), cello (0.48)``."""
        return ", ".join(f"{label} ({cos:.2f})" for label, cos in self.nearest)

    def message(self) -> str:
        return (f"query {self.query!r} is far from every class this model was trained on "
                f"(nearest: {self.nearest_text}); separating anyway, expect a poor result")


def out_of_vocabulary(encoder: QueryEncoder, known_labels: list[str] | tuple[str, ...], texts: list[str] | tuple[str, ...],
                      threshold: float = OUT_OF_VOCABULARY_COSINE, top: int = 3) -> list[VocabularyNote]:
    """The texts whose best cosine with the known class names is below ``threshold`` (each once,
    in the order given); empty when the model does not record its classes."""
    texts = list(dict.fromkeys(texts))
    if not known_labels or not texts:
        return []
    with torch.no_grad():
        similarity = encoder.embed_text(texts) @ encoder.embed_text(list(known_labels)).T  # unit vectors: cosines
    notes = []
    for text, row in zip(texts, similarity):
        if float(row.max()) < threshold:
            values, indices = row.topk(min(top, len(known_labels)))
            notes.append(VocabularyNote(text, tuple((known_labels[i], float(v)) for v, i in zip(values.tolist(), indices.tolist()))))
    return notes
