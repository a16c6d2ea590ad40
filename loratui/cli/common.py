"""Small helpers shared by the command modules (no heavy imports)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn

import typer

EXIT_OK = 0
EXIT_ERRORS = 1
EXIT_UNUSABLE = 2


def not_implemented(command: str) -> NoReturn:
    """Exit 2 for a command whose capability has not landed yet (never a fake success)."""
    typer.echo(f"loratui {command}: not implemented yet", err=True)
    raise typer.Exit(EXIT_UNUSABLE)


def fail(message: str, code: int = EXIT_ERRORS) -> NoReturn:
    """Print an error message to stderr and exit with `code`."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def plain_output() -> bool:
    """True when output should be plain text: not a TTY, TERM=dumb, or NO_COLOR set."""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return True
    return not sys.stdout.isatty()


def console():
    """A rich Console that honours NO_COLOR / TERM=dumb / non-TTY output."""
    from rich.console import Console

    if plain_output():
        return Console(no_color=True, highlight=False, emoji=False, color_system=None, width=120)
    return Console()


def default_runs_dir() -> Path:
    """Where runs live unless configured: $LORATUI_RUNS_DIR or ./runs."""
    return Path(os.environ.get("LORATUI_RUNS_DIR", "runs"))
