"""The one progress module: rich displays on a terminal, plain lines in a log (issue 16, item 23)."""

from __future__ import annotations

import io

from rich.console import Console

from marsctl.progress import FileProgress, StepProgress, stage_progress, track


def _log_console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=False, width=100), buffer


def test_track_prints_about_every_ten_percent_when_not_a_terminal():
    console, buffer = _log_console()
    assert list(track(range(50), 50, "Scoring", console)) == list(range(50))
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 10 and lines[0].startswith("Scoring: 5/50 (10%)") and lines[-1].startswith("Scoring: 50/50 (100%)")


def test_stage_progress_quiet_prints_nothing():
    console, buffer = _log_console()
    with stage_progress("x", 10, console, show=False) as advance:
        advance(10)
    assert buffer.getvalue() == ""


def test_step_progress_resumes_from_a_step_and_shows_its_status():
    console, buffer = _log_console()
    with StepProgress("train sup", 100, completed=40, console=console) as bar:
        for step in range(41, 101):
            bar.update(step, "val SI-SDRi 3.1 dB" if step == 50 else None)
    lines = buffer.getvalue().splitlines()
    assert lines[0].startswith("train sup [val SI-SDRi 3.1 dB]: 50/100 (50%)")
    assert lines[-1].startswith("train sup [val SI-SDRi 3.1 dB]: 100/100 (100%)") and len(lines) == 6


def test_file_progress_logs_files_and_progress_within_a_long_file():
    console, buffer = _log_console()
    with FileProgress(2, console) as progress:
        for second in range(0, 3601, 60):
            progress.within("long.mp3", second, 3600)
        progress.file_done("long.mp3")
        progress.file_done("short.wav")
    lines = buffer.getvalue().splitlines()
    assert [line for line in lines if line.startswith("files:")] == ["files: 1/2", "files: 2/2"]
    within = [line for line in lines if line.startswith("long.mp3 (seconds)")]
    assert 9 <= len(within) <= 11 and within[-1].startswith("long.mp3 (seconds): 3600/3600 (100%)")


def test_the_seconds_line_of_a_file_ends_at_100_percent_once():
    """A 4.5 s file: its last block ends at 4.5 s, which is the whole file (was '4/5 (80%)')."""
    console, buffer = _log_console()
    with FileProgress(1, console) as progress:
        for done in (1.0, 2.0, 3.0, 4.0, 4.5):
            progress.within("short.wav", done, 4.5)
        progress.within("short.wav", 4.5, 4.5)  # read to the end: called again with the known length
        progress.file_done("short.wav")
    within = [line for line in buffer.getvalue().splitlines() if line.startswith("short.wav (seconds)")]
    assert within[-1].startswith("short.wav (seconds): 5/5 (100%)")
    assert sum("(100%)" in line for line in within) == 1
