"""`loratui wizard`: the step-by-step terminal assistant."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer


def wizard(
    config: Path | None = typer.Option(
        None, "--config", "-c", help="Start from this YAML config; every step is pre-filled from it."
    ),
) -> None:
    """Step-by-step assistant: GPU, model, dataset, captions, settings that fit, review, train.

    Each step states what it found: hardware, task and base model, dataset checks, captioning,
    memory-aware settings, review, then training with live panels.

    Everything chosen becomes a config file you can save and rerun with `loratui train --config`.
    Keys: Ctrl+N / Ctrl+P next / previous step, F1 help, Ctrl+Q quit. Needs a terminal.
    """
    from loratui.cli.common import EXIT_UNUSABLE, fail

    if os.environ.get("TERM") == "dumb" or not sys.stdout.isatty() or not sys.stdin.isatty():
        fail(
            "the wizard needs an interactive terminal; use `loratui train --config x.yaml` instead",
            EXIT_UNUSABLE,
        )
    if config is not None:
        from loratui.config import ConfigError, load_config

        try:
            load_config(config)
        except ConfigError as exc:
            typer.echo(exc.render(), err=True)
            raise typer.Exit(EXIT_UNUSABLE) from None
        except OSError as exc:
            fail(f"cannot read config {config}: {exc}", EXIT_UNUSABLE)
    from loratui.tui.launch import run_wizard

    raise typer.Exit(run_wizard(config))
