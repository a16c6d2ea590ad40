"""Resolve a training config from layers, lowest first:

built-in defaults < `--preset` < config file < `--set key=value` < explicit CLI flags.

Every problem in every layer is collected and raised together as one `ConfigError`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import ValidationError

from loratui.config.aliases import (
    KEY_ALIASES,
    NEGATED_KEYS,
    NETWORK_KEYS,
    UNSUPPORTED_KEYS,
    canonical_key,
    expand_network_keys,
    normalise_value,
)
from loratui.config.errors import ConfigError, ConfigProblem
from loratui.config.schema import FIELD_NAMES, PATH_FIELDS, TrainConfig
from loratui.config.yaml_source import YamlMapping, parse_set_overrides, read_yaml_file, short_repr

KNOWN_KEYS = tuple(FIELD_NAMES) + tuple(KEY_ALIASES) + NETWORK_KEYS


@dataclass
class Layer:
    """One source of values with a label used in `--dry-run` ("config x.yaml:5", "--set", ...)."""

    label: str
    values: dict[str, object]
    lines: dict[str, int] = field(default_factory=dict)
    source: str = ""

    def where(self, key: str) -> str:
        line = self.lines.get(key)
        return f"{self.label}:{line}" if line else self.label


@dataclass
class ResolvedConfig:
    """A validated config plus where each value came from."""

    config: TrainConfig
    sources: dict[str, str]
    family: str  # sd15 | sd2 | sdxl | llm
    preset: str | None = None
    config_path: Path | None = None

    def to_yaml(self) -> str:
        """The resolved config as YAML that `load_config` reads back unchanged."""
        data = self.config.model_dump(mode="json")
        header = "# Resolved loratui config: every value, after presets, overrides and flags.\n"
        return header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)

    def source_rows(self) -> list[tuple[str, object, str]]:
        """(key, value, source) for every field, in schema order."""
        data = self.config.model_dump(mode="json")
        return [(key, data[key], self.sources.get(key, "default")) for key in FIELD_NAMES]


def _canonicalise(layer: YamlMapping, label: str, problems: list[ConfigProblem]) -> Layer:
    """Map aliases to canonical keys and report unknown or doubled keys."""
    out = Layer(label=label, values={}, lines={}, source=layer.source)
    given_as: dict[str, str] = {}
    network = {k: layer.values[k] for k in NETWORK_KEYS if k in layer.values}
    for key, value in layer.values.items():
        line = layer.lines.get(key)
        canon = canonical_key(key)
        if key in NETWORK_KEYS:
            continue
        if canon in UNSUPPORTED_KEYS:
            problems.append(ConfigProblem(key, *UNSUPPORTED_KEYS[canon], layer.source, line))
            continue
        if canon not in FIELD_NAMES:
            close = difflib.get_close_matches(key, KNOWN_KEYS, n=1, cutoff=0.6)
            suggestion = canonical_key(close[0]) if close else None
            hint = f"did you mean `{suggestion}`?" if suggestion else "see `loratui train --help` for keys"
            problems.append(ConfigProblem(key, "unknown key", hint, layer.source, line))
            continue
        if canon in given_as:
            problems.append(
                ConfigProblem(
                    key,
                    f"same setting as `{given_as[canon]}`",
                    f"keep only one of `{given_as[canon]}` and `{key}`",
                    layer.source,
                    line,
                )
            )
            continue
        given_as[canon] = key
        if key in NEGATED_KEYS and isinstance(value, bool):
            value = not value
        out.values[canon] = normalise_value(canon, value)
        if line:
            out.lines[canon] = line
    if network:
        _expand_network(layer, network, given_as, out, problems)
    return out


def _expand_network(
    layer: YamlMapping,
    network: dict[str, object],
    given_as: dict[str, str],
    out: Layer,
    problems: list[ConfigProblem],
) -> None:
    """kohya's `network_module` + `network_args` -> network_type, conv_rank, lokr_factor, ... of this layer."""
    key = "network_args" if "network_args" in network else "network_module"
    line = layer.lines.get(key)
    try:
        values = expand_network_keys(network.get("network_module"), network.get("network_args"))
    except ValueError as exc:
        problems.append(
            ConfigProblem(key, str(exc), "see docs/sd_training.md, Adapter types", layer.source, line)
        )
        return
    for canon, value in values.items():
        if canon in given_as:
            if str(normalise_value(canon, out.values[canon])).lower() != str(value).lower():
                problems.append(
                    ConfigProblem(
                        given_as[canon],
                        f"`{given_as[canon]}` disagrees with {key} ({canon}={value})",
                        f"keep only one of `{given_as[canon]}` and the {key} entry",
                        layer.source,
                        layer.lines.get(given_as[canon]),
                    )
                )
            continue
        out.values[canon] = normalise_value(canon, value)
        if line:
            out.lines[canon] = line


