"""Small text helpers shared by the widgets (no Textual import)."""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["display_path", "fmt_duration", "fmt_number", "fmt_settings_change"]


def fmt_duration(seconds: float | None) -> str:
    """1:02:03 / 4:05; '-' when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-"
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def fmt_number(value: object, digits: int = 4) -> str:
    """A float with `digits` significant digits, or the value as text."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.2e}"
        return f"{value:.{digits}g}"
    return str(value)


def display_path(path: str | os.PathLike | None, base: Path | None = None) -> str:
    """A path as the user would type it: relative to the current folder when inside it, else with ~.

    Symlinks are not resolved, so a linked model folder shows under the name the user gave it.
    """
    if path is None or str(path) == "":
        return ""
    raw = os.path.expanduser(os.fspath(path))
    base_text = os.path.abspath(base or os.getcwd())
    absolute = os.path.abspath(os.path.join(base_text, raw))
    if absolute == base_text:
        return "."
    if absolute.startswith(base_text.rstrip(os.sep) + os.sep):
        return os.path.relpath(absolute, base_text)
    home = os.path.expanduser("~")
    if home not in ("", "/") and absolute.startswith(home + os.sep):
        return "~" + absolute[len(home) :]
    return absolute


SHORT_KEYS = {
    "batch_size": "batch",
    "gradient_accumulation_steps": "accum",
    "gradient_checkpointing": "checkpointing",
    "resolution": "res",
    "max_seq_len": "seq",
    "lora_rank": "rank",
    "base_weights_dtype": "base",
    "blocks_to_swap": "swap",
}


def fmt_settings_change(old: object, new: object, *, short: bool = False) -> str:
    """OOM ladder changes: {'batch_size': 4} -> {'batch_size': 2} becomes 'batch_size 4 → 2'."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = [k for k in new if old.get(k) != new.get(k)] or list(new)
        name = (lambda k: SHORT_KEYS.get(k, k)) if short else (lambda k: k)
        arrow = "→" if short else " → "
        parts = [f"{name(k)} {fmt_number(old.get(k, '-'))}{arrow}{fmt_number(new.get(k))}" for k in keys]
        return ", ".join(parts) if parts else "no change"
    return f"{old} → {new}"


def bar_text(taken: int, predicted: int, total: int, width: int = 12) -> str:
    """A plain-character VRAM bar for table cells: █ used by others, ▒ predicted, ░ free, ! over."""
    if total <= 0:
        return "?" * width
    used_cells = min(width, round(taken / total * width))
    end = (taken + predicted) / total * width
    pred_cells = max(1 if predicted > 0 else 0, min(width - used_cells, round(end) - used_cells))
    cells = "█" * used_cells + "▒" * pred_cells
    if taken + predicted > total:
        return cells[: width - 1] + "!"
    return cells + "░" * (width - len(cells))
