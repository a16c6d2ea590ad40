"""`loratui train --dry-run` shows the planner's prediction; `--preset auto` applies its top option."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from loratui.cli.app import app
from loratui.config import load_config
from loratui.memory.estimate import estimate_peak
from loratui.memory.integration import AUTO_SOURCE, usable_memory
from loratui.util.sizes import GIB

SD15 = "base_model: runwayml/stable-diffusion-v1-5\ntask_type: image-generation\nresolution: 512\n"
LLAMA = "base_model: meta-llama/Llama-2-7b-hf\ntask_type: text-generation\nmax_seq_len: 2048\n"


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch) -> None:
    monkeypatch.setenv("LORATUI_FAKE_NVML", "none")


def _config(tmp_path, body: str) -> str:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    path = tmp_path / "c.yaml"
    path.write_text(body + f"train_data_dir: {data}\n", encoding="utf-8")
    return str(path)


def _invoke(*args: str):
    return CliRunner().invoke(app, ["train", *args], env={"COLUMNS": "200"})


def test_dry_run_json_has_the_prediction_of_the_config_as_resolved(tmp_path) -> None:
    cfg = _config(tmp_path, SD15 + "lora_rank: 16\nbatch_size: 2\n")
    result = _invoke("--config", cfg, "--set", "lora_rank=64", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    memory = json.loads(result.output)["memory"]
    resolved = load_config(cfg, overrides=["lora_rank=64"])
    expected = estimate_peak(resolved, device="cpu")
    assert memory["device"] == "cpu" and memory["predicted_peak_bytes"] == expected.total_bytes
    assert sum(memory["breakdown"].values()) == memory["predicted_peak_bytes"]
    assert memory["cuda_prediction"]["total_bytes"] == estimate_peak(resolved, device="cuda").total_bytes
    # the override is part of what is predicted: rank 64 needs more than rank 16
    plain = json.loads(_invoke("--config", cfg, "--dry-run", "--json").output)["memory"]
    assert plain["predicted_peak_bytes"] < memory["predicted_peak_bytes"]


def test_dry_run_text_against_a_given_card(tmp_path) -> None:
    cfg = _config(tmp_path, SD15 + "batch_size: 4\ngradient_checkpointing: false\n")
    result = _invoke("--config", cfg, "--dry-run", "--vram", "6GB")
    assert result.exit_code == 0, result.output
    assert "predicted peak memory (cuda)" in result.output and "activations" in result.output
    assert "does NOT fit" in result.output and "--preset auto" in result.output
    roomy = _invoke("--config", cfg, "--dry-run", "--card", "RTX 4090")
    assert roomy.exit_code == 0 and "fits on RTX 4090" in roomy.output


def test_preset_auto_applies_the_top_option_and_keeps_fixed_keys(tmp_path) -> None:
    body = (
        SD15 + "lora_rank: 32\nbatch_size: 4\ngradient_accumulation_steps: 2\ngradient_checkpointing: false\n"
    )
    cfg = _config(tmp_path, body)
    args = ("--config", cfg, "--preset", "auto", "--vram", "6GB", "--set", "lora_rank=32", "--dry-run")
    result = _invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    config, sources = payload["config"], payload["sources"]
    changed = [key for key, source in sources.items() if source == AUTO_SOURCE]
    assert changed, "the config does not fit 6 GB as written, so the planner must change something"
    assert config["lora_rank"] == 32 and sources["lora_rank"] == "--set"
    assert config["batch_size"] * config["gradient_accumulation_steps"] == 8  # effective batch kept
    budget = usable_memory(vram="6GB").bytes
    assert payload["memory"]["predicted_peak_bytes"] <= budget and payload["memory"]["fits"] is True
    text = _invoke(*args)
    assert text.exit_code == 0 and "preset auto for" in text.output and AUTO_SOURCE in text.output


def test_preset_auto_without_a_gpu_asks_for_vram(tmp_path) -> None:
    result = _invoke("--config", _config(tmp_path, SD15), "--preset", "auto", "--dry-run")
    assert result.exit_code == 2 and "--vram" in result.output


def test_preset_auto_when_nothing_fits_names_the_smallest_option(tmp_path) -> None:
    result = _invoke("--config", _config(tmp_path, LLAMA), "--preset", "auto", "--vram", "3GB", "--dry-run")
    assert result.exit_code == 1, result.output
    assert "nothing fits" in result.output and "load_in_4bit=True" in result.output
    assert "needs" in result.output and " GiB" in result.output


def test_preset_auto_for_a_7b_model_on_8gb_uses_4bit(tmp_path) -> None:
    cfg = _config(tmp_path, LLAMA + "batch_size: 2\ngradient_accumulation_steps: 4\n")
    result = _invoke("--config", cfg, "--preset", "auto", "--vram", "8GB", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["config"]["load_in_4bit"] is True
    assert payload["memory"]["predicted_peak_bytes"] <= 8 * GIB


def test_card_sizes_in_gb_are_the_gib_printed_on_cards() -> None:
    assert usable_memory(vram="8GB").total == 8 * GIB == usable_memory(vram="8GiB").total
    # an "8 GB" card (the table holds what NVML reports: a few MiB under 8 GiB)
    assert usable_memory(vram="8GB").bytes == pytest.approx(usable_memory(card="RTX 4060").bytes, rel=0.002)


def test_preset_auto_does_not_change_a_resumed_run(tmp_path) -> None:
    result = _invoke(
        "--config", _config(tmp_path, SD15), "--preset", "auto", "--vram", "8GB", "--resume", "latest"
    )
    assert result.exit_code == 2 and "cannot change a run being resumed" in result.output


def test_dry_run_and_preset_auto_plan_per_gpu_with_several_processes(tmp_path) -> None:
    cfg = _config(tmp_path, SD15 + "lora_rank: 64\nbatch_size: 2\n")
    one = json.loads(_invoke("--config", cfg, "--dry-run", "--json", "--vram", "12GB").output)["memory"]
    two = json.loads(_invoke("--config", cfg, "--dry-run", "--json", "--vram", "12GB", "--gpus", "2").output)
    memory = two["memory"]
    assert memory["processes"] == 2 and memory["breakdown"]["ddp_buckets"] > 0
    assert memory["predicted_peak_bytes"] == one["predicted_peak_bytes"] + memory["breakdown"]["ddp_buckets"]
    assert two["processes"]["memory_is_per_gpu"] is True


def test_nothing_fits_with_fixed_keys_says_what_releasing_them_would_give(tmp_path) -> None:
    body = SD15 + "batch_size: 4\n"
    fixed = (
        "--set",
        "gradient_checkpointing=false",
        "--set",
        "cache_latents=false",
        "--set",
        "lora_rank=128",
    )
    result = _invoke(
        "--config", _config(tmp_path, body), "--preset", "auto", "--vram", "4GB", *fixed, "--dry-run"
    )
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "nothing fits" in text and "would fit if you let the planner change" in text
    smallest = text.split("the smallest option (")[1].split(")")[0]
    # the smallest option named keeps every key the user fixed
    assert "gradient_checkpointing" not in smallest and "cache_latents" not in smallest
    assert "lora_rank" not in smallest


def test_a_config_continuing_a_lora_keeps_its_rank() -> None:
    from loratui.config import TrainConfig
    from loratui.memory.recommend import search_space

    cfg = TrainConfig(
        base_model="runwayml/stable-diffusion-v1-5",
        task_type="image-generation",
        train_data_dir=".",
        lora_rank=32,
        init_lora="old.safetensors",
    )
    assert search_space(cfg, "sd", "sd15", "cuda").axes["lora_rank"] == [32]


def test_dry_run_lists_the_image_options_and_their_memory(tmp_path, monkeypatch) -> None:
    """The block shows each option's value and the prediction minus the prediction with it at its default.
    (The planner is replaced by a cheap stand-in that only reads the network type: tracing a LoKr fit takes
    half a minute; the planner's own network-type figures are tested with the adapter types.)"""
    from loratui.memory import estimate as estimate_module

    real = estimate_module.estimate_peak
    extra = {"lora": 0, "lokr": 7 * 1024 * 1024}

    def stand_in(resolved, **kwargs):
        cfg = getattr(resolved, "config", resolved)
        found = real(replace(resolved, config=cfg.model_copy(update={"network_type": "lora"})), **kwargs)
        return replace(found, total_bytes=found.total_bytes + extra[cfg.network_type])

    monkeypatch.setattr(estimate_module, "estimate_peak", stand_in)
    body = SD15 + "network_type: lokr\nv_parameterization: true\nzero_terminal_snr: true\n"
    cfg = _config(tmp_path, body)
    result = _invoke("--config", cfg, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    rows = {row["key"]: row for row in json.loads(result.output)["memory"]["options"]}
    assert rows["network_type"]["value"] == "lokr" and not rows["network_type"]["default"]
    assert rows["network_type"]["memory_delta_bytes"] == 7 * 1024 * 1024
    assert rows["zero_terminal_snr"]["value"] is True and rows["zero_terminal_snr"]["memory_delta_bytes"] == 0
    assert rows["prediction_type"]["value"] == "v_prediction"
    assert rows["prediction_type"]["memory_delta_bytes"] == 0
    assert rows["optimizer"]["default"] and rows["optimizer"]["memory_delta_bytes"] is None
    text = _invoke("--config", cfg, "--dry-run").output
    block = text[text.index("options (memory each adds") :]
    assert "network type" in block and "lokr" in block and "+7.0 MiB" in block
    assert "zero terminal SNR" in block and "no memory change" in block
    assert "prediction" in block and "v_prediction" in block
    llm = _invoke("--config", _config(tmp_path, LLAMA), "--dry-run").output
    assert "options (memory each adds" not in llm  # an image-run block


def test_options_block_is_driven_by_its_table(tmp_path, monkeypatch) -> None:
    from loratui.memory import integration

    monkeypatch.setattr(
        integration, "IMAGE_OPTIONS", (("lora_rank", "rank"), ("not_a_key_yet", "future option"))
    )
    resolved = load_config(_config(tmp_path, SD15 + "lora_rank: 32\n"))
    total = estimate_peak(resolved, device="cpu").total_bytes
    rows = integration.option_rows(resolved, total, device="cpu")
    assert [row["key"] for row in rows] == ["lora_rank"]  # keys the config lacks are skipped
    at_8 = estimate_peak(load_config(_config(tmp_path, SD15 + "lora_rank: 8\n")), device="cpu").total_bytes
    assert rows[0]["memory_delta_bytes"] == total - at_8 > 0
    assert integration.option_lines(rows)[1].split()[:2] == ["rank", "32"]


def test_dry_run_reads_the_v_pred_marker_of_a_single_file(tmp_path) -> None:
    from loratui.memory.integration import option_rows

    header = {
        "conditioner.embedders.1.model.ln_final.weight": {
            "dtype": "F32",
            "shape": [1],
            "data_offsets": [0, 4],
        },
        "model.diffusion_model.out.2.bias": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
        "v_pred": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]},
        "ztsnr": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]},
    }
    raw = json.dumps(header).encode()
    model = tmp_path / "noob.safetensors"
    model.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 8)
    resolved = load_config(_config(tmp_path, f"base_model: {model}\nresolution: 1024\n"))
    rows = {row["key"]: row for row in option_rows(resolved, 0, device="cpu")}
    assert rows["prediction_type"]["shown"] == "auto: v_prediction (v_pred key)"
    assert rows["zero_terminal_snr"]["shown"] == "auto: on (ztsnr key)"
