"""What to extract: queries (text, audio, image, a time span of the mixture itself, negative),
their output names, their embedding, and the per-file mapping files of ``marsctl separate --queries``.

A span query (``--span 6.3:7.0``) is the segment of the file being separated between those
seconds, embedded by the encoder's audio tower like an example recording (the audio modality),
so its vector depends on the file: it is embedded once per file.

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
import math
import re
from pathlib import Path

import torch

from marsctl.audio import load_audio, open_audio_stream
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
    """What to extract: texts (composed), audio clips, images, spans ``(start, end)`` in seconds of the
    mixture itself; minus an optional negative text."""

    texts: tuple[str, ...] = ()
    audio: tuple[str, ...] = ()
    images: tuple[str, ...] = ()
    negative: tuple[str, ...] = ()
    negative_strength: float = DEFAULT_NEGATIVE_STRENGTH
    spans: tuple[tuple[float, float], ...] = ()

    def __post_init__(self) -> None:
        if not (self.texts or self.audio or self.images or self.spans):
            raise ConfigError("a query needs a text, an audio file, an image or a span of the mixture")
        for start, end in self.spans:
            if not (0 <= start < end):
                raise ConfigError(f"span {start:g}:{end:g}: expected START:END in seconds with 0 <= START < END, e.g. 6.3:7.0")
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
        fields = [self.texts, self.audio, self.images, self.negative, self.negative_strength] + ([self.spans] if self.spans else [])
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
        parts += [f"span-{round(start * 1000)}-{round(end * 1000)}ms" for start, end in self.spans]
        return "+".join(parts) + ("-not-" + "+".join(self.negative) if self.negative else "")


def parse_span(text: str) -> tuple[float, float]:
    """``"6.3:7.0"`` -> ``(6.3, 7.0)`` seconds; one line for anything else."""
    start, sep, end = str(text).strip().partition(":")
    try:
        span = (float(start), float(end)) if sep else None
    except ValueError:
        span = None
    if span is None or not all(map(math.isfinite, span)):
        raise ConfigError(f"span {text!r}: expected START:END in seconds, e.g. 6.3:7.0")
    if not 0 <= span[0] < span[1]:
        raise ConfigError(f"span {text!r}: expected 0 <= START < END, e.g. 6.3:7.0")
    return span


def read_span(mixture: str | Path | torch.Tensor, span: tuple[float, float], sample_rate: int) -> torch.Tensor:
    """Samples ``[round(start * sr), round(end * sr))`` of ``mixture`` (a file, read block by block only
    up to the span's end, or a mono waveform at ``sample_rate``) at ``sample_rate``. A span that starts
    past the end is an error naming the file; one that runs past it is cut there."""
    first, last = round(span[0] * sample_rate), round(span[1] * sample_rate)
    if isinstance(mixture, torch.Tensor):
        length, segment = mixture.shape[-1], mixture[first:last]
    else:
        parts, length = [], 0
        for block in open_audio_stream(mixture, sample_rate):
            if length + block.shape[-1] > first and length < last:
                parts.append(block[max(first - length, 0) : last - length])
            length += block.shape[-1]
            if length >= last:
                break
        segment = torch.cat(parts) if parts else torch.zeros(0)
    if segment.shape[-1] == 0:
        where = "the mixture" if isinstance(mixture, torch.Tensor) else str(mixture)
        raise ConfigError(f"span {span[0]:g}:{span[1]:g}: {where} is only {length / sample_rate:.2f} s long")
    return segment.float()


@torch.no_grad()
def embed_query(encoder: QueryEncoder, query: Query, sample_rate: int = 16_000,
                mixture: str | Path | torch.Tensor | None = None) -> torch.Tensor:
    """The fused, unit-norm query vector ``[D]`` (see :mod:`marsctl.models.query`). ``mixture`` (a file or
    a waveform at ``sample_rate``) is where the query's spans are taken from; example recordings and
    spans are composed into the audio part."""
    parts: dict[str, torch.Tensor] = {}
    if query.texts:
        parts["text"] = compose(encoder.embed_text(list(query.texts)).float().cpu())
    if query.spans and mixture is None:
        raise ConfigError("a span query is taken from the mixture being separated; none was given")
    if query.audio or query.spans:
        waves = [torch.from_numpy(load_audio(p, sample_rate)) for p in query.audio]
        waves += [read_span(mixture, span, sample_rate) for span in query.spans]
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
