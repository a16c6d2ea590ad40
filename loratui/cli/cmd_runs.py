"""`loratui runs`: list run directories with state and progress."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer


def runs(
    runs_dir: Path | None = typer.Option(None, "--runs-dir", help="Where runs live (default ./runs)."),
    json_out: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """List runs, newest first, with state (running / finished / failed / stopped) and progress."""
    from rich.table import Table

    from loratui.cli.common import console, default_runs_dir
    from loratui.runs import list_runs

    folder = runs_dir or default_runs_dir()
    summaries = list_runs(folder)
    if json_out:
        rows = [
            {
                "name": s.run.name,
                "path": str(s.run.path),
                "state": s.state,
                "note": s.note,
                "step": s.step,
                "total_steps": s.total_steps,
                "started_at": s.started_at,
                "updated_at": s.updated_at,
            }
            for s in summaries
        ]
        typer.echo(json.dumps(rows, indent=2))
        return
    if not summaries:
        typer.echo(f"No runs in {folder}. Start one with `loratui train --config x.yaml`.")
        return
    table = Table(title=f"runs in {folder}", title_justify="left")
    for column in ("name", "state", "progress", "updated", "note"):
        table.add_column(column)
    now = time.time()
    for s in summaries:
        age = _age(now - s.updated_at) if s.updated_at else "-"
        table.add_row(s.run.name, s.state, s.progress, age, s.note)
    console().print(table)


def _age(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m ago"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h ago"
    return f"{seconds / 86400:.0f}d ago"
