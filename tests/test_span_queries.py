"""Time-span queries (issue 28, item 4): `separate --span START:END`, a `span` column in the mapping
file, and `eval --query-modality span` (the span where the target is active in the test mixture)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from marsctl.audio import load_audio
from marsctl.errors import ConfigError
from marsctl.eval.model import target_span
from marsctl.metrics.separation import si_sdr
from marsctl.pretrained import EXAMPLE_REFERENCES_DIR
from marsctl.separate import InputFile, Query, Separator, read_query_mapping
from marsctl.separate.queries import embed_query, parse_span, read_span

SR = 16_000


@pytest.fixture(scope="module")
def separator():
    return Separator.from_pretrained("default", device="cpu")


def test_parse_span_and_one_line_errors():
    assert parse_span("6.3:7.0") == (6.3, 7.0) and parse_span(" 0:1.5 ") == (0.0, 1.5)
    for bad in ("6.3", "7:6.3", "a:b", "-1:2", "1:inf"):
        with pytest.raises(ConfigError, match="span"):
            parse_span(bad)


def test_read_span_takes_exactly_that_segment_from_a_file_read_in_blocks(tmp_path, monkeypatch):
    import marsctl.audio.stream as stream_module

    monkeypatch.setattr(stream_module, "BLOCK_SECONDS", 0.3)  # the span crosses block edges
    wave = np.random.default_rng(0).standard_normal(5 * SR).astype(np.float32) * 0.1
    path = tmp_path / "mix.wav"
    sf.write(path, wave, SR, subtype="FLOAT")
    segment = read_span(path, (1.25, 2.5), SR)
    assert torch.equal(segment, torch.from_numpy(wave[20_000:40_000]))
    assert torch.equal(read_span(torch.from_numpy(wave), (1.25, 2.5), SR), segment)
    assert read_span(path, (4.5, 9.0), SR).shape[0] == SR // 2  # cut at the end
    with pytest.raises(ConfigError, match=r"mix.wav is only 5.00 s long"):
        read_span(path, (6.0, 7.0), SR)


def test_target_span_is_where_the_target_is_active():
    rng = np.random.default_rng(1)
    sources = np.zeros((2, 6 * SR))
    sources[0, int(3.2 * SR) : int(4.6 * SR)] = rng.standard_normal(int(1.4 * SR))  # target: 3.2-4.6 s only
    sources[1] = 0.3 * rng.standard_normal(6 * SR)  # the other source all along
    sources[1, int(3.9 * SR) :] *= 4  # and loud from 3.9 s: the clearest second of the target is early in it
    start, end = target_span(sources, 0, SR)
    assert end - start == pytest.approx(1.0) and 3.1 - 1e-9 <= start and end <= 4.6 + 1e-9 and start < 3.35
    assert target_span(sources[:, : SR // 2], 0, SR) == (0.0, 0.5)  # shorter than a span: all of it


def test_a_span_query_is_the_audio_tower_embedding_of_that_segment(separator, tmp_path):
    mixture = EXAMPLE_REFERENCES_DIR / "crowd-cheering+cello" / "mixture.flac"
    wave = torch.from_numpy(load_audio(mixture, SR))
    by_span = separator.embed(Query(spans=((1.0, 2.0),)), mixture)
    encoder = separator.encoder
    direct = torch.nn.functional.normalize(encoder.embed_audio([wave[SR : 2 * SR]], SR).float()[0], dim=-1)
    torch.testing.assert_close(by_span, direct, atol=1e-5, rtol=0)
    assert Query(spans=((1.0, 2.0),)).output_stem() == "span-1000-2000ms"
    with pytest.raises(ConfigError, match="taken from the mixture"):
        embed_query(encoder, Query(spans=((1.0, 2.0),)), SR)


def test_mapping_file_span_column(tmp_path):
    (tmp_path / "queries.csv").write_text("path,query,span\na.wav,,1:2\nb.wav,violin,0.5:1|3:4\n")
    (a, qa), (b, qb) = read_query_mapping(tmp_path / "queries.csv")
    assert qa == Query(spans=((1.0, 2.0),)) and qb == Query(texts=("violin",), spans=((0.5, 1.0), (3.0, 4.0)))
    (tmp_path / "bad.csv").write_text("path,span\na.wav,2:1\n")
    with pytest.raises(ConfigError, match=r"bad.csv: entry 1 \(a.wav\): span '2:1'"):
        read_query_mapping(tmp_path / "bad.csv")


def test_span_queries_separate_a_test_mixture_with_the_default(separator, tmp_path):
    """The spans where each source is active give a positive SI-SDRi on a held-out example mixture,
    through the files path (`separate --span`) as through the in-memory API."""
    folder = EXAMPLE_REFERENCES_DIR / "crowd-cheering+cello"
    mixture = torch.from_numpy(load_audio(folder / "mixture.flac", SR)).double()
    names = ["cello", "crowd-cheering"]
    sources = np.stack([load_audio(folder / f"{name}.flac", SR) for name in names])
    n = min(len(mixture), sources.shape[1])
    for index, name in enumerate(names):
        span = target_span(sources[:, :n], index, SR)
        report = separator.separate_files([(InputFile(folder / "mixture.flac", Path(name)), Query(spans=(span,)))], tmp_path)
        assert not report.failures and len(report.written) == 1
        estimate = torch.from_numpy(sf.read(report.written[0], dtype="float32")[0]).double()
        assert torch.equal(estimate.float(), separator.separate(folder / "mixture.flac", span=span))
        reference = torch.from_numpy(sources[index, :n]).double()
        improvement = float(si_sdr(estimate[:n], reference) - si_sdr(mixture[:n], reference))
        assert improvement > 1.0, (name, span, improvement)
