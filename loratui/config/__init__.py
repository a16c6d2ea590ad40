"""Typed training config: schema, aliases, layered loading and all-at-once errors."""

from loratui.config.errors import ConfigError, ConfigProblem
from loratui.config.loader import ResolvedConfig, check_paths, load_config
from loratui.config.schema import FIELD_NAMES, TrainConfig

__all__ = [
    "FIELD_NAMES",
    "ConfigError",
    "ConfigProblem",
    "ResolvedConfig",
    "TrainConfig",
    "check_paths",
    "load_config",
]
