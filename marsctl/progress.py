"""Progress of long stages, on stderr: a rich bar with a count on a terminal, plain lines otherwise.

When stderr is not a terminal (a log file, CI), a line ``description: k/total (p%)`` is
printed about every 10 % of the total (every ``PLAIN_EVERY`` items when the total is
unknown) and at the end, so a redirected run shows that it is alive.

    for item in track(items, len(items), "Scoring mixtures"): ...
    with stage_progress("Separating mixtures", total=100) as advance:
        ...; advance()
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")
#: plain-line cadence when the total is unknown
PLAIN_EVERY = 10


class _PlainLines:
    """Counts items and prints a line at every ~10 % step (or every ``PLAIN_EVERY`` items)."""

    def __init__(self, console: Console, description: str, total: int | None):
        self.console, self.description, self.total = console, description, total
        self.done, self.start = 0, time.monotonic()
        self.step = max(1, math.ceil(total / 10)) if total else PLAIN_EVERY
        self.last_printed = 0

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.done - self.last_printed >= self.step or (self.total and self.done >= self.total):
            self.print()

    def print(self) -> None:
        self.last_printed = self.done
        elapsed = time.monotonic() - self.start
        count = f"{self.done}/{self.total} ({100 * self.done // self.total}%)" if self.total else f"{self.done}"
        self.console.print(f"{self.description}: {count}, {elapsed:.0f} s", highlight=False, markup=False, soft_wrap=True)

    def finish(self) -> None:
        if self.done != self.last_printed:
            self.print()


@contextlib.contextmanager
def stage_progress(
    description: str, total: int | None = None, console: Console | None = None, *, show: bool = True
) -> Iterator[Callable[..., None]]:
    """A progress display for a stage of ``total`` items; yields ``advance(n=1)``.

    ``show=False`` displays nothing (library use, ``--quiet``); ``advance`` still works.
    """
    if not show:
        yield lambda n=1: None
        return
    console = console or Console(stderr=True)
    if not console.is_terminal:
        plain = _PlainLines(console, description, total)
        yield plain.advance
        plain.finish()
        return
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)


def track(
    iterable: Iterable[T], total: int | None, description: str, console: Console | None = None, *, show: bool = True
) -> Iterator[T]:
    """Iterate with :func:`stage_progress` advanced once per item."""
    with stage_progress(description, total, console, show=show) as advance:
        for item in iterable:
            yield item
            advance()


class StepProgress:
    """A training-style display: ``title ━━━━ step/total elapsed remaining status``, moved to a step
    (``update(step, status)``) rather than advanced; plain lines about every 10 % when stderr is
    not a terminal. ``stop()`` ends it (also as a context manager)."""

    def __init__(self, title: str, total: int, completed: int = 0, console: Console | None = None, *, show: bool = True):
        console = console or Console(stderr=True)
        self._rich: Progress | None = None
        self._plain: _PlainLines | None = None
        if not show:
            return
        if console.is_terminal:
            self._rich = Progress(
                TextColumn(f"[bold]{title}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"), console=console,
            )
            self._rich.start()
            self._task = self._rich.add_task(title, total=total, completed=completed, status="")
        else:
            self._plain = _PlainLines(console, title, total)
            self._plain.done = self._plain.last_printed = completed
        self.status_text = ""

    def update(self, completed: int, status: str | None = None) -> None:
        if status is not None:
            self.status_text = status
        if self._rich is not None:
            self._rich.update(self._task, completed=completed, status=self.status_text)
        elif self._plain is not None:
            self._plain.description = self._plain.description.split(" [")[0] + (f" [{self.status_text}]" if self.status_text else "")
            self._plain.advance(completed - self._plain.done)

    def stop(self) -> None:
        if self._rich is not None:
            self._rich.stop()
        elif self._plain is not None:
            self._plain.finish()

    def __enter__(self) -> "StepProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class FileProgress:
    """Two displays for batch jobs over files: files done, and seconds done within the current
    (possibly hours-long) file. On a terminal two rich bars; otherwise a plain line per finished file
    and about every 10 % of a long file. Use as a context manager; call :meth:`within` while a
    file is processed and :meth:`file_done` after it."""

    def __init__(self, total_files: int, console: Console | None = None, *, show: bool = True):
        self.console = console or Console(stderr=True)
        self.total_files, self.files_done = total_files, 0
        self.show, self._rich, self._within_plain = show, None, None
        if show and self.console.is_terminal:
            self._rich = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[name]}"),
                TimeElapsedColumn(), console=self.console,
            )
            self._files = self._rich.add_task("files", total=total_files, name="")
            self._seconds = self._rich.add_task("seconds", total=None, name="", visible=False)

    def __enter__(self) -> "FileProgress":
        if self._rich is not None:
            self._rich.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._rich is not None:
            self._rich.stop()

    def within(self, name: str, done_seconds: float, total_seconds: float) -> None:
        total = max(math.ceil(total_seconds), 1)
        # the end of the file (done = total) counts its last, partial second: the line ends at 100 %
        done = total if done_seconds >= total_seconds else int(done_seconds)
        if self._rich is not None:
            self._rich.update(self._seconds, completed=done, total=total, name=name, visible=True)
        elif self.show:
            if self._within_plain is None or self._within_plain.description != f"{name} (seconds)":
                self._within_plain = _PlainLines(self.console, f"{name} (seconds)", total)
            if done > self._within_plain.done:
                self._within_plain.advance(done - self._within_plain.done)

    def file_done(self, name: str) -> None:
        self.files_done += 1
        if self._rich is not None:
            self._rich.update(self._files, advance=1, name=name)
            self._rich.update(self._seconds, visible=False, completed=0)
        elif self.show:
            self._within_plain = None
            self.console.print(f"files: {self.files_done}/{self.total_files}", highlight=False, markup=False, soft_wrap=True)
