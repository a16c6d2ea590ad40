"""Small helpers shared by the command modules (no heavy imports)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import typer

EXIT_OK = 0
EXIT_ERRORS = 1
EXIT_UNUSABLE = 2


#: optional packages -> the extra of loratui that installs them
OPTIONAL_EXTRAS = {"bitsandbytes": "quant", "gguf": "gguf"}


def missing_extra_message(exc: ModuleNotFoundError) -> str | None:
    """'gguf is not installed: pip install "loratui[gguf]"' for an optional package, else None."""
    package = (exc.name or "").split(".")[0]
    extra = OPTIONAL_EXTRAS.get(package)
    if extra is None:
        return None
    return f'the optional package {package} is not installed: pip install "loratui[{extra}]"'


@contextmanager
def optional_dependencies(command: str) -> Iterator[None]:
    """A missing optional package exits 2 with the extra that installs it; any other import error is raised
    with its real message."""
    try:
        yield
    except ModuleNotFoundError as exc:
        message = missing_extra_message(exc)
        if message is None:
            raise
        typer.echo(f"error: loratui {command}: {message}", err=True)
        raise typer.Exit(EXIT_UNUSABLE) from None


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