def _expected(error: dict) -> str:
    kind = error.get("type", "")
    table = {
        "int_parsing": "expected a whole number",
        "int_from_float": "expected a whole number",
        "int_type": "expected a whole number",
        "float_parsing": "expected a number",
        "float_type": "expected a number",
        "bool_parsing": "expected true or false",
        "bool_type": "expected true or false",
        "string_type": "expected text",
        "list_type": "expected a list",
    }
    return table.get(kind, str(error.get("msg", "invalid value")).replace("Input should be", "expected"))


def _validation_problems(exc: ValidationError, owner: dict[str, Layer]) -> list[ConfigProblem]:
    problems = []
    for error in exc.errors():
        loc = error.get("loc") or ()
        key = str(loc[0]) if loc else ""
        layer = owner.get(key)
        source = layer.source if layer else "config"
        line = layer.lines.get(key) if layer else None
        got = error.get("input")
        message = _expected(error)
        if error.get("type") == "literal_error":
            message = f"got {short_repr(got)}; {error.get('msg', '').replace('Input should be', 'expected')}"
        elif error.get("type") == "value_error":
            message = str(error.get("msg", "")).removeprefix("Value error, ")
            if not key:  # a check across keys: the message starts with the key to change
                key = message.split(" ", 1)[0].rstrip(",:")
                layer = owner.get(key)
                source = layer.source if layer else source
                line = layer.lines.get(key) if layer else line
        elif key:
            message = f"{message} (got {short_repr(got)})"
        problems.append(ConfigProblem(key, message, "", source, line))
    return problems


def _infer_task_and_family(merged: dict[str, object]) -> tuple[str | None, str]:
    """Task type and model family from explicit keys, the model files, or the names."""
    from loratui.config.base_model import guess_family_from_name, guess_task_type, inspect_base_model

    base = str(merged.get("base_model") or "")
    task = merged.get("task_type")
    task = str(task) if task else guess_task_type(base, str(merged.get("train_data_dir") or ""))
    family = str(merged.get("model_family") or "auto")
    if family == "auto":
        info = inspect_base_model(base) if base else None
        if info and info.family:
            family = info.family
        else:
            family = guess_family_from_name(base, task or "image-generation")
    return task, family


def _preset_family(family: str, base_model: str) -> str:
    from loratui.config.presets import FLUX_PRESET_FAMILIES

    if family in FLUX_PRESET_FAMILIES:
        return "flux-dev"
    if family != "llm":
        return "sd15" if family == "sd2" else family
    from loratui.config.base_model import inspect_base_model, params_from_name

    found = inspect_base_model(base_model).preset_family
    if found is None:  # nothing readable (e.g. a hub id not in the local cache): the name's size, if any
        from loratui.config.presets import llm_preset_family

        found = llm_preset_family(params_from_name(base_model) or 0)
    return found


