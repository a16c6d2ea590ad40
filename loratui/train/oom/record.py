"""What the OOM ladder leaves in the run directory.

- `config.yaml` is rewritten (atomically) with the settings really used after every change, so a restarted
  worker, a later `--resume` and the exported files' metadata all see the live settings;
- `oom.json` keeps the settings the run started with, the current ones, every recovery and every restart:

      {"original": {...}, "current": {...}, "cache_key": "...", "recoveries": [...], "restarts": [...]}
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from loratui.util.atomic import atomic_write_text

RECORD_FILE = "oom.json"
SOURCE = "oom recovery"


def record_path(run_path: Path) -> Path:
    return Path(run_path) / RECORD_FILE


def read_record(run_path: Path) -> dict[str, Any]:
    """The run's OOM record ({} when it has none or it is unreadable)."""
    try:
        data = json.loads(record_path(run_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_record(run_path: Path, record: dict[str, Any]) -> None:
    atomic_write_text(record_path(run_path), json.dumps(record, indent=1, default=str))


def apply_settings(resolved: Any, changes: dict[str, Any]) -> None:
    """Set `changes` on the live config (validated) and mark where they came from."""
    for key, value in changes.items():
        setattr(resolved.config, key, value)
        if isinstance(getattr(resolved, "sources", None), dict):
            resolved.sources[key] = SOURCE


def save_live_config(run: Any, resolved: Any) -> None:
    """Rewrite the run directory's config.yaml with the settings in use now (atomic replace)."""
    run.write_config(resolved.to_yaml())


def note_settings(run_path: Path, *, original: dict[str, Any], current: dict[str, Any], **extra: Any) -> dict:
    """Create or update `oom.json` (the first `original` written is kept) and return it."""
    record = read_record(run_path)
    record.setdefault("original", original)
    record["current"] = current
    for key, value in extra.items():
        if isinstance(value, list):
            record.setdefault(key, []).extend(value)
        else:
            record.setdefault(key, value)
    record["updated_at"] = time.time()
    write_record(run_path, record)
    return record
