"""The card to plan for, from `--gpu` / `--vram` / `--card` (shared by `recommend` and `train`)."""

from __future__ import annotations

import typer

from loratui.cli.common import EXIT_ERRORS, EXIT_UNUSABLE


def usable_memory_or_exit(
    *, gpu: int | None = None, vram: str | None = None, card: str | None = None, purpose: str = ""
):
    """`UsableMemory` for the options given, or NVML's GPU; a bad value exits 1, no readable GPU exits 2."""
    from loratui.memory.cards import UnknownCard
    from loratui.memory.integration import NoUsableMemory, usable_memory
    from loratui.util.sizes import SizeError

    try:
        return usable_memory(gpu=gpu, vram=vram, card=card)
    except (SizeError, UnknownCard, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_ERRORS) from None
    except NoUsableMemory as exc:
        typer.echo(f"error: {purpose + ': ' if purpose else ''}{exc}", err=True)
        raise typer.Exit(EXIT_UNUSABLE) from None
