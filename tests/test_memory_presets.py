"""Every preset section is predicted to fit its tier's card with margin (`loratui presets show NAME --check`)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from loratui.cli.app import app
from loratui.config import ConfigError, ResolvedConfig, load_config
from loratui.config.presets import PRESET_FAMILIES, load_preset, preset_names
from loratui.memory.estimate import estimate_peak
from loratui.memory.integration import preset_family_config, tier_budget
from loratui.memory.recommend import recommend

MARGIN = 0.05  # on top of the tier's own reserve (driver share + 3 %)

CASES = [(name, family) for name in preset_names() for family in PRESET_FAMILIES]


@pytest.mark.parametrize(("name", "family"), CASES, ids=[f"{n}-{f}" for n, f in CASES])
def test_preset_fits_its_tier(name: str, family: str) -> None:
    preset = load_preset(name)
    budget = tier_budget(preset.vram_gb)
    if family in preset.unsupported:
        # the preset says no setting fits this tier: the planner must agree (nothing it can change fits with
        # the same margin)
        cfg = preset_family_config(family, {})
        resolved = ResolvedConfig(cfg, {}, family)
        found = recommend(resolved, int(budget / (1 + MARGIN)), top=1)
        assert found == [], f"{name}[{family}] is marked unsupported but fits with the margin"
        return
    section = preset.families.get(family)
    assert section is not None, f"{name} has neither settings nor an `unsupported` reason for {family}"
    estimate = estimate_peak(preset_family_config(family, section), device="cuda")
    assert estimate.total_bytes * (1 + MARGIN) <= budget, (
        f"{name}[{family}] predicted {estimate.total_bytes / 2**30:.2f} GiB (+{MARGIN:.0%} margin) > usable "
        f"{budget / 2**30:.2f} GiB of the {preset.vram_gb:g} GB tier; peak during {estimate.phase}"
    )


def test_unsupported_family_is_refused_with_the_reason(tmp_path) -> None:
    config = tmp_path / "x.yaml"
    config.write_text("base_model: meta-llama/Llama-2-13b-hf\ntask_type: text-generation\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(config, preset="low-vram")
    text = caught.value.render()
    assert "llm-13b" in text and "use 12gb" in text and "--preset auto" in text


def test_presets_show_check_prints_predictions() -> None:
    result = CliRunner().invoke(app, ["presets", "show", "24gb", "--check"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "memory check on a 24 GB card" in result.output
    for family in PRESET_FAMILIES:
        assert family in result.output
    assert "headroom" in result.output and "GiB" in result.output


def test_presets_show_names_unsupported_families() -> None:
    result = CliRunner().invoke(app, ["presets", "show", "low-vram", "--check"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "llm-13b" in result.output and "not supported" in result.output
    assert "DOES NOT FIT" not in result.output
