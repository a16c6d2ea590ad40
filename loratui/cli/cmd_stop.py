"""`loratui stop`: ask a running run (also a detached one) to checkpoint and stop, or end it at once."""

from __future__ import annotations

from pathlib import Path

import typer

from loratui.cli.common import EXIT_ERRORS, EXIT_OK, EXIT_UNUSABLE


def stop(
    run: str | None = typer.Argument(None, help="Run name or directory (default: the latest running run)."),
    now: bool = typer.Option(
        False, "--now", help="Stop at once, without a checkpoint (kills the run's processes)."
    ),
    timeout: float = typer.Option(
        300.0, "--timeout", min=0.0, help="Seconds to wait for the run to end (default 300)."
    ),
    runs_dir: Path | None = typer.Option(None, "--runs-dir", help="Where runs live (default ./runs)."),
) -> None:
    """Stop a running run from any shell: it saves a checkpoint, then stops (state `stopped`).

    Waits for the run to end. With --now the run's processes are killed at once and no checkpoint is
    written (resume later continues from the last one saved).

    \b
    Exit codes:
      0  the run stopped as asked (or finished meanwhile)
      1  it did not stop within --timeout, or it ended failed
      2  no such run, or it is not running
    """
    from loratui.cli.common import default_runs_dir
    from loratui.runs.stop import StopOutcome, find_run_to_stop, stop_run

    folder = runs_dir or default_runs_dir()
    found = find_run_to_stop(folder, run)
    if found is None:
        what = f"run {run!r}" if run else "a running run"
        typer.echo(f"error: could not find {what} in {folder} (see `loratui runs`)", err=True)
        raise typer.Exit(EXIT_UNUSABLE)
    if not now:
        typer.echo(f"asking {found.name} to save a checkpoint and stop (waiting up to {timeout:g} s)…")
    result = stop_run(found, now=now, timeout_s=timeout)
    if result.outcome is StopOutcome.NOT_RUNNING:
        typer.echo(f"error: {result.message}", err=True)
        raise typer.Exit(EXIT_UNUSABLE)
    if result.outcome is StopOutcome.NOT_STOPPED:
        typer.echo(f"error: {result.message}", err=True)
        raise typer.Exit(EXIT_ERRORS)
    typer.echo(result.message)
    raise typer.Exit(EXIT_OK)
