"""`loratui recommend`: memory-aware settings for a config on a real or hypothetical card."""

from __future__ import annotations

from pathlib import Path

import typer

from loratui.cli.common import not_implemented


def recommend(
    config: Path = typer.Option(..., "--config", "-c", help="The YAML training config to plan for."),
    gpu: int | None = typer.Option(None, "--gpu", help="Plan for the free memory of this GPU index (NVML)."),
    vram: str | None = typer.Option(
        None, "--vram", help="Plan for a hypothetical card with this much memory, e.g. 8GB or 24GiB."
    ),
    card: str | None = typer.Option(None, "--card", help='Plan for a known card by name, e.g. "RTX 4060".'),
    preset: str | None = typer.Option(None, "--preset", help="Apply this preset before planning."),
    json_out: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Recommend settings that fit a GPU's memory, keeping your effective batch.

    Searches rank, batch, accumulation, checkpointing, precision, optimizer, caching, resolution or
    sequence length and 4-bit loading.

    Each option shows its predicted peak memory, headroom and relative speed. No weights are loaded.
    """
    not_implemented("recommend")
