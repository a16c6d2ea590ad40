"""Tell whether an export source (run, checkpoint, LoRA file, adapter folder) is image or text."""

from __future__ import annotations

from pathlib import Path

import yaml


def _task_from_config(path: Path) -> str | None:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return None
    task = data.get("task_type") if isinstance(data, dict) else None
    return str(task) if task else None


def source_task(source: Path) -> str | None:
    """'image-generation', 'text-generation' or None when `source` is not something exportable."""
    source = Path(source)
    if source.is_dir():
        for candidate in (source / "config.yaml", source.parent.parent / "config.yaml"):
            if candidate.is_file():
                task = _task_from_config(candidate)
                if task:
                    return task
        if (source / "adapter_config.json").is_file():
            return "text-generation"
        return None
    if source.suffix == ".safetensors" and source.is_file():
        from loratui.config.base_model import classify_state_keys, read_safetensors_header

        try:
            keys = [k for k in read_safetensors_header(source) if k != "__metadata__"]
        except (OSError, ValueError):
            return None
        kind, _ = classify_state_keys(keys)
        if kind == "lora":
            return (
                "text-generation" if any("base_model.model.model." in k for k in keys) else "image-generation"
            )
    return None
