"""`loratui wizard`: the step-by-step terminal assistant."""

from __future__ import annotations

from pathlib import Path

import typer

from loratui.cli.common import not_implemented


def wizard(
    config: Path | None = typer.Option(
        None, "--config", "-c", help="Start from this YAML config; every step is pre-filled from it."
    ),
) -> None:
    """Step-by-step assistant: GPU, model, dataset, captions, settings that fit, review, train.

    Each step states what it found: hardware, task and base model, dataset checks, captioning,
    memory-aware settings, review, then training with live panels.

    Everything chosen becomes a config file you can save and rerun with `loratui train --config`.
    """
    not_implemented("wizard")
