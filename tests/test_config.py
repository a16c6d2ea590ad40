"""Typed config: seed configs verbatim, all-at-once errors, aliases, precedence, paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from loratui.config import ConfigError, check_paths, load_config

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("name", ["sd15_style.yaml", "sd15_style_explicit.yaml"])
def test_seed_configs_validate_verbatim(name: str) -> None:
    resolved = load_config(EXAMPLES / name)
    cfg = resolved.config
    assert cfg.task_type == "image-generation"
    assert cfg.lora_rank == 8
    assert cfg.lora_alpha == 16.0
    assert cfg.learning_rate == pytest.approx(2e-4)  # arrives from YAML as the string "2e-4"
    assert cfg.batch_size == 4 and cfg.epochs == 10 and cfg.save_steps == 100
    assert cfg.train_data_dir == "./data/style_train"
    assert cfg.metadata_path == "./data/style_train/metadata.csv"
    assert cfg.output_dir == "./output/my_style_lora"
    assert cfg.name == "my_style_lora"
    assert resolved.family == "sd15"


def test_seed_yaml_really_has_string_learning_rate() -> None:
    raw = yaml.safe_load((EXAMPLES / "sd15_style.yaml").read_text())
    assert isinstance(raw["learning_rate"], str)


def test_llm_seed_infers_text_and_ggml_gets_explanation() -> None:
    resolved = load_config(EXAMPLES / "llm_medical_qa.yaml")
    assert resolved.config.task_type == "text-generation"
    assert resolved.config.lora_rank == 16 and resolved.config.epochs == 15
    problems = check_paths(resolved)
    ggml = [p for p in problems if p.key == "base_model"]
    assert ggml and "GGML" in ggml[0].message and "GGUF" in ggml[0].hint
    assert ggml[0].line == 3


def test_low_vram_overlay_validates() -> None:
    resolved = load_config(EXAMPLES / "low_vram_overlay.yaml")
    assert resolved.config.mixed_precision == "fp16"
    assert resolved.config.effective_batch == 4


def test_three_mistakes_reported_at_once_with_lines_and_hints(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "lora_rnak: 8\nbatch_size: four\nbase_model: x\nmixed_precision: fp8\n",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = {p.key: p for p in info.value.problems}
    assert set(problems) == {"lora_rnak", "batch_size", "mixed_precision"}
    assert problems["lora_rnak"].line == 1 and "did you mean `lora_rank`?" in problems["lora_rnak"].hint
    assert problems["batch_size"].line == 2 and "whole number" in problems["batch_size"].message
    assert problems["mixed_precision"].line == 4 and "'fp16'" in problems["mixed_precision"].message
    text = info.value.render()
    assert "3 problems" in text and f"{path}:2" in text


def test_alias_did_you_mean_points_to_canonical_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "lora_alpah: 16\n"))
    assert "`lora_alpha`" in info.value.problems[0].hint


def test_alias_and_canonical_together_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "alpha: 16\nlora_alpha: 8\n"))
    assert "keep only one" in info.value.problems[0].hint


def test_dropout_alias_and_string_number(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "dropout: '0.1'\nlearning_rate: 1e-4\n")).config
    assert cfg.lora_dropout == pytest.approx(0.1)
    assert cfg.learning_rate == pytest.approx(1e-4)


def test_resolution_and_duplicate_key_and_yaml_syntax(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "resolution: 500\nlora_rank: 4\nlora_rank: 8\n"))
    messages = [str(p) for p in info.value.problems]
    assert any("multiple of 8" in m and ":1:" in m for m in messages)
    assert any("given twice" in m and ":3:" in m for m in messages)
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "a: [1, 2\nb: 3\n", "bad.yaml"))
    assert "YAML syntax error" in info.value.problems[0].message and info.value.problems[0].line


def test_value_aliases_normalise(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "mixed_precision: fp32\noptimizer: AdamW8bit\ntask_type: llm\n")).config
    assert (cfg.mixed_precision, cfg.optimizer, cfg.task_type) == ("no", "adamw8bit", "text-generation")


def test_precedence_default_preset_file_set_flag(tmp_path: Path) -> None:
    path = write(tmp_path, "base_model: model.safetensors\nbatch_size: 3\nlora_rank: 4\nepochs: 2\n")
    resolved = load_config(
        path,
        preset="24gb",
        overrides=["lora_rank=32", "epochs=5"],
        flags={"epochs": 7, "seed": None},
    )
    cfg, src = resolved.config, resolved.sources
    assert cfg.seed == 42 and "seed" not in src  # default
    assert cfg.optimizer == "adamw" and src["gradient_accumulation_steps"] == "preset 24gb[sd15]"  # preset
    assert cfg.batch_size == 3 and src["batch_size"] == f"config {path}:2"  # file beats preset
    assert cfg.lora_rank == 32 and src["lora_rank"] == "--set"  # --set beats file
    assert cfg.epochs == 7 and src["epochs"] == "flag"  # flag beats --set
    rows = {key: source for key, _, source in resolved.source_rows()}
    assert rows["seed"] == "default"


def test_preset_section_follows_family(tmp_path: Path) -> None:
    path = write(tmp_path, "base_model: sd_xl_base_1.0.safetensors\n")
    resolved = load_config(path, preset="low-vram")
    assert resolved.family == "sdxl"
    assert resolved.config.resolution == 1024 and resolved.config.cache_text_encoder_outputs is True


def test_unknown_preset_suggests(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "lora_rank: 4\n"), preset="low-vrm")
    assert "low-vram" in info.value.problems[0].hint


def test_bad_set_override_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "lora_rank: 4\n"), overrides=["lora_rank", "batch_sise=2"])
    keys = [p.key for p in info.value.problems]
    assert "lora_rank" in keys and "batch_sise" in keys


def test_missing_paths_named(tmp_path: Path) -> None:
    path = write(tmp_path, "base_model: ./nope/model.safetensors\ntrain_data_dir: ./nope/data\n")
    problems = check_paths(load_config(path))
    assert {p.key for p in problems} == {"base_model", "train_data_dir"}
    assert all("does not exist" in p.message and "nope" in p.message for p in problems)
    assert {p.line for p in problems} == {1, 2}


def test_resolved_yaml_round_trips(tmp_path: Path) -> None:
    resolved = load_config(EXAMPLES / "sd15_style.yaml", preset="12gb", overrides=["trigger_word=zxc"])
    again = load_config(write(tmp_path, resolved.to_yaml(), "resolved.yaml"))
    assert again.config == resolved.config


def test_config_reference_doc_is_current() -> None:
    from loratui.config.reference import render

    doc = (EXAMPLES.parent / "docs" / "config.md").read_text(encoding="utf-8")
    assert doc == render(), "regenerate with: python -m loratui.config.reference > docs/config.md"
