"""Read a YAML mapping while remembering the line of every top-level key."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from loratui.config.errors import ConfigProblem


@dataclass
class YamlMapping:
    """Top-level keys of a YAML file with their values and 1-based line numbers."""

    source: str
    values: dict[str, object] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)
    problems: list[ConfigProblem] = field(default_factory=list)


def read_yaml_mapping(text: str, source: str) -> YamlMapping:
    """Parse `text`; syntax errors, duplicate keys and non-mapping documents become problems."""
    result = YamlMapping(source=source)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        result.problems.append(
            ConfigProblem(
                "", f"YAML syntax error: {getattr(exc, 'problem', exc)}", "fix the YAML", source, line
            )
        )
        return result
    if node is None:
        return result
    if not isinstance(node, yaml.MappingNode):
        result.problems.append(
            ConfigProblem("", "the file must be a mapping of `key: value` lines", "see examples/", source, 1)
        )
        return result
    constructor = yaml.SafeLoader("")
    for key_node, value_node in node.value:
        key = str(key_node.value)
        line = key_node.start_mark.line + 1
        if key in result.values:
            result.problems.append(
                ConfigProblem(
                    key, f"given twice (first on line {result.lines[key]})", "keep one", source, line
                )
            )
            continue
        try:
            value = constructor.construct_object(value_node, deep=True)
        except yaml.YAMLError as exc:
            result.problems.append(
                ConfigProblem(key, f"unreadable value: {exc}", "fix the YAML", source, line)
            )
            continue
        result.values[key] = value
        result.lines[key] = line
    return result


def read_yaml_file(path: Path) -> YamlMapping:
    """Read a YAML file; a missing or undecodable file becomes a problem."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return YamlMapping(source, problems=[ConfigProblem("", "file not found", "check the path", source)])
    except UnicodeDecodeError as exc:
        return YamlMapping(
            source, problems=[ConfigProblem("", f"not UTF-8 text ({exc.reason})", "save it as UTF-8", source)]
        )
    return read_yaml_mapping(text, source)


def parse_set_overrides(items: list[str]) -> YamlMapping:
    """Parse `--set key=value` items; values are YAML scalars/lists (`--set lora_rank=16`)."""
    result = YamlMapping(source="--set")
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            result.problems.append(
                ConfigProblem(item, "expected key=value", "e.g. --set lora_rank=16", "--set")
            )
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        result.values[key] = value
    return result
