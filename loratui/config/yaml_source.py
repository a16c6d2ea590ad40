"""Read a YAML mapping while remembering the line of every top-level key."""

from __future__ import annotations

import reprlib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from loratui.config.errors import ConfigProblem

#: the most YAML nodes one value may expand to through anchors and aliases (an "alias bomb" expands to billions)
MAX_VALUE_NODES = 100_000
#: the most characters an error message echoes of a value
MAX_ECHO = 200
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict = 3, 8, 8, 8
_REPR.maxstring = _REPR.maxother = MAX_ECHO


def short_repr(value: object) -> str:
    """`repr(value)` cut to `MAX_ECHO` characters, in time bounded by that size (never expands a big value)."""
    text = _REPR.repr(value)
    return text if len(text) <= MAX_ECHO else text[: MAX_ECHO - 3] + "..."


def expanded_size(node: yaml.Node, limit: int = MAX_VALUE_NODES) -> int:
    """How many nodes `node` becomes once its aliases are expanded, counted up to just over `limit`
    (a recursive alias counts as over the limit). Linear in the size of the document."""
    sizes: dict[int, int] = {}
    busy: set[int] = set()

    def size(n: yaml.Node) -> int:
        key = id(n)
        if key in sizes:
            return sizes[key]
        if key in busy:
            return limit + 1
        busy.add(key)
        total = 1
        children: list[yaml.Node] = []
        if isinstance(n, yaml.SequenceNode):
            children = list(n.value)
        elif isinstance(n, yaml.MappingNode):
            children = [part for pair in n.value for part in pair]
        for child in children:
            total += size(child)
            if total > limit:
                break
        busy.discard(key)
        sizes[key] = min(total, limit + 1)
        return sizes[key]

    try:
        return size(node)
    except RecursionError:
        return limit + 1


def _too_big(key: str, source: str, line: int | None) -> ConfigProblem:
    return ConfigProblem(
        key,
        f"the value expands through YAML anchors/aliases to more than {MAX_VALUE_NODES:,} items",
        "write the value out without `&anchor`/`*alias` repetition",
        source,
        line,
    )


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
    except RecursionError:
        result.problems.append(
            ConfigProblem("", "the YAML nests too deeply to be read", "fix the YAML", source, None)
        )
        return result
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
        if expanded_size(value_node) > MAX_VALUE_NODES:
            result.problems.append(_too_big(key, source, line))
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
            node = yaml.compose(raw, Loader=yaml.SafeLoader) if raw.strip() else None
            if node is not None and expanded_size(node) > MAX_VALUE_NODES:
                result.problems.append(_too_big(key, "--set", None))
                continue
            value = yaml.SafeLoader("").construct_object(node, deep=True) if node is not None else ""
        except (yaml.YAMLError, RecursionError):
            value = raw
        result.values[key] = value
    return result
