"""What the OOM ladder leaves in the run directory: `oom.json` (format and file access in
`loratui.runs.oom_file`), written by this module only.

`config.yaml` keeps the config the run was started with; oom.json's `current` holds the settings in use
after every change, which `loratui.runs.config_file.read_run_config` lays over it, so a restarted worker and
a later `--resume` start from the live settings. oom.json also keeps the settings the run started with, every
recovery and every restart.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from loratui.config import ResolvedConfig
from loratui.runs.config_file import apply_changes
from loratui.runs.oom_file import OOM_SOURCE, OomRecord, read_oom, write_oom

SOURCE = OOM_SOURCE


def read_record(run_path: Path) -> dict[str, Any]:
    """The run's OOM record as its JSON object ({} when it has none or it is unreadable)."""
    record = read_oom(run_path)
    return record.to_json() if record is not None else {}


def apply_settings(resolved: ResolvedConfig, changes: dict[str, Any]) -> None:
    """Set `changes` on the live config (validated) and mark where they came from."""
    apply_changes(resolved, changes, SOURCE)


def note_settings(
    run_path: Path,
    *,
    original: dict[str, Any],
    current: dict[str, Any],
    started: dict[str, Any] | None = None,
    cache_key: str | None = None,
    from_cache: dict[str, Any] | None = None,
    recoveries: list[dict[str, Any]] | None = None,
    restarts_requested: list[dict[str, Any]] | None = None,
    restarts_lowered: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Create or update `oom.json` and return it as JSON: the first `original`, `started`, `cache_key` and
    `from_cache` written are kept, `current` is replaced, the lists grow."""
    record = read_oom(run_path) or OomRecord()
    record.original = record.original or dict(original)
    record.current = dict(current)
    record.started = record.started if record.started is not None else started
    record.cache_key = record.cache_key if record.cache_key is not None else cache_key
    record.from_cache = record.from_cache if record.from_cache is not None else from_cache
    record.recoveries.extend(recoveries or [])
    record.restarts_requested.extend(restarts_requested or [])
    record.restarts_lowered.extend(restarts_lowered or [])
    record.updated_at = time.time()
    write_oom(run_path, record)
    return record.to_json()
