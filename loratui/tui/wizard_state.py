"""What the wizard has chosen so far, and the config it resolves to (no Textual).

Values chosen in the wizard form the top layer over an optional starting config file, through the same
`load_config` that `loratui train` uses, so the saved file trains exactly what the review showed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loratui.config import ConfigError, ResolvedConfig, TrainConfig, check_paths, load_config
from loratui.tui.flux_choices import FLUX_FAMILIES, PART_KEYS, missing_part_problems

WIZARD_SOURCE = "wizard"
STEP_NAMES = ("GPU", "Model", "Data", "Captions", "Settings", "Review", "Train")


@dataclass
class GpuChoice:
    """The GPU the run is planned for (None index: CPU only, or a hypothetical card)."""

    index: int | None
    name: str
    total_bytes: int | None
    usable_bytes: int | None  # free memory when chosen, or the card size for a hypothetical card


@dataclass
class WizardState:
    """Choices made so far. `resolve()` turns them into a validated `ResolvedConfig`."""

    config_path: Path | None = None
    values: dict[str, Any] = field(default_factory=dict)
    preset: str | None = None
    gpu: GpuChoice | None = None
    model_kind: str | None = None  # ModelInfo.kind of the chosen base model
    dataset_errors: int | None = None  # errors in the last dataset check (None: not checked)
    saved_path: Path | None = None
    predicted_bytes: int | None = None  # the memory planner's last prediction for these settings
    unsaved_changes: bool = True
    _cache: ResolvedConfig | None = field(default=None, repr=False)
    _problems: list[str] = field(default_factory=list, repr=False)

    # --- values ------------------------------------------------------------------------------
    def set(self, key: str, value: Any) -> bool:
        """Choose a value (None removes the wizard's choice). True when something changed."""
        if key not in TrainConfig.model_fields:
            raise KeyError(key)
        if value is None:
            if key not in self.values:
                return False
            del self.values[key]
        else:
            if self.values.get(key, object()) == value:
                return False
            self.values[key] = value
        self._cache = None
        return True

    def set_preset(self, name: str | None) -> bool:
        """Apply a preset (lowest layer above the defaults)."""
        if name == self.preset:
            return False
        self.preset = name
        self._cache = None
        return True

    def get(self, key: str) -> Any:
        """The value `key` resolves to now (the wizard's choice when resolving fails)."""
        resolved = self.try_resolve()
        if resolved is not None:
            return getattr(resolved.config, key)
        if key in self.values:
            return self.values[key]
        return TrainConfig.model_fields[key].default

    # --- resolving -----------------------------------------------------------------------------
    def resolve(self) -> ResolvedConfig:
        """Validate and resolve; raises `ConfigError` with every problem."""
        if self._cache is not None:
            return self._cache
        resolved = load_config(self.config_path, preset=self.preset, flags=dict(self.values))
        resolved.sources = {
            key: (WIZARD_SOURCE if source == "flag" else source) for key, source in resolved.sources.items()
        }
        self._cache = resolved
        return resolved

    def try_resolve(self) -> ResolvedConfig | None:
        """`resolve()`, or None (with `problems()` filled) when the choices do not validate."""
        try:
            resolved = self.resolve()
        except ConfigError as exc:
            self._problems = [str(p) for p in exc.problems]
            return None
        self._problems = []
        return resolved

    def problems(self) -> list[str]:
        """Config problems, then missing or wrong paths: everything that stops training."""
        resolved = self.try_resolve()
        if resolved is None:
            return list(self._problems)
        problems = [str(p) for p in check_paths(resolved)]
        if resolved.family in FLUX_FAMILIES:
            cfg = resolved.config
            values = {key: getattr(cfg, key) for key in PART_KEYS}
            problems += missing_part_problems(cfg.base_model, values)
        return problems

    @property
    def task(self) -> str:
        """ "image" or "text"."""
        return "text" if self.get("task_type") == "text-generation" else "image"


def annotated_yaml(resolved: ResolvedConfig) -> str:
    """The resolved config as YAML, each value followed by where it came from (defaults unmarked).

    `load_config` reads the text back to the same config (comments are ignored).
    """
    lines = [
        "# loratui training config, written by `loratui wizard`.",
        "# Train with: loratui train --config THIS_FILE",
        "# A note after a value says where it came from (no note: the default).",
    ]
    for key, value, source in resolved.source_rows():
        chunk = yaml.safe_dump({key: value}, sort_keys=False, allow_unicode=True, width=1_000_000)
        parts = chunk.rstrip("\n").split("\n")
        if source != "default":
            parts[0] += f"  # {source}"
        lines.extend(parts)
    return "\n".join(lines) + "\n"
