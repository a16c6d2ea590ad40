"""Recommender, cards, usable memory, `loratui recommend`, dry-run prediction and `--preset auto`."""

from __future__ import annotations

import json
import time

import pytest
from typer.testing import CliRunner

from loratui.cli.app import app
from loratui.config import ResolvedConfig, TrainConfig, load_config
from loratui.memory import estimate as estimate_module
from loratui.memory.cards import UnknownCard, card_memory
from loratui.memory.integration import (
    AUTO_SOURCE,
    NoFittingOption,
    NoUsableMemory,
    apply_auto_preset,
    dry_run_lines,
    dry_run_prediction,
    usable_memory,
)
from loratui.memory.recommend import no_fit_message, recommend
from loratui.memory.tables import clear_memory_cache
from loratui.util.sizes import GIB

SD15 = {
    "task_type": "image-generation",
    "model_family": "sd15",
    "base_model": "runwayml/stable-diffusion-v1-5",
    "resolution": 512,
    "lora_rank": 32,
    "batch_size": 4,
    "gradient_accumulation_steps": 2,
    "mixed_precision": "fp16",
}
SDXL = {
    "task_type": "image-generation",
    "model_family": "sdxl",
    "base_model": "stabilityai/sdxl-base-1.0",
    "resolution": 1024,
    "lora_rank": 32,
    "batch_size": 4,
    "mixed_precision": "bf16",
}
LLAMA7 = {
    "task_type": "text-generation",
    "model_family": "llm",
    "base_model": "meta-llama/Llama-2-7b-hf",
    "lora_rank": 64,
    "batch_size": 8,
    "gradient_accumulation_steps": 2,
    "max_seq_len": 2048,
    "mixed_precision": "bf16",
}


def _resolved(values: dict) -> ResolvedConfig:
    cfg = TrainConfig(**values)
    return ResolvedConfig(cfg, {k: "config x.yaml" for k in values}, cfg.model_family)


@pytest.mark.parametrize(("values", "card_gib"), [(SD15, 8), (SDXL, 12), (LLAMA7, 8), (LLAMA7, 24)])
def test_recommendation_is_fast_and_fits(values, card_gib) -> None:
    clear_memory_cache()
    estimate_module._PLANNERS.clear()
    resolved = _resolved(values)
    usable = card_gib * GIB
    started = time.perf_counter()
    options = recommend(resolved, usable)
    elapsed = time.perf_counter() - started
    assert elapsed < 3.0, f"{elapsed:.2f}s"
    assert options, no_fit_message(resolved, usable)
    costs = [o.quality_cost for o in options]
    assert costs == sorted(costs)
    for option in options:
        assert option.estimate.total_bytes <= usable and option.headroom_bytes >= 0
        assert option.config.effective_batch == resolved.config.effective_batch
        assert option.quality_note and option.relative_speed > 0
    first = options[0]
    assert set(first.changes) <= {
        "gradient_checkpointing",
        "batch_size",
        "gradient_accumulation_steps",
        "cache_latents",
        "cache_text_encoder_outputs",
        "optimizer",
        "load_in_4bit",
        "mixed_precision",
        "lora_rank",
    }


def test_quality_preserving_changes_come_first() -> None:
    options = recommend(_resolved(LLAMA7), 24 * GIB)
    assert options[0].quality_cost == 0  # checkpointing and/or a smaller micro-batch are enough on 24 GB
    assert not any(k in options[0].changes for k in ("max_seq_len", "lora_rank", "load_in_4bit"))


def test_a_fitting_config_is_kept() -> None:
    small = {
        **LLAMA7,
        "batch_size": 1,
        "gradient_accumulation_steps": 16,
        "gradient_checkpointing": True,
        "max_seq_len": 512,
        "lora_rank": 8,
    }
    options = recommend(_resolved(small), 80 * GIB, top=100)
    assert options and all(o.quality_cost == 0 for o in options)
    kept = [i for i, o in enumerate(options) if not o.changes]
    assert len(kept) == 1 and options[kept[0]].fits and options[kept[0]].relative_speed == 1.0
    # only faster settings rank above the user's own (here: less checkpointing, larger micro-batches)
    assert all(o.relative_speed > 1.0 for o in options[: kept[0]])


def test_nothing_fits_explains_weights_and_4bit() -> None:
    resolved = _resolved(LLAMA7)
    assert recommend(resolved, 2 * GIB) == []
    message = no_fit_message(resolved, 2 * GIB)
    assert "frozen weights alone" in message and "smallest option" in message and "load_in_4bit" in message
    with pytest.raises(NoFittingOption):
        apply_auto_preset(resolved, 2 * GIB)


def test_fixed_keys_are_not_changed() -> None:
    options = recommend(_resolved(LLAMA7), 16 * GIB, fixed=frozenset({"load_in_4bit", "max_seq_len"}))
    assert all("load_in_4bit" not in o.changes and "max_seq_len" not in o.changes for o in options)


