"""Live separation (issue 30): ``Separator.stream`` / ``marsctl separate --stream``.

The streams equal the offline overlap-add when the latency covers the window; the cut of the
input into blocks changes nothing; the first estimate of a hop hears nothing after its latency and
the refined one does; live inputs (standard input, a growing file, a paced file) give the file's
samples; a stream cut mid-way, even by SIGKILL, leaves valid files holding a prefix of the result.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import soundfile as sf
import torch
import typer
from typer.testing import CliRunner

from marsctl.audio import load_audio
from marsctl.audio.stream import open_live_stream
from marsctl.cli import separate as separate_cli
from marsctl.errors import ConfigError
from marsctl.separate import Query, Separator, apply_separator
from marsctl.separate.stream import LiveSeparation, StreamSettings
from marsctl.separate.stream_io import LiveWav, stream_to_files

SR = 16_000
HOP = 0.5  # seconds; a 2 s window is 4 hops (fewer separator passes than the default 0.25 s hop)


def _music(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    wave = 0.3 * np.sin(2 * np.pi * 440 * t) * (1 + np.sin(2 * np.pi * 0.7 * t)) / 2 + 0.2 * np.sign(np.sin(2 * np.pi * 196 * t))
    return (wave + 0.05 * rng.standard_normal(len(t))).astype(np.float32)


@pytest.fixture(scope="module")
def separator():
    return Separator.from_pretrained("default", device="cpu")


def _offline(separator, wave: torch.Tensor, window: int, hop: int, batch_size: int = 1) -> torch.Tensor:
    """The offline overlap-add the stream's windows belong to (the mixture as it is, no level gain)."""
    vector = separator.embed(Query(texts=("violin",)))[None]
    blocks = apply_separator(separator.loaded.model, wave, vector, chunk_samples=window, overlap=1 - hop / window, batch_size=batch_size)
    return torch.cat(list(blocks), dim=-1)[0]


def _run(live, wave: torch.Tensor, sizes) -> tuple[torch.Tensor, torch.Tensor]:
    current, refined, at = [], [], 0
    for size in sizes:
        if at >= wave.shape[0]:
            break
        c, r = live.push(wave[at : at + size])
        current.append(c)
        refined.append(r)
        at += size
    c, r = live.finish()
    return torch.cat(current + [c]), torch.cat(refined + [r])


def _random_sizes(seed: int, high: int):
    rng = np.random.default_rng(seed)
    while True:
        yield int(rng.integers(1, high))


def test_latency_covering_the_window_gives_the_offline_result(separator):
    wave = torch.from_numpy(_music(3.3))
    live = separator.stream(query="violin", latency=2.0, hop=HOP)
    s = live.settings
    assert (s.window, s.hop, s.latency, s.refine_hops) == (32_000, 8_000, 32_000, 0)
    current, refined = _run(live, wave, _random_sizes(0, 9_000))
    offline = _offline(separator, wave, s.window, s.hop)
    assert current.shape == refined.shape == wave.shape
    assert torch.equal(current, offline) and torch.equal(refined, offline)
    # the offline path's default batching differs from one window at a time only by float rounding
    torch.testing.assert_close(current, _offline(separator, wave, s.window, s.hop, batch_size=8), atol=1e-5, rtol=0)
    # at a short latency the refined stream, once final (the default), is still the offline result
    short = separator.stream(query="violin", latency=HOP, hop=HOP)
    current_short, refined_short = _run(short, wave, _random_sizes(1, 5_000))
    assert short.settings.refine_hops == 3 and torch.equal(refined_short, offline)
    assert not torch.equal(current_short, offline)  # the first estimate did not hear what came after


def test_block_sizes_do_not_change_either_stream(separator):
    wave = torch.from_numpy(_music(2.9, seed=1))
    results = []
    for sizes in ([wave.shape[0]], _random_sizes(2, 3_000), iter(lambda: 8_000, None), _random_sizes(3, 20_000)):
        live = separator.stream(query="violin", latency=1.0, hop=HOP, refine_hops=1)
        results.append(_run(live, wave, sizes))
    for current, refined in results[1:]:
        assert torch.equal(current, results[0][0]) and torch.equal(refined, results[0][1])
    assert results[0][0].shape == wave.shape and not torch.equal(results[0][0], results[0][1])


