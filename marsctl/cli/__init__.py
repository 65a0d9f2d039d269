"""Typer command-line interface. One module per command group; modules stay thin."""
