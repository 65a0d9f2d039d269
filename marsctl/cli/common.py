"""Helpers shared by the CLI modules: user-facing errors and consoles."""

from __future__ import annotations

import contextlib
from typing import Iterator

import typer
from rich.console import Console

from marsctl.errors import MarsctlError

console = Console()
err_console = Console(stderr=True)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a :class:`MarsctlError` into one red line on stderr and exit status 2."""
    try:
        yield
    except MarsctlError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
