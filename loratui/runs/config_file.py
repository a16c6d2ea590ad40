"""`config.yaml`: the resolved config a run was started with, written once when the run is prepared.

It stays what the user asked for (`loratui train --config runs/x/config.yaml` reruns it). The settings that
out-of-memory recovery lowered live in `oom.json` (`current`); `read_run_config` lays them over config.yaml,
so a restarted or resumed worker, the supervisor and the exported files see the settings really in use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loratui.config import ResolvedConfig, load_config
from loratui.runs.oom_file import OOM_SOURCE, read_oom
from loratui.util.atomic import atomic_write_text

CONFIG_FILE = "config.yaml"


def config_path(run_path: Path) -> Path:
    return Path(run_path) / CONFIG_FILE


def write_run_config(run_path: Path, resolved: ResolvedConfig) -> None:
    """Write the run's resolved `config.yaml` atomically."""
    atomic_write_text(config_path(run_path), resolved.to_yaml())


def live_changes(resolved: ResolvedConfig, run_path: Path) -> dict[str, Any]:
    """The settings out-of-memory recovery changed (oom.json `current`) that apply over `resolved`: a key
    whose value the user changed since the ladder started from it (a resume with new flags) keeps the user's."""
    record = read_oom(run_path)
    if record is None:
        return {}
    cfg = resolved.config
    changes = {}
    for key, value in record.current.items():
        if not hasattr(cfg, key) or getattr(cfg, key) == value:
            continue
        if key in record.original and getattr(cfg, key) != record.original[key]:
            continue
        changes[key] = value
    return changes


def apply_changes(resolved: ResolvedConfig, changes: dict[str, Any], source: str = OOM_SOURCE) -> None:
    """Set `changes` on the config (validated by the schema) and name where they came from."""
    for key, value in changes.items():
        setattr(resolved.config, key, value)
        resolved.sources[key] = source


def read_run_config(run_path: Path) -> ResolvedConfig:
    """config.yaml with the live settings of oom.json applied: what the worker trains with now."""
    resolved = load_config(config_path(run_path))
    apply_changes(resolved, live_changes(resolved, run_path))
    return resolved
