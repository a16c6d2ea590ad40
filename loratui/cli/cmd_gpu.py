"""`loratui gpu`: what NVML reports about the GPUs."""

from __future__ import annotations

import time

import typer


def gpu(
    json_out: bool = typer.Option(False, "--json", help="Print machine-readable JSON (bytes, watts, °C)."),
    watch: bool = typer.Option(False, "--watch", "-w", help="Refresh until Ctrl-C."),
    interval: float = typer.Option(1.0, "--interval", help="Seconds between refreshes with --watch."),
    count: int | None = typer.Option(None, "--count", help="With --watch: stop after this many refreshes."),
) -> None:
    """Show the GPUs: memory, utilization, temperature, power, driver and processes.

    Memory is used / free / reserved; processes are listed with their memory. Without an NVIDIA driver or
    GPU it prints one line and exits 0.
    """
    from loratui.cli.common import console
    from loratui.gpu.nvml import snapshot
    from loratui.gpu.render import gpu_table, no_gpu_line, snapshot_json

    out = console()

    def render_once() -> None:
        snap = snapshot()
        if json_out:
            typer.echo(snapshot_json(snap))
        elif not snap.available:
            typer.echo(no_gpu_line(snap))
        else:
            out.print(gpu_table(snap))

    if not watch:
        render_once()
        return
    shown = 0
    try:
        while count is None or shown < count:
            if shown and not json_out:
                out.clear()
            render_once()
            shown += 1
            if count is None or shown < count:
                time.sleep(max(0.1, interval))
    except KeyboardInterrupt:
        pass
