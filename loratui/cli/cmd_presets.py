"""`loratui presets list|show`."""

from __future__ import annotations

import typer

from loratui.cli.common import EXIT_ERRORS, console

app = typer.Typer(
    help="List and show the bundled VRAM-tier presets.", no_args_is_help=True, rich_markup_mode=None
)


@app.command("list")
def list_presets() -> None:
    """Table of presets: name, VRAM tier, families covered."""
    from rich.table import Table

    from loratui.config import ConfigError
    from loratui.config.presets import load_preset, preset_names

    table = Table(title="loratui presets (use with --preset NAME)", title_justify="left")
    for column in ("name", "VRAM tier", "families", "description"):
        table.add_column(column)
    try:
        for name in preset_names():
            preset = load_preset(name)
            table.add_row(name, preset.vram, ", ".join(preset.families), preset.description)
    except ConfigError as exc:
        typer.echo(exc.render(), err=True)
        raise typer.Exit(EXIT_ERRORS) from None
    console().print(table)


@app.command("show")
def show(
    name: str = typer.Argument(..., help="Preset name, e.g. low-vram or 24gb."),
    check: bool = typer.Option(
        False, "--check", help="Also predict peak memory per family (memory planner)."
    ),
) -> None:
    """Every setting of a preset, per model family."""
    import yaml

    from loratui.config import ConfigError
    from loratui.config.presets import load_preset

    try:
        preset = load_preset(name)
    except ConfigError as exc:
        typer.echo(exc.render(), err=True)
        raise typer.Exit(EXIT_ERRORS) from None
    out = console()
    out.print(f"[bold]{preset.name}[/bold] — {preset.vram}: {preset.description}")
    out.print(f"file: {preset.path}")
    for family, section in preset.families.items():
        out.print(f"\n[bold]{family}[/bold]")
        out.print(yaml.safe_dump(section, sort_keys=False).rstrip(), markup=False, highlight=False)
    for family, reason in preset.unsupported.items():
        out.print(f"\n[bold]{family}[/bold]: not supported on this tier", highlight=False)
        out.print(f"  {reason}", markup=False, highlight=False)
    if check:
        from loratui.memory.integration import preset_predictions
        from loratui.util.sizes import format_bytes

        out.print(
            f"\nmemory check on a {preset.vram_gb:g} GB card (predicted peak, usable memory, headroom):"
        )
        for row in preset_predictions(preset):
            mark = "fits" if row["fits"] else "DOES NOT FIT"
            out.print(
                f"  {row['family']:<8} {row['predicted_peak']:>10} (±{row['error_band']:.0%}) of "
                f"{format_bytes(row['usable_bytes'])}, headroom {format_bytes(row['headroom_bytes'], signed=True)}"
                f" [{row['architecture']}]: {mark}",
                markup=False,
                highlight=False,
            )
        for family, reason in preset.unsupported.items():
            out.print(f"  {family:<8} not supported: {reason}", markup=False, highlight=False)
