"""`loratui attach`: re-open the training view of a running or finished run."""

from __future__ import annotations

from pathlib import Path

import typer

from loratui.cli.common import not_implemented


def attach(
    run: str | None = typer.Argument(None, help="Run name or directory (default: the latest run)."),
    runs_dir: Path | None = typer.Option(None, "--runs-dir", help="Where runs live (default ./runs)."),
    no_tui: bool = typer.Option(False, "--no-tui", help="Plain progress lines instead of the full view."),
) -> None:
    """Attach to a run: replay its history, then follow it live (`d` detaches again)."""
    not_implemented("attach")