def _window_mixing(windows: torch.Tensor) -> torch.Tensor:
    """A stand-in separator whose every output sample depends on the whole window (cheap)."""
    return (windows * torch.sigmoid(windows.mean(-1, keepdim=True)))[:, None]


def test_the_first_estimate_hears_nothing_after_its_latency():
    settings = StreamSettings(hop=100, window=400, latency=200, refine_hops=2)
    signal_ = torch.randn(2_050, generator=torch.Generator().manual_seed(0))
    changed = signal_.clone()
    cut = 1_200
    changed[cut:] += 1.0  # a change from sample 1200 on

    def streams(wave):
        live = LiveSeparation(_window_mixing, settings, outputs=1, sample_rate=1_000)
        pushed = [live.push(wave[i : i + 37]) for i in range(0, wave.shape[0], 37)]
        emitted_by_push = [(c.shape[-1], r.shape[-1]) for c, r in pushed]
        tail = live.finish()
        return [torch.cat([p[k] for p in pushed] + [tail[k]], dim=-1)[0] for k in range(2)], emitted_by_push

    (current, refined), counts = streams(signal_)
    (current2, refined2), _ = streams(changed)
    # hop [a, a + hop) is emitted at boundary a + latency from the windows that end by then, so the
    # hops that start up to 1200 - latency were written before sample 1200 arrived
    heard = cut - settings.latency + settings.hop
    assert torch.equal(current[:heard], current2[:heard])
    assert not torch.equal(current[heard : heard + settings.hop], current2[heard : heard + settings.hop])
    refined_heard = cut - settings.refined_delay + settings.hop
    assert torch.equal(refined[:refined_heard], refined2[:refined_heard])
    # where the first estimates agree, the refined ones have heard the change
    assert not torch.equal(refined[refined_heard:heard], refined2[refined_heard:heard])
    # and no sample is written before its latency: after n samples, exactly the hops due are out
    total = 0
    for n, (c, r) in enumerate(counts, start=1):
        total += c
        due = max(0, (min(n * 37, signal_.shape[0]) // settings.hop) * settings.hop - settings.latency + settings.hop)
        assert total == due


def test_stream_settings_are_checked(separator):
    with pytest.raises(ConfigError, match="--latency 0.3: must be a whole number"):
        separator.stream(query="violin", latency=0.3, hop=0.25)
    with pytest.raises(ConfigError, match="--latency 0.1"):
        separator.stream(query="violin", latency=0.1, hop=0.25)
    sampled = Separator(separator.loaded, separator.encoder, decode="sample")
    with pytest.raises(ConfigError, match="a stream uses mode or mean"):
        sampled.stream(query="violin")


@pytest.mark.parametrize("header", ["length 0 until closed", "length kept up to date"])
def test_a_growing_file_is_read_as_it_is_written(tmp_path, header):
    path = tmp_path / "recording.wav"
    wave = _music(1.5, seed=4)
    if header == "length 0 until closed":  # libsndfile's default, as most recorders
        writer = sf.SoundFile(str(path), "w", SR, 1, subtype="FLOAT", format="WAV")
    else:  # a live output of marsctl separate --stream: the length read first is not the end
        writer = LiveWav(path, SR).handle
    writer.write(wave[:4_000])
    writer.flush()

    def record():
        for start in range(4_000, wave.shape[0], 4_000):
            time.sleep(0.05)
            writer.write(wave[start : start + 4_000])
            writer.flush()

    recorder = threading.Thread(target=record)
    recorder.start()
    blocks = list(open_live_stream(path, SR, follow=True, idle_seconds=0.5))
    recorder.join()
    writer.close()
    assert len(blocks) > 3
    np.testing.assert_array_equal(torch.cat(blocks).numpy(), wave)


def test_a_paced_file_gives_the_file(tmp_path):
    path = tmp_path / "x.wav"
    sf.write(path, _music(0.6, seed=5), SR, subtype="FLOAT")
    started = time.monotonic()
    blocks = list(open_live_stream(path, SR, realtime=True))
    assert time.monotonic() - started >= 0.5  # delivered at the pace it plays, never faster
    np.testing.assert_array_equal(torch.cat(blocks).numpy(), load_audio(path, SR))


def test_a_stop_request_finishes_what_was_received(separator, tmp_path):
    wave = torch.from_numpy(_music(4.0, seed=6))
    live = separator.stream(query="violin", latency=HOP, hop=HOP, refine_hops=1)
    stop = threading.Event()

    def blocks():  # a live source: 2 s arrive, then it stalls until the stop request (Ctrl-C, SIGTERM)
        yield from (wave[i : i + 4_000] for i in range(0, 2 * SR, 4_000))
        stop.wait()

    current, refined = tmp_path / "violin.wav", tmp_path / "violin.refined.wav"
    report = stream_to_files(live, blocks(), current, refined, stop=stop,
                             on_hop=lambda r: stop.set() if r.seconds >= 1.0 else None)
    assert report.stopped and report.error is None
    written, _ = sf.read(current, dtype="float32")
    refined_written, _ = sf.read(refined, dtype="float32")
    received = written.shape[0]
    assert received == 2 * SR and refined_written.shape[0] == received
    # the files hold the stream of the samples received, finished
    expected = _run(separator.stream(query="violin", latency=HOP, hop=HOP, refine_hops=1), wave[:received], [received])
    np.testing.assert_array_equal(written, expected[0].numpy())
    np.testing.assert_array_equal(refined_written, expected[1].numpy())


def _wav_bytes(wave: np.ndarray, path) -> bytes:
    sf.write(path, wave, SR, subtype="FLOAT")
    return path.read_bytes()


def test_a_killed_stream_leaves_valid_files_with_a_prefix_of_the_result(separator, tmp_path):
    wave = _music(6.0, seed=7)
    data = _wav_bytes(wave, tmp_path / "source.wav")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "marsctl", "separate", "--stream", "-", "-q", "violin", "-o", str(out),
               "--latency", "0.5", "--hop", str(HOP), "--refine-hops", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    current, refined = out / "stdin" / "violin.wav", out / "stdin" / "violin.refined.wav"
    try:
        process.stdin.write(data[: len(data) // 2])  # 3 s, then the producer stalls
        process.stdin.flush()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (refined.exists() and sf.info(str(refined)).frames >= SR):
            assert process.poll() is None, process.stderr.read().decode()
            time.sleep(0.2)
        process.send_signal(signal.SIGKILL)  # no chance to finish or close anything
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
        process.stdin.close()
    written, rate = sf.read(current, dtype="float32")
    refined_written, _ = sf.read(refined, dtype="float32")
    hop = int(HOP * SR)
    assert rate == SR and written.shape[0] % hop == 0 and refined_written.shape[0] % hop == 0
    assert SR <= refined_written.shape[0] <= written.shape[0] <= wave.shape[0] // 2
    whole = _run(separator.stream(query="violin", latency=0.5, hop=HOP, refine_hops=1), torch.from_numpy(wave), [hop] * 20)
    np.testing.assert_array_equal(written, whole[0][: written.shape[0]].numpy())
    np.testing.assert_array_equal(refined_written, whole[1][: refined_written.shape[0]].numpy())


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """test app"""

    separate_cli.register(app)
    return app


def test_cli_streams_stdin_to_two_files_and_refuses_bad_settings(tmp_path):
    wave = _music(2.2, seed=8)
    data = _wav_bytes(wave, tmp_path / "in.wav")
    out = tmp_path / "out"
    args = ["separate", "--stream", "-", "-q", "violin", "-o", str(out), "--hop", str(HOP)]
    result = CliRunner().invoke(_app(), args, input=data)
    assert result.exit_code == 0, result.output
    assert "wrote 2.20 s" in result.output
    for name in ("violin.wav", "violin.refined.wav"):
        assert sf.info(str(out / "stdin" / name)).frames == wave.shape[0]
    again = CliRunner().invoke(_app(), args, input=data)
    assert again.exit_code == 2 and "exists; use --overwrite" in again.output
    for extra, message in ((["--decode", "best-of-4"], "a stream uses mode or mean"),
                           (["--span", "0:1"], "--span cannot be used with --stream")):
        bad = CliRunner().invoke(_app(), [*args, "--overwrite", *extra], input=data)
        assert bad.exit_code == 2 and message in bad.output, bad.output
    two = CliRunner().invoke(_app(), ["separate", "--stream", "a.wav", "b.wav", "-q", "violin", "-o", str(out)])
    assert two.exit_code == 2 and "--stream takes one input" in two.output
    not_audio = CliRunner().invoke(_app(), [*args, "--overwrite"], input=b"this is not audio at all" * 10)
    assert not_audio.exit_code == 2 and "stdin: not a readable audio stream" in not_audio.output
