"""`oom.json`: what out-of-memory recovery changed in a run, and the settings it trains with now.

    {"original": {...}, "current": {...}, "started": {...}, "cache_key": "...", "from_cache": {...},
     "recoveries": [...], "restarts_requested": [...], "restarts_lowered": [...], "updated_at": 0.0}

`original`: the ladder's settings before the first change; `current`: the settings in use now (a restarted or
resumed worker starts from them, see `loratui.runs.config_file.read_run_config`); `started`: the settings
the first worker started with. Written by `loratui.train.oom.record` only; this module reads and writes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratui.util.atomic import atomic_write_text

OOM_FILE = "oom.json"
OOM_SOURCE = "oom recovery"  # the source named for settings the ladder changed (`loratui train --dry-run`)
_LISTS = ("recoveries", "restarts_requested", "restarts_lowered")


@dataclass
class OomRecord:
    """What `oom.json` holds (keys not known here are kept in `other`)."""

    original: dict[str, Any] = field(default_factory=dict)
    current: dict[str, Any] = field(default_factory=dict)
    started: dict[str, Any] | None = None
    cache_key: str | None = None
    from_cache: dict[str, Any] | None = None
    recoveries: list[dict[str, Any]] = field(default_factory=list)
    restarts_requested: list[dict[str, Any]] = field(default_factory=list)
    restarts_lowered: list[dict[str, Any]] = field(default_factory=list)
    updated_at: float | None = None
    other: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSON object (fields never set are left out, as in files written before)."""
        data: dict[str, Any] = dict(self.other)
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if name != "other" and value not in (None, [], {}):
                data[name] = value
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> OomRecord:
        known = set(cls.__dataclass_fields__) - {"other"}
        record = cls(other={k: v for k, v in data.items() if k not in known})
        for name in known:
            value = data.get(name)
            if name in _LISTS:
                value = value if isinstance(value, list) else []
            elif name in ("original", "current"):
                value = value if isinstance(value, dict) else {}
            setattr(record, name, value)
        return record


def oom_path(run_path: Path) -> Path:
    return Path(run_path) / OOM_FILE


def read_oom(run_path: Path) -> OomRecord | None:
    """The run's record, or None when it has none (or it is unreadable)."""
    try:
        data = json.loads(oom_path(run_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return OomRecord.from_json(data) if isinstance(data, dict) else None


def write_oom(run_path: Path, record: OomRecord) -> None:
    """Replace `oom.json` atomically."""
    atomic_write_text(oom_path(run_path), json.dumps(record.to_json(), indent=1, default=str))
