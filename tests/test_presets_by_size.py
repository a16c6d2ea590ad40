"""LLM preset sections are picked by model size: a config folder, a GGUF header or the name's size."""

from __future__ import annotations

import json

import pytest

from loratui.config import load_config
from loratui.config.base_model import inspect_base_model
from loratui.config.presets import llm_preset_family
from loratui.memory.arch import bundled_llm_config


@pytest.mark.parametrize(
    ("params", "family"),
    [
        (1.24e9, "llm-3b"),
        (3.2e9, "llm-3b"),
        (6.7e9, "llm-7b"),
        (9.24e9, "llm-7b"),
        (12.2e9, "llm-13b"),
        (14.8e9, "llm-13b"),
        (30.5e9, "llm-32b"),
        (32.8e9, "llm-32b"),
        (70.6e9, "llm-70b"),
        (0, "llm-7b"),
    ],
)
def test_size_classes(params: float, family: str) -> None:
    assert llm_preset_family(params) == family


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("llama-3.2-1b", "llm-3b"),
        ("qwen3-8b", "llm-7b"),
        ("gemma-2-9b", "llm-7b"),
        ("phi-4", "llm-13b"),
        ("mistral-nemo-12b", "llm-13b"),
        ("qwen3-30b-a3b", "llm-32b"),
        ("llama-3.1-70b", "llm-70b"),
        ("llama-2-7b", "llm-7b"),
    ],
)
def test_a_config_folder_picks_its_class(tmp_path, name: str, family: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps(bundled_llm_config(name)))
    assert inspect_base_model(str(tmp_path)).preset_family == family


def test_a_hub_id_not_cached_uses_the_size_in_its_name(tmp_path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text("base_model: meta-llama/Llama-3.1-70B-Instruct\ntask_type: text-generation\n")
    resolved = load_config(path, preset="80gb")
    assert resolved.sources["load_in_4bit"] == "preset 80gb[llm-70b]" and resolved.config.load_in_4bit
    small = tmp_path / "s.yaml"
    small.write_text("base_model: meta-llama/Llama-3.2-1B\ntask_type: text-generation\n")
    assert load_config(small, preset="24gb").sources["max_seq_len"] == "preset 24gb[llm-3b]"


def test_docs_tables_follow_the_preset_files() -> None:
    from loratui.config.presets import load_preset, preset_names
    from loratui.memory.dev.preset_sections import markdown_tables

    settings, peaks = markdown_tables().split("\n\n")
    for table in (settings, peaks):
        rows = table.splitlines()[2:]
        assert [row.split("|")[1].strip() for row in rows] == [f"`{n}`" for n in preset_names()]
    for row, name in zip(settings.splitlines()[2:], preset_names(), strict=True):
        llm_unsupported = [f for f in load_preset(name).unsupported if f.startswith("llm")]
        assert row.count("not supported") == len(llm_unsupported)
