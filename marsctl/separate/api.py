"""The public Python API for separation: :class:`Separator` (``marsctl.Separator``).

Modelled on ``demucs.api.Separator`` and AudioSep's ``separate_audio``::

    import marsctl

    separator = marsctl.Separator.from_pretrained("default")        # or "runs/sup", "org/name@rev"
    violin = separator.separate("mix.flac", query="violin")        # [T] tensor at separator.sample_rate
    piano = separator.separate(waveform, sample_rate=44_100, query="piano", negative="drums")

``marsctl separate`` calls exactly this class: :meth:`Separator.separate_files` is the batch
path (folders, mapping files, outputs on disk), :meth:`Separator.separate` the in-memory one.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import numpy as np
import torch

from marsctl.audio import StreamingResampler, open_audio_stream
from marsctl.errors import ConfigError, MarsctlError
from marsctl.models.encoder_base import QueryEncoder
from marsctl.models.separator import LoadedSeparator, load_separator
from marsctl.separate.apply import SeparateOptions, mixture_level_gain, separate_waveform
from marsctl.separate.inputs import InputFile
from marsctl.separate.outputs import ProgressCallback, SeparationReport, check_output_folder, separate_jobs
from marsctl.separate.queries import DEFAULT_NEGATIVE_STRENGTH, Query, VocabularyNote, embed_query, out_of_vocabulary, parse_span

if TYPE_CHECKING:
    from marsctl.separate.stream import SeparationStream

#: directory of the model shipped inside the package (``default``; marsctl.pretrained.DEFAULT_SEPARATOR_DIR)
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "pretrained" / "separator"


def default_model_spec() -> Path:
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise MarsctlError("no default model is installed with this copy of marsctl; pass --model DIR (a 'marsctl train sup' run directory)")
    return DEFAULT_MODEL_DIR


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> cuda when available, else cpu; an unknown device or a missing GPU is one clear error."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError):
        raise MarsctlError(f"--device {device}: unknown device; use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise MarsctlError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise MarsctlError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise MarsctlError(f"--device {device}: MPS is not available here; use --device cpu")
    elif resolved.type not in ("cpu", "cuda", "mps"):
        raise MarsctlError(f"--device {device}: not supported; use cpu, cuda or cuda:N")
    return resolved


def load_model_and_encoder(model_spec: str | Path | None, encoder_spec: str | None = None, device: str | torch.device = "cpu"):
    """The separator (``model_spec``, ``"default"`` or None for the embedded default) and the query encoder it was trained with."""
    from marsctl.models.encoders import load_encoder

    if model_spec is None or (isinstance(model_spec, str) and model_spec == "default"):  # a folder: "./default"
        model_spec = default_model_spec()
    loaded = load_separator(model_spec, device=device)
    encoder = load_encoder(encoder_spec or loaded.encoder, device=device)
    if encoder.embedding_dim != loaded.model.config.query_dim:
        raise MarsctlError(
            f"encoder {encoder_spec or loaded.encoder} gives {encoder.embedding_dim}-d queries; the separator in {loaded.directory} expects {loaded.model.config.query_dim}"
        )
    return loaded, encoder


#: glibc's mallopt parameter for the size from which allocations get their own mapping
_M_MMAP_THRESHOLD = -3
#: allocations from this size up are mapped on their own and unmapped when freed
LARGE_BUFFER_BYTES = 128 * 1024


def return_large_buffers_to_the_system() -> bool:
    """Have every allocation of :data:`LARGE_BUFFER_BYTES` or more mapped on its own, so that
    freeing it gives the memory straight back to the system (glibc ``mallopt``; returns
    False, doing nothing, elsewhere).

    By default glibc raises this threshold each time a large block is freed (up to 32 MiB),
    after which the separator's activations (1-35 MiB tensors at ``--batch-size 8``) come
    from the heap, whose freed holes are reused only in part: a run then peaks 65-90 MiB
    above what it holds at any moment (BENCHMARKS.md section 6). The price is page faults on
    fresh pages for each batch; its cost in speed was within the noise of the shared machine
    it was measured on. Process-wide; ``marsctl separate`` calls it through
    :meth:`Separator.prepare` once the text model is released.
    """
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, LARGE_BUFFER_BYTES))
    except (OSError, AttributeError):
        return False


def _strings(value: str | os.PathLike | Sequence[str | os.PathLike] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, os.PathLike)):
        return (os.fspath(value),)
    return tuple(os.fspath(v) for v in value)


def _spans(value) -> tuple[tuple[float, float], ...]:
    """``"6.3:7.0"``, ``(6.3, 7.0)`` or a list of them -> ``((6.3, 7.0), ...)``."""
    if value is None:
        return ()
    if isinstance(value, str) or (len(value) == 2 and all(isinstance(v, (int, float)) for v in value)):
        value = [value]
    return tuple(parse_span(v if isinstance(v, str) else f"{v[0]}:{v[1]}") for v in value)


class Separator:
    """A trained query-conditioned separator with its query encoder, ready to separate.

    ``decode``, ``overlap``, ``batch_size``, ``chunk_samples`` and ``seed`` are the options of
    :func:`marsctl.separate.apply.apply_separator` (as ``marsctl separate``'s flags);
    ``normalize_level`` separates each mixture at the model's training level and restores its own
    (:func:`marsctl.separate.apply.mixture_level_gain`; ``marsctl separate --raw-level`` turns it off).
    """

    def __init__(self, loaded: LoadedSeparator, encoder: QueryEncoder, *, decode: str = "mode", overlap: float = 0.25,
                 batch_size: int = 8, chunk_samples: int | None = None, seed: int = 0, normalize_level: bool = True):
        self.loaded, self.encoder = loaded, encoder
        self.options = SeparateOptions(decode=decode, overlap=overlap, batch_size=batch_size, chunk_samples=chunk_samples, seed=seed,
                                       normalize_level=normalize_level)

    @classmethod
    def from_pretrained(cls, spec: str | Path = "default", *, encoder: str | None = None, device: str | torch.device | None = None,
                        **options) -> "Separator":
        """Load ``"default"`` (the small model shipped with marsctl), a run directory of
        ``marsctl train sup/rl``, or a Hub id ``org/name[@revision]`` (through :mod:`marsctl.hub`'s
        cache; a local folder named ``default`` is ``./default``). ``encoder`` overrides the query
        encoder; ``device`` defaults to cuda when available. Other keywords: the options of the class."""
        SeparateOptions(**options)  # bad options fail before the model is loaded
        loaded, query_encoder = load_model_and_encoder(spec, encoder, resolve_device(device))
        return cls(loaded, query_encoder, **options)

    @property
    def sample_rate(self) -> int:
        """The rate of every waveform :meth:`separate` returns (16 kHz for the shipped models)."""
        return self.loaded.model.config.signal.sample_rate

    @property
    def directory(self) -> Path:
        return self.loaded.directory

    @property
    def known_labels(self) -> list[str]:
        """The classes the separator was trained on (its config's ``labels``; [] when not recorded)."""
        return [str(label) for label in self.loaded.config.get("labels") or []]

    def out_of_vocabulary(self, texts: Sequence[str]) -> list[VocabularyNote]:
        """The text queries far, in the encoder's space, from every class the model was trained on."""
        return out_of_vocabulary(self.encoder, self.known_labels, list(texts))

    def prepare(self, queries: Sequence[Query], release_text_model: bool = False) -> None:
        """Embed the texts (and negative texts) of every query now; with ``release_text_model`` free
        the encoder's text model afterwards (about 100 MiB for the built-in one), after which only
        these texts can be embedded, and have large buffers given back to the system as soon as
        they are freed (:func:`return_large_buffers_to_the_system`). ``marsctl separate`` does
        this to lower its peak memory (BENCHMARKS.md section 6). Audio and image queries are read
        when their files are separated."""
        with torch.no_grad():
            for texts in dict.fromkeys(group for query in queries for group in (query.texts, query.negative) if group):
                self.encoder.embed_text(list(texts))
        if release_text_model:
            self.encoder.release_text_model()
            return_large_buffers_to_the_system()

    def embed(self, query: Query, mixture: str | os.PathLike | torch.Tensor | None = None) -> torch.Tensor:
        """The fused query vector ``[D]`` the separator is conditioned on; ``mixture`` (a file, or a mono
        waveform at :attr:`sample_rate`) is where a span query is taken from."""
        return embed_query(self.encoder, query, self.sample_rate, mixture=mixture)

    def separate(
        self,
        mixture: str | os.PathLike | torch.Tensor | np.ndarray,
        sample_rate: int | None = None,
        *,
        query: str | Sequence[str] | None = None,
        query_audio: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        query_image: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        negative: str | Sequence[str] | None = None,
        negative_strength: float = DEFAULT_NEGATIVE_STRENGTH,
        span: tuple[float, float] | str | Sequence[tuple[float, float] | str] | None = None,
    ) -> torch.Tensor:
        """Extract what the query describes from ``mixture``.

        ``mixture``: an audio/video file path (any format :func:`marsctl.audio.load_audio` reads,
        streamed), or a waveform ``[T]`` or ``[C, T]`` (channels are averaged) at ``sample_rate``
        (required for waveforms). The query is any mix of texts (several compose), example
        recordings and images (paths) and spans of the mixture itself (``(6.3, 7.0)`` or ``"6.3:7.0"``,
        seconds; embedded like a recording), fused with equal weights, minus an optional negative text.

        Returns the estimate as a mono float32 CPU tensor ``[T']`` at :attr:`sample_rate`
        (16 kHz for the shipped models), whatever the input rate: ``T' = ceil(T * sample_rate / rate)``.
        """
        the_query = Query(texts=_strings(query), audio=_strings(query_audio), images=_strings(query_image),
                          negative=_strings(negative), negative_strength=negative_strength, spans=_spans(span))
        return self.separate_queries(mixture, [the_query], sample_rate)[0]

    def separate_queries(self, mixture: str | os.PathLike | torch.Tensor | np.ndarray, queries: Sequence[Query],
                         sample_rate: int | None = None) -> torch.Tensor:
        """Several :class:`Query` objects on one mixture in one U-Net pass: ``[K, T']`` at :attr:`sample_rate`."""
        blocks = self._mixture_blocks(mixture, sample_rate)
        source = mixture if isinstance(mixture, (str, os.PathLike)) else blocks[0]  # spans: the file, or the resampled waveform
        vectors = torch.stack([self.embed(q, source if q.spans else None) for q in queries])
        gain = None
        if self.options.normalize_level:  # a first pass over the mixture: its level (a file is read twice)
            gain = mixture_level_gain(self.loaded.model, self._mixture_blocks(mixture, sample_rate) if isinstance(mixture, (str, os.PathLike)) else blocks)
        estimates = separate_waveform(self.loaded.model, blocks, vectors, self.options, encoder=self.encoder, level_gain=gain)
        if not bool(torch.isfinite(estimates).all()):
            where = f"{mixture}: " if isinstance(mixture, (str, os.PathLike)) else ""
            raise MarsctlError(f"{where}the separated audio is not finite (NaN or Inf); the input's level is beyond what float32 audio holds?")
        return estimates

    def stream(
        self,
        *,
        query: str | Sequence[str] | None = None,
        query_audio: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        query_image: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        negative: str | Sequence[str] | None = None,
        negative_strength: float = DEFAULT_NEGATIVE_STRENGTH,
        queries: Sequence[Query] | None = None,
        sample_rate: int | None = None,
        latency: float = 0.5,
        hop: float = 0.25,
        window: float | None = None,
        refine_hops: int | None = None,
    ) -> "SeparationStream":
        """A live separation (:mod:`marsctl.separate.stream`): ``push(block) -> (current, refined)``.

        ``current`` holds each hop's estimate ``latency`` seconds after the hop began to arrive;
        ``refined`` the same hop ``refine_hops`` hops later, re-estimated with that much more
        future (by default once it is final: the offline result). Blocks are at ``sample_rate``
        (default: the separator's), of any size; the estimates at :attr:`sample_rate`. With
        ``queries`` (several :class:`Query`) each output is ``[K, m]``.
        """
        from marsctl.separate.stream import SeparationStream, check_stream_decode, stream_settings

        check_stream_decode(self.options.decode)
        single = queries is None
        if single:
            queries = [Query(texts=_strings(query), audio=_strings(query_audio), images=_strings(query_image),
                             negative=_strings(negative), negative_strength=negative_strength)]
        if any(q.spans for q in queries):
            raise ConfigError("a stream cannot take a span query (the span would have to be heard first); use a text, audio or image query")
        signal = self.loaded.model.config.signal
        settings = stream_settings(signal.sample_rate, self.options.chunk_samples or signal.segment_samples,
                                   latency=latency, hop=hop, window=window, refine_hops=refine_hops)
        vectors = torch.stack([self.embed(q) for q in queries])
        return SeparationStream(self.loaded.model, vectors, settings, decode=self.options.decode,
                                input_rate=sample_rate, squeeze=single)

    def _mixture_blocks(self, mixture, sample_rate: int | None) -> Iterable[torch.Tensor]:
        if isinstance(mixture, (str, os.PathLike)):
            return open_audio_stream(mixture, self.sample_rate)
        wave = torch.as_tensor(mixture, dtype=torch.float32)
        if sample_rate is None:
            raise ConfigError(f"give sample_rate= with a waveform (the separator works at {self.sample_rate} Hz and resamples)")
        if wave.ndim == 2:
            wave = wave.mean(dim=0)
        if wave.ndim != 1 or wave.shape[0] == 0:
            raise ConfigError(f"expected a waveform [T] or [channels, T] with samples, got shape {tuple(wave.shape)}")
        resampler = StreamingResampler(int(sample_rate), self.sample_rate)
        return [torch.cat([resampler.push(wave.cpu()), resampler.finish()])]

    def separate_files(
        self,
        jobs: Iterable[tuple[InputFile, Query]],
        out_dir: str | Path,
        *,
        residual: bool = False,
        overwrite: bool = False,
        on_file: Callable[[Path], None] | None = None,
        on_progress: ProgressCallback | None = None,
        sample_rate: int | None = None,
        format: str = "wav",
        subtype: str | None = None,
    ) -> SeparationReport:
        """Separate (file, query) jobs into ``out_dir`` (see :mod:`marsctl.separate.outputs`): streamed,
        confined to ``out_dir``, existing outputs kept unless ``overwrite``. Failures are in the report.
        Outputs are mono ``format`` files (``wav``/``flac``, ``subtype`` as soundfile names it) at
        ``sample_rate`` (default: each input's own rate)."""
        options = dataclasses.replace(self.options, out_dir=Path(out_dir), residual=residual, overwrite=overwrite,
                                      sample_rate=sample_rate, format=format, subtype=subtype)
        check_output_folder(options.out_dir)
        return separate_jobs(self.loaded, self.encoder, jobs, options, on_file=on_file, on_progress=on_progress)
