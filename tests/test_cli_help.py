"""Every command's --help is readable on an 80-column terminal (issue 16, item 13)."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from marsctl.cli.main import app, reflow_help


def _command_paths(command, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    if hasattr(command, "commands"):  # a group (typer vendors its own click)
        for name, sub in command.commands.items():
            paths.extend(_command_paths(sub, prefix + (name,)))
    return paths


COMMANDS = _command_paths(typer.main.get_command(app))


def test_every_command_group_is_listed():
    names = {path[0] for path in COMMANDS if path}
    assert {"data", "align", "train", "eval", "separate", "hub"} <= names
    assert ("train", "rl") in COMMANDS and ("train", "sup") in COMMANDS


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "marsctl")
def test_help_fits_80_columns(path):
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    text = result.output
    assert all(len(line) <= 80 for line in text.splitlines()), max(text.splitlines(), key=len)
    assert "…" not in text, "help text cut with an ellipsis"
    assert "<bool>" not in text and "list[" not in text, "Python types shown in help"


def test_reflow_joins_wrapped_sentences_and_keeps_lists_and_examples():
    text = "First line.\n\nA sentence wrapped\nin the middle.\n\n- item one\n- item two\n\nExample: marsctl x\n  indented block"
    assert reflow_help(text) == (
        "First line.\n\nA sentence wrapped in the middle.\n\n- item one\n- item two\n\nExample: marsctl x\n  indented block"
    )
