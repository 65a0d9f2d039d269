"""Errors that marsctl reports to users as one clear line."""

from __future__ import annotations

from pathlib import Path


class MarsctlError(Exception):
    """An error whose message is meant for the user, printed as one line without a traceback."""


class AudioError(MarsctlError):
    """A file could not be used as audio. The message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ConfigError(MarsctlError):
    """A configuration or recipe value is missing or invalid."""
