"""Rich progress bars for the data stages (quiet when ``show`` is false, e.g. in library use)."""

from __future__ import annotations

import contextlib
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_console = Console(stderr=True)


@contextlib.contextmanager
def stage_progress(description: str, total: int, show: bool = True) -> Iterator["_Advance"]:
    """A progress bar for one stage; yields ``advance(n=1)``."""
    if not show:
        yield _Advance(None, None)
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=_console,
        transient=False,
    )
    with progress:
        task = progress.add_task(description, total=total)
        yield _Advance(progress, task)


class _Advance:
    def __init__(self, progress: Progress | None, task) -> None:
        self._progress = progress
        self._task = task

    def __call__(self, n: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)
