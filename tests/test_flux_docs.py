"""docs/flux_training.md stays true: its YAML examples load through the config loader as Flux runs with no key
reported as doing nothing, its key table matches the schema and the kohya spellings, and its commands name
existing subcommands and options."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from loratui.config import load_config
from loratui.config.aliases import canonical_key, normalise_value
from loratui.config.schema import TrainConfig
from loratui.config.task_keys import ignored_settings

DOC = Path(__file__).resolve().parent.parent / "docs" / "flux_training.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)


def section(title: str) -> str:
    return DOC.read_text(encoding="utf-8").split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


@pytest.mark.parametrize("index", range(len(blocks("yaml"))))
def test_yaml_examples_load_as_flux_runs(tmp_path: Path, index: int) -> None:
    text = blocks("yaml")[index]
    path = tmp_path / "flux.yaml"
    path.write_text(text, encoding="utf-8")
    resolved = load_config(path)
    assert resolved.family in ("flux", "chroma")
    assert resolved.config.task_type == "image-generation"
    assert ignored_settings(resolved) == [], "an example sets a key that does nothing for its run"
    written = {line.split(":", 1)[0] for line in text.splitlines() if re.match(r"^\w+:", line)}
    assert {key for key in written if resolved.sources.get(key, "default") == "default"} == set()


def test_yaml_examples_cover_the_card_tiers_and_chroma(tmp_path: Path) -> None:
    found = []
    for text in blocks("yaml"):
        path = tmp_path / "c.yaml"
        path.write_text(text, encoding="utf-8")
        resolved = load_config(path)
        found.append((resolved.family, resolved.config.base_weights_dtype, resolved.config.blocks_to_swap))
    assert found == [
        ("flux", "fp8", 20),  # 12 GB
        ("flux", "fp8", 8),  # 16 GB
        ("flux", "bf16", 12),  # 24 GB
        ("chroma", "fp8", 8),
    ]


def test_key_table_matches_the_schema_and_kohya_spellings() -> None:
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in section("The Flux keys").splitlines()
        if line.startswith("| `")
    ]
    assert len(rows) == 11
    for key_cell, kohya_cell, default_cell, _ in rows:
        key = key_cell.strip("`")
        assert key in TrainConfig.model_fields, key
        kohya = re.match(r"`(\w+)(?:: (\w+))?`", kohya_cell)
        assert kohya and canonical_key(kohya.group(1)) == key, kohya_cell
        if kohya.group(2):  # `fp8_base: true` (= `fp8`)
            assert normalise_value(key, kohya.group(2)) == re.search(r"= `(\w+)`", kohya_cell).group(1)
        default = TrainConfig.model_fields[key].default
        if re.fullmatch(r"`[\w.]+`", default_cell):
            assert default_cell.strip("`") == str(default), key


def command_lines() -> list[list[str]]:
    commands = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0].strip()
            if line.startswith("loratui "):
                commands.append(shlex.split(line))
    return commands


def test_commands_name_existing_subcommands_and_options() -> None:
    import typer

    from loratui.cli.app import app

    group = typer.main.get_command(app)
    commands = command_lines()
    assert len(commands) >= 8
    for words in commands:
        command = group.commands[words[1]]  # KeyError: no such subcommand
        known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
        used = {word.split("=", 1)[0] for word in words[2:] if word.startswith("-")}
        assert used <= known, f"{' '.join(words)}: unknown {sorted(used - known)}"
