"""`loratui attach`: re-open the progress of a running or finished run."""

from __future__ import annotations

from pathlib import Path

import typer


def attach(
    run: str | None = typer.Argument(None, help="Run name or directory (default: the latest run)."),
    runs_dir: Path | None = typer.Option(None, "--runs-dir", help="Where runs live (default ./runs)."),
    no_tui: bool = typer.Option(False, "--no-tui", help="Plain progress lines instead of the full view."),
    no_follow: bool = typer.Option(False, "--no-follow", help="Print the history and return."),
) -> None:
    """Attach to a run: replay its history, then follow it live (Ctrl-C detaches; training goes on).

    On a terminal this opens the training view (d detaches, s checkpoints, c stops, ? help). With
    --no-tui, on a non-TTY or with TERM=dumb, progress is printed as plain lines.
    """
    from loratui.cli.common import EXIT_UNUSABLE, console, default_runs_dir
    from loratui.runs import find_run
    from loratui.runs.events import EventReader
    from loratui.runs.follow import FINAL_EVENTS, format_event
    from loratui.runs.status import effective_state

    folder = runs_dir or default_runs_dir()
    found = find_run(folder, run)
    if found is None:
        what = f"run {run!r}" if run else "any run"
        typer.echo(f"error: could not find {what} in {folder} (see `loratui runs`)", err=True)
        raise typer.Exit(EXIT_UNUSABLE)
    from loratui.cli.common import plain_output

    if not no_tui and not no_follow and not plain_output():
        from loratui.tui.launch import open_training_view

        raise typer.Exit(open_training_view(found.path))
    out = console()
    out.print(f"attached to {found.path}", markup=False)
    reader = EventReader(found.events_path)

    def show(events: list[dict]) -> bool:
        ended = False
        for event in events:
            line = format_event(event)
            if line:
                out.print(line, markup=False, highlight=False)
            ended = ended or event.get("type") in FINAL_EVENTS
        return ended

    if show(reader.poll()) or no_follow:
        return
    import time

    try:
        while True:
            if show(reader.poll()):
                return
            state, note = effective_state(found.status())
            if state not in ("running", "starting"):
                show(reader.poll())
                out.print(f"run is {state}{': ' + note if note else ''}", markup=False)
                return
            time.sleep(0.3)
    except KeyboardInterrupt:
        out.print(f"detached; training continues. Re-attach with: loratui attach {found.name}", markup=False)
