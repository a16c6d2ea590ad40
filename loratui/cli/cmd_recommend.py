"""`loratui recommend`: memory-aware settings for a config on a real or hypothetical card."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from loratui.cli.common import EXIT_ERRORS


def recommend(
    config: Path = typer.Option(..., "--config", "-c", help="The YAML training config to plan for."),
    gpu: int | None = typer.Option(None, "--gpu", help="Plan for the free memory of this GPU index (NVML)."),
    vram: str | None = typer.Option(
        None, "--vram", help="Plan for a hypothetical card with this much memory, e.g. 8GB or 24GiB."
    ),
    card: str | None = typer.Option(None, "--card", help='Plan for a known card by name, e.g. "RTX 4060".'),
    preset: str | None = typer.Option(None, "--preset", help="Apply this preset before planning."),
    json_out: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
    gpus: int = typer.Option(1, "--gpus", min=1, help="Plan per GPU for training on this many GPUs."),
    fsdp: bool = typer.Option(
        False, "--fsdp", help="With --gpus: the model sharded over the GPUs (FSDP); figures are per GPU."
    ),
) -> None:
    """Recommend settings that fit a GPU's memory, keeping your effective batch.

    Searches rank, batch, accumulation, checkpointing, precision, optimizer, caching, resolution or
    sequence length and 4-bit loading.

    Each option shows its predicted peak memory, headroom and relative speed. No weights are loaded.
    """
    from loratui.cli.memory_args import usable_memory_or_exit
    from loratui.config import ConfigError, load_config
    from loratui.memory.cards import CARDS

    if card is not None and card.lower() == "list":
        for name, mib in CARDS.items():
            typer.echo(f"{name:<20} {mib / 1024:6.1f} GiB")
        return
    try:
        resolved = load_config(config, preset=preset)
    except ConfigError as exc:
        typer.echo(exc.render(), err=True)
        raise typer.Exit(EXIT_ERRORS) from None
    budget = usable_memory_or_exit(gpu=gpu, vram=vram, card=card)
    if fsdp:
        from dataclasses import replace

        resolved = replace(resolved, config=resolved.config.model_copy(update={"fsdp": True}))
    _run(resolved, budget, json_out, gpus)


def _run(resolved, budget, json_out: bool, processes: int = 1) -> None:
    from loratui.memory.recommend import explore, no_fit_message, rank_options

    options, planner = explore(resolved, budget.bytes, processes=processes)
    current = next(o for o in options if not o.changes)
    ranked = rank_options(options, 5)
    message = None if ranked else no_fit_message(resolved, budget.bytes, processes=processes)
    if json_out:
        payload = {
            "target": budget.label,
            "processes": processes,
            "fsdp": bool(resolved.config.fsdp),
            "per_gpu": processes > 1 or bool(resolved.config.fsdp),
            "usable_bytes": budget.bytes,
            "family": resolved.family,
            "architecture": planner.spec.source,
            "current": current.to_dict(),
            "options": [o.to_dict() for o in ranked],
            "message": message,
            "notes": current.estimate.notes,
        }
        typer.echo(json.dumps(payload, indent=2, ensure_ascii=False))
    else:
        _print(resolved, budget, current, ranked, message, processes)
    if message:
        raise typer.Exit(EXIT_ERRORS)


def _print(resolved, budget, current, ranked, message, processes: int = 1) -> None:
    from rich.markup import escape
    from rich.table import Table

    from loratui.cli.common import console
    from loratui.util.sizes import format_bytes

    out = console()
    est = current.estimate
    verdict = "fits" if current.fits else "does not fit"
    spread = " per GPU" if processes > 1 or resolved.config.fsdp else ""
    if resolved.config.fsdp:
        spread += f" (FSDP over {processes})"
    out.print(
        f"{resolved.family}: your config needs about {format_bytes(est.total_bytes)}{spread} "
        f"(±{est.error_band:.0%}), "
        f"{verdict} in {format_bytes(budget.bytes)} usable on {escape(budget.label)}",
        highlight=False,
    )
    for note in est.notes:
        out.print(f"note: {escape(note)}", highlight=False)
    if message:
        out.print(f"[red]{escape(message)}[/red]", highlight=False)
        return
    table = Table(title="options that fit (best first)", title_justify="left")
    for column in ("#", "changes", "peak", "headroom", "speed", "effect"):
        table.add_column(column)
    for number, option in enumerate(ranked, 1):
        changes = ", ".join(f"{k}={v}" for k, v in option.changes.items()) or "(none)"
        table.add_row(
            str(number),
            escape(changes),
            format_bytes(option.estimate.total_bytes),
            format_bytes(option.headroom_bytes, signed=True),
            f"{option.relative_speed:.2f}x",
            escape(option.quality_note),
        )
    out.print(table)
    out.print(
        "apply one with --set KEY=VALUE, or train with --preset auto to take the first.", highlight=False
    )
