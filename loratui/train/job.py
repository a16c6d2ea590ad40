"""What a trainer is handed: the run directory to write and the resolved config to train."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loratui.config import ResolvedConfig
from loratui.runs.rundir import RunDir


@dataclass
class WorkerJob:
    """Everything a trainer needs: where to write and what to train."""

    run: RunDir
    resolved: ResolvedConfig
    resume_from: Path | None
    overwrite: bool
    skip_checks: bool = False  # train despite dataset-check errors (bad items are skipped with warnings)
