"""Every preset file loads, validates against the config schema, and is listed."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from loratui.cli.app import app
from loratui.config import TrainConfig
from loratui.config.presets import PRESET_FAMILIES, load_preset, preset_dirs, preset_names

TIERS = ["low-vram", "12gb", "16gb", "24gb", "48gb", "80gb"]


def test_six_tiers_in_vram_order() -> None:
    assert preset_names() == TIERS


@pytest.mark.parametrize("name", TIERS)
def test_preset_sections_validate(name: str) -> None:
    preset = load_preset(name)
    assert preset.vram_gb > 0 and preset.description
    assert set(preset.families) | set(preset.unsupported) == set(PRESET_FAMILIES)
    assert not set(preset.families) & set(preset.unsupported)
    for family, section in preset.families.items():
        cfg = TrainConfig(**section)  # raises on any bad key or value
        for key in ("lora_rank", "lora_alpha", "batch_size", "gradient_accumulation_steps", "optimizer"):
            assert key in section, f"{name}[{family}] lacks {key}"
        assert "gradient_checkpointing" in section and "mixed_precision" in section
        if family.startswith("llm"):
            assert "max_seq_len" in section and "load_in_4bit" in section
        else:
            assert "resolution" in section and "cache_latents" in section
            assert cfg.resolution in (512, 768, 1024)


def test_presets_found_from_source_checkout() -> None:
    assert any(d.name in ("presets", "_bundled_presets") for d in preset_dirs())


def test_user_preset_dir_searched_first(tmp_path, monkeypatch) -> None:
    (tmp_path / "mine.yaml").write_text(
        "description: mine\nvram: 10 GB\nvram_gb: 10\nfamilies:\n  sd15:\n    lora_rank: 2\n"
    )
    monkeypatch.setenv("LORATUI_PRESETS_DIR", str(tmp_path))
    assert "mine" in preset_names()
    assert load_preset("mine").families["sd15"]["lora_rank"] == 2


def test_cli_presets_list_and_show() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["presets", "list"], env={"NO_COLOR": "1", "COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for tier in TIERS:
        assert tier in result.output
    shown = runner.invoke(app, ["presets", "show", "low-vram"])
    assert shown.exit_code == 0 and "adamw8bit" in shown.output and "llm-13b" in shown.output
    missing = runner.invoke(app, ["presets", "show", "nope"])
    assert missing.exit_code == 1
