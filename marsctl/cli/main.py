"""The ``marsctl`` entry point: builds the Typer app from the command-group modules.

Each command group lives in its own module and is registered here. Errors meant for the
user (:class:`marsctl.errors.MarsctlError`) are printed as one line, without a traceback,
and exit with status 2.
"""

from __future__ import annotations

import sys
from typing import Optional

import typer
from rich.console import Console

from marsctl import __version__
from marsctl.cli import align as align_cli
from marsctl.cli import data as data_cli
from marsctl.cli import eval as eval_cli
from marsctl.cli import hub as hub_cli
from marsctl.cli import separate as separate_cli
from marsctl.cli import train as train_cli
from marsctl.errors import MarsctlError

app = typer.Typer(
    name="marsctl",
    help=(
        "MARS-Sep toolkit: query-conditioned sound separation.\n\n"
        "Build clean+ datasets, align the reward encoder, train a separator with supervision "
        "then reinforcement learning, evaluate it, and separate folders of audio with a text, "
        "audio or image query. Run 'marsctl COMMAND --help' for each command."
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

data_cli.register(app)
align_cli.register(app)
eval_cli.register(app)
hub_cli.register(app)
train_cli.register(app)
separate_cli.register(app)

err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        print(f"marsctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """MARS-Sep toolkit."""


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    try:
        app(args=argv, prog_name="marsctl", standalone_mode=True)
    except MarsctlError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
