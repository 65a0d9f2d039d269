"""`--decode best-of-N`: N sampled masks re-ranked by the query encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from marsctl.audio import save_audio
from marsctl.errors import ConfigError
from marsctl.models.separator import load_separator
from marsctl.separate.decode import best_of_n_separate, parse_best_of
from marsctl.separate import InputFile, Query, SeparateOptions, separate_jobs
from test_rl_worker import pretrain
from test_separator_fixtures import SR, LabelTestEncoder, make_tone_dataset, synth


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("separate-decode")
    return pretrain(make_tone_dataset(root / "data"), root / "sup", steps=20)


def _mixture(seconds=1.0, seed=0):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(0.5 * synth("low hum", seconds, rng) + 0.5 * synth("high whistle", seconds, rng))


def test_parse_best_of():
    assert parse_best_of("best-of-8") == 8 and parse_best_of("mode") is None and parse_best_of("best-of-x") is None
    with pytest.raises(ConfigError):
        parse_best_of("best-of-0")
    SeparateOptions(decode="best-of-4")
    with pytest.raises(ConfigError, match="best-of-N"):
        SeparateOptions(decode="best-of")


def test_best_of_n_keeps_the_highest_scoring_sample(model_dir):
    model = load_separator(model_dir).model
    encoder = LabelTestEncoder()
    mixture = _mixture()[None, :8191]  # [B=1, T]
    queries = encoder.embed_text(["low hum", "high whistle"])[None]  # [1, K=2, D]
    torch.manual_seed(3)
    chosen = best_of_n_separate(model, mixture, queries, 6, encoder)  # [1, 2, T]
    # the same draws by hand: every candidate, its score, and the argmax
    torch.manual_seed(3)
    stft, _, log_magnitude = model.analyze(mixture)
    masks = model.policy(model.logits(model.features(log_magnitude), queries)).sample(6)
    candidates = model.synthesize(masks, stft.unsqueeze(1), mixture.shape[-1])  # [6, 1, 2, T]
    scores = torch.stack([
        F.cosine_similarity(encoder.embed_audio(candidates[n].reshape(2, -1), SR), queries[0], dim=-1) for n in range(6)
    ])  # [6, K]
    assert scores.std(dim=0).min() > 0  # the samples really differ in score
    for k in range(2):
        best = int(scores[:, k].argmax())
        assert torch.allclose(chosen[0, k], candidates[best, 0, k], atol=1e-6)
        assert scores[best, k] >= scores[:, k].mean()
    one = best_of_n_separate(model, mixture, queries[:, 0], 2, encoder)  # [B, D] queries -> [B, T]
    assert one.shape == mixture.shape


def test_separate_files_with_best_of_n(model_dir, tmp_path):
    loaded = load_separator(model_dir)
    encoder = LabelTestEncoder()
    long_file = tmp_path / "in" / "long.wav"
    save_audio(long_file, _mixture(seconds=2.5).numpy(), SR)  # several chunks of the 8191-sample window
    options = SeparateOptions(out_dir=tmp_path / "out", decode="best-of-4", seed=1)
    report = separate_jobs(loaded, encoder, [(InputFile(long_file, long_file.with_suffix("").relative_to(tmp_path / "in")), Query(texts=("low hum",)))], options)
    assert not report.failures and len(report.written) == 1
    import soundfile as sf

    wave, sr = sf.read(report.written[0])
    assert sr == SR and len(wave) == int(2.5 * SR) and np.abs(wave).max() > 0
    # seeded: the same command writes the same file
    again = separate_jobs(loaded, encoder, [(InputFile(long_file, long_file.with_suffix("").relative_to(tmp_path / "in")), Query(texts=("low hum",)))],
                          SeparateOptions(out_dir=tmp_path / "out2", decode="best-of-4", seed=1))
    assert np.array_equal(sf.read(again.written[0])[0], wave)
