"""A small per-GPU cache of settings that fitted: (GPU, model, settings) hash -> working settings.

After an out-of-memory recovery the working settings are remembered, and the next run of the same model with
the same settings on the same GPU (or simulated card) starts from them instead of running out of memory
again. File: `$LORATUI_CACHE_DIR/oom_cache.json`, default `~/.cache/loratui/oom_cache.json`. Turned off by
the config key `oom_cache: false` (`loratui train --no-oom-cache`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from loratui.train.job import WorkerJob
from loratui.util.atomic import atomic_write_text

CACHE_FILE = "oom_cache.json"
MAX_ENTRIES = 200
# Settings that change memory use besides the ladder's own (which are part of the key too).
KEY_FIELDS = (
    "task_type",
    "base_model",
    "lora_rank",
    "target_modules",
    "train_text_encoder",
    "lora_dropout",
    "mixed_precision",
    "load_in_4bit",
    "packing",
    "bucket",
    "random_crop",
    "cache_latents_to_disk",
)


def cache_path() -> Path:
    root = os.environ.get("LORATUI_CACHE_DIR")
    folder = Path(root).expanduser() if root else Path.home() / ".cache" / "loratui"
    return folder / CACHE_FILE


def device_key(cfg: Any) -> str:
    """The card a run trains on: a simulated card, the CUDA device's name and size, or the CPU."""
    from loratui.memory.meter import simulated_budget_from_env_or_config

    budget = simulated_budget_from_env_or_config(cfg)
    if budget:
        return f"simulated:{budget}"
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            return f"cuda:{props.name}:{props.total_memory}"
    except Exception:
        pass
    return "cpu"


def _base_model(value: str) -> str:
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def cache_key(cfg: Any, kind: str, device: str | None = None) -> str:
    """A stable hash of the card, the model and every setting that matters for memory."""
    from loratui.train.oom.ladder import settings_of

    data = {key: getattr(cfg, key, None) for key in KEY_FIELDS}
    data["base_model"] = _base_model(str(cfg.base_model))
    data["effective_batch"] = cfg.effective_batch
    data.update(settings_of(cfg, kind))
    data["device"] = device or device_key(cfg)
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _read() -> dict[str, Any]:
    try:
        data = json.loads(cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def lookup(key: str) -> dict[str, Any] | None:
    """Working settings remembered under `key`, or None."""
    entry = _read().get(key)
    return (
        dict(entry["settings"])
        if isinstance(entry, dict) and isinstance(entry.get("settings"), dict)
        else None
    )


def remember(key: str, settings: dict[str, Any], *, model: str = "", device: str = "") -> None:
    """Store the settings that fitted (best effort: a read-only home must not stop training)."""
    data = _read()
    data[key] = {"settings": settings, "model": model, "device": device, "time": time.time()}
    if len(data) > MAX_ENTRIES:
        for old in sorted(data, key=lambda k: data[k].get("time", 0))[: len(data) - MAX_ENTRIES]:
            data.pop(old, None)
    with contextlib.suppress(OSError):
        atomic_write_text(cache_path(), json.dumps(data, indent=1, sort_keys=True, default=str))


def apply_cached_settings(job: WorkerJob) -> dict[str, Any] | None:
    """At the start of a fresh run: switch to the settings that fitted this config before (recorded in
    oom.json as the live settings). Returns the changes made (None when the cache is off, has nothing, this
    run already has an OOM record, or several processes train)."""
    from loratui.train.oom.ladder import kind_of, settings_of
    from loratui.train.oom.record import apply_settings, note_settings, read_record
    from loratui.train.process.distributed import world_size

    cfg = job.resolved.config
    if not cfg.oom_cache or not cfg.oom_recovery or world_size() > 1 or read_record(job.run.path):
        return None  # several processes: each would read the record while rank 0 writes it
    kind = kind_of(job.resolved.family)
    key = cache_key(cfg, kind)
    found = lookup(key)
    if not found:
        return None
    original = settings_of(cfg, kind)
    changes = {k: v for k, v in found.items() if k in original and original[k] != v}
    if not changes:
        return None
    apply_settings(job.resolved, changes)
    note_settings(
        job.run.path, original=original, current=settings_of(cfg, kind), cache_key=key, from_cache=changes
    )
    return changes