def test_auto_preset_applies_the_top_option() -> None:
    resolved = _resolved(LLAMA7)
    updated = apply_auto_preset(resolved, 24 * GIB)
    top = recommend(resolved, 24 * GIB, top=1)[0]
    assert updated.config == top.config and updated.preset == "auto"
    for key in top.changes:
        assert updated.sources[key] == AUTO_SOURCE
    assert updated.config.effective_batch == resolved.config.effective_batch


def test_cards() -> None:
    name, total = card_memory("rtx 4060")
    assert name == "RTX 4060" and 7.9 * GIB < total < 8.1 * GIB
    assert card_memory("NVIDIA GeForce RTX 4090")[0] == "RTX 4090"
    with pytest.raises(UnknownCard, match="RTX 4060"):
        card_memory("RTX 4600")


ONE_GPU = {
    "driver": "550.54",
    "cuda": 12040,
    "gpus": [{"name": "NVIDIA GeForce RTX 4090", "total": 24 * GIB, "used": 2 * GIB, "reserved": GIB // 2}],
}


def test_usable_memory_sources(fake_nvml) -> None:
    fake_nvml(ONE_GPU)
    gpu = usable_memory()
    assert 20 * GIB < gpu.bytes < 21.5 * GIB and "RTX 4090" in gpu.label
    assert (
        11 * GIB < usable_memory(vram="12GB").bytes < 12 * GIB
    )  # a 12 GB card minus driver share and margin
    with pytest.raises(ValueError):
        usable_memory(vram="8GB", card="RTX 4060")
    fake_nvml("none")
    with pytest.raises(NoUsableMemory, match="--vram"):
        usable_memory()


def test_dry_run_prediction_with_and_without_gpu(fake_nvml, monkeypatch) -> None:
    monkeypatch.delenv("LORATUI_SIMULATE_VRAM", raising=False)
    resolved = _resolved({**LLAMA7, "gradient_checkpointing": True, "batch_size": 1, "simulate_vram": "3GiB"})
    fake_nvml(ONE_GPU)
    pred = dry_run_prediction(resolved)
    assert pred["device"] == "cuda" and pred["fits"] in (True, False)
    assert pred["predicted_peak_bytes"] == sum(pred["breakdown"].values())
    assert pred["simulated_budget_bytes"] == 3 * GIB and pred["fits_simulated_budget"] is False
    json.dumps(pred)
    text = "\n".join(dry_run_lines(pred))
    assert "predicted peak memory (cuda)" in text and "RTX 4090" in text and "simulated card" in text
    fake_nvml("none")
    pred = dry_run_prediction(resolved)
    assert pred["device"] == "cpu" and pred["gpu"] is None and pred["cuda_prediction"]["total_bytes"] > 0


def _config_file(tmp_path, values: dict):
    import yaml

    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_cli_recommend_json_and_table(tmp_path) -> None:
    path = _config_file(tmp_path, SDXL)
    runner = CliRunner()
    result = runner.invoke(app, ["recommend", "--config", str(path), "--vram", "12GB", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["options"] and payload["current"]["predicted_peak_bytes"] > 0
    assert all(o["headroom_bytes"] >= 0 for o in payload["options"])
    table = runner.invoke(
        app, ["recommend", "--config", str(path), "--card", "RTX 4070"], env={"COLUMNS": "200"}
    )
    assert table.exit_code == 0, table.output
    assert "options that fit" in table.output and "RTX 4070" in table.output


def test_cli_recommend_without_nvml_asks_for_vram(tmp_path, fake_nvml) -> None:
    fake_nvml("none")
    path = _config_file(tmp_path, LLAMA7)
    result = CliRunner().invoke(app, ["recommend", "--config", str(path)])
    assert result.exit_code == 2
    assert "--vram" in result.output


def test_cli_recommend_nothing_fits_and_bad_input(tmp_path) -> None:
    path = _config_file(tmp_path, LLAMA7)
    runner = CliRunner()
    tiny = runner.invoke(app, ["recommend", "--config", str(path), "--vram", "2GB"])
    assert tiny.exit_code == 1 and "frozen weights" in tiny.output
    bad = runner.invoke(app, ["recommend", "--config", str(path), "--vram", "lots"])
    assert bad.exit_code == 1 and "not a size" in bad.output
    listed = runner.invoke(app, ["recommend", "--config", str(path), "--card", "list"])
    assert listed.exit_code == 0 and "RTX 4090" in listed.output


def test_cli_recommend_with_preset(tmp_path) -> None:
    path = _config_file(tmp_path, {"task_type": "text-generation", "base_model": "meta-llama/Llama-2-7b-hf"})
    result = CliRunner().invoke(
        app, ["recommend", "--config", str(path), "--preset", "12gb", "--vram", "12GB", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["family"] == "llm"
    assert load_config(path, preset="12gb").config.load_in_4bit
