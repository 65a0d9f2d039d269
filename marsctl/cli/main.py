"""The ``marsctl`` entry point: builds the Typer app from the command-group modules.

Each command group lives in its own module and is registered here. Errors meant for the
user (:class:`marsctl.errors.MarsctlError`) are printed as one line, without a traceback,
and exit with status 2.
"""

from __future__ import annotations

import inspect
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


def _show_no_type_for_flags() -> None:
    """Typer 0.29 prints a type column for every option, ``<bool>`` for on/off flags and
    ``<str>`` for plain text: noise that pushes the help text off an 80-column terminal.
    Flags and plain-text parameters show no type (an explicit ``metavar`` still shows)."""
    from typer.core import TyperArgument, TyperOption

    for cls in (TyperOption, TyperArgument):
        original = cls.display_type_rich

        def display_type_rich(self, ctx, _original=original):
            plain_text = self.display_type(ctx) == "<str>" and (self.metavar is None or isinstance(self, TyperArgument))
            if getattr(self, "is_flag", False) or plain_text:
                return None
            return _original(self, ctx)

        cls.display_type_rich = display_type_rich


_show_no_type_for_flags()


def reflow_help(text: str | None) -> str | None:
    """Help text with each paragraph's hard line breaks joined, so the terminal wraps it.

    Docstrings are wrapped at ~100 columns in the source; typer keeps single line breaks
    after the first paragraph, which breaks sentences in the middle at 80 columns. Lines that
    start a list item (``-``, ``*``, ``•``), are indented (examples, tables) or start with
    ``Example`` keep their own line.
    """
    if not text:
        return text
    paragraphs = []
    for paragraph in inspect.cleandoc(text).split("\n\n"):
        lines: list[str] = []
        for line in paragraph.split("\n"):
            keep = not lines or line.startswith((" ", "\t", "-", "*", "•", "\b", "Example")) or lines[-1].endswith(":")
            if keep:
                lines.append(line)
            else:
                lines[-1] = f"{lines[-1].rstrip()} {line.strip()}"
        paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs)


def _reflow_command_help(typer_app: typer.Typer) -> None:
    """Reflow the help of every command and group under ``typer_app`` (see :func:`reflow_help`)."""
    for command in typer_app.registered_commands:
        if command.help is None and command.callback is not None:
            command.help = reflow_help(inspect.getdoc(command.callback))
        else:
            command.help = reflow_help(command.help)
    for group in typer_app.registered_groups:
        group.typer_instance.info.help = reflow_help(group.typer_instance.info.help)
        _reflow_command_help(group.typer_instance)


_reflow_command_help(app)

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
