"""Separation with a trained separator: the library behind ``marsctl separate`` and ``marsctl.Separator``.

- :mod:`marsctl.separate.api`: :class:`Separator` (``from_pretrained``, ``separate``, ``separate_files``);
- :mod:`marsctl.separate.queries`: :class:`Query` (text, audio, image, negative), its output name, its embedding;
- :mod:`marsctl.separate.inputs`: finding input files in folders, query mapping files (CSV/TSV/JSON);
- :mod:`marsctl.separate.apply`: :func:`apply_separator`, chunking + decoding + overlap-add in one function;
- :mod:`marsctl.separate.decode`: decode modes, including ``best-of-N`` re-ranked by the query encoder;
- :mod:`marsctl.separate.outputs`: batches of files streamed into an output folder.
"""

from marsctl.separate.api import DEFAULT_MODEL_DIR, Separator, default_model_spec, load_model_and_encoder, resolve_device
from marsctl.separate.apply import SeparateOptions, apply_separator, separate_waveform
from marsctl.separate.decode import DECODES, best_of_n_separate, parse_best_of
from marsctl.separate.inputs import InputFile, InputSearch, find_inputs, read_query_mapping
from marsctl.separate.outputs import SeparationReport, check_output_folder, output_paths, separate_jobs
from marsctl.separate.queries import Query, embed_query, load_image

__all__ = [
    "DECODES",
    "DEFAULT_MODEL_DIR",
    "InputFile",
    "InputSearch",
    "Query",
    "SeparateOptions",
    "SeparationReport",
    "Separator",
    "apply_separator",
    "best_of_n_separate",
    "check_output_folder",
    "default_model_spec",
    "embed_query",
    "find_inputs",
    "load_image",
    "load_model_and_encoder",
    "output_paths",
    "parse_best_of",
    "read_query_mapping",
    "resolve_device",
    "separate_jobs",
    "separate_waveform",
]