def load_config(
    path: Path | str | None = None,
    *,
    preset: str | None = None,
    overrides: list[str] | None = None,
    flags: dict[str, object] | None = None,
) -> ResolvedConfig:
    """Resolve and validate a config. Raises `ConfigError` listing every problem."""
    problems: list[ConfigProblem] = []
    layers: list[Layer] = []
    config_path = Path(path) if path else None
    if config_path is not None:
        file_map = read_yaml_file(config_path)
        problems += file_map.problems
        layers.append(_canonicalise(file_map, f"config {config_path}", problems))
    set_map = parse_set_overrides(list(overrides or []))
    problems += set_map.problems
    layers.append(_canonicalise(set_map, "--set", problems))
    flag_map = YamlMapping("flag", values={k: v for k, v in (flags or {}).items() if v is not None})
    layers.append(_canonicalise(flag_map, "flag", problems))

    merged: dict[str, object] = {}
    for layer in layers:
        merged.update(layer.values)
    task, family = _infer_task_and_family(merged)

    if preset:
        from loratui.config.presets import load_preset, preset_section

        try:
            preset_obj = load_preset(preset)
        except ConfigError as exc:
            problems += exc.problems
        else:
            section_name = _preset_family(family, str(merged.get("base_model") or ""))
            if section_name in preset_obj.unsupported:
                problems.append(
                    ConfigProblem(
                        "preset",
                        f"preset `{preset}` has no {section_name} settings: "
                        f"{preset_obj.unsupported[section_name]}",
                        "use a preset for a larger card, or --preset auto to search settings for this card",
                        "--preset",
                    )
                )
            section = preset_section(preset_obj, section_name)
            label = f"preset {preset}[{section_name}]"
            section_map = YamlMapping(str(preset_obj.path), values=section)
            layers.insert(0, _canonicalise(section_map, label, problems))

    owner: dict[str, Layer] = {}
    data: dict[str, object] = {}
    for layer in layers:
        for key, value in layer.values.items():
            data[key] = value
            owner[key] = layer
    sources = {key: layer.where(key) for key, layer in owner.items()}
    if "task_type" not in data and task:
        data["task_type"] = task
        sources["task_type"] = "inferred from base_model/train_data_dir"

    config: TrainConfig | None = None
    try:
        config = TrainConfig(**data)
    except ValidationError as exc:
        problems += _validation_problems(exc, owner)
    if problems or config is None:
        raise ConfigError(problems)
    if config.model_family != "auto":
        family = config.model_family
    problems += _family_problems(config, family, owner)
    if problems:
        raise ConfigError(problems)
    return ResolvedConfig(config, sources, family, preset, config_path)


def _family_problems(config: TrainConfig, family: str, owner: dict[str, Layer]) -> list[ConfigProblem]:
    """Checks that need the model family (Flux: resolution multiple of 16, blocks_to_swap vs the model)."""
    from loratui.config.flux_checks import flux_config_problems

    def where(key: str) -> tuple[str, int | None]:
        layer = owner.get(key)
        return (layer.source, layer.lines.get(key)) if layer else ("config", None)

    return flux_config_problems(config, family, where)


def check_paths(resolved: ResolvedConfig) -> list[ConfigProblem]:
    """Problems with paths that must exist (base model, dataset, metadata, init LoRA)."""
    from loratui.config.base_model import inspect_base_model

    cfg = resolved.config
    problems: list[ConfigProblem] = []

    def where(key: str) -> tuple[str, int | None]:
        label = resolved.sources.get(key, "config")
        if ":" in label and label.rsplit(":", 1)[1].isdigit():
            src, line = label.rsplit(":", 1)
            return src.removeprefix("config "), int(line)
        return label.removeprefix("config "), None

    for key in PATH_FIELDS:
        value = getattr(cfg, key)
        if not value:
            if key in ("base_model", "train_data_dir"):
                src, line = where(key)
                problems.append(ConfigProblem(key, "not set", f"add `{key}: PATH` to the config", src, line))
            continue
        src, line = where(key)
        if key == "base_model":
            info = inspect_base_model(value)
            if info.kind == "hub-id":
                continue  # resolved against the local HF cache by the loader
            if info.kind == "ggml":
                problems.append(
                    ConfigProblem(
                        key,
                        f"{value} is a legacy GGML file; GGML v3 files cannot be trained",
                        "use the Hugging Face weights (a folder with config.json + *.safetensors) "
                        "or convert the model to GGUF",
                        src,
                        line,
                    )
                )
                continue
        if not Path(value).expanduser().exists():
            absolute = Path(value).expanduser().resolve()
            problems.append(
                ConfigProblem(key, f"path does not exist: {value} ({absolute})", "fix the path", src, line)
            )
    return problems
