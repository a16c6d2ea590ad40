"""The memory planner, recommender, presets and OOM ladder for Flux (FLUX.1-dev from the shipped configs)."""

from __future__ import annotations

import pytest

from loratui.config import ResolvedConfig, TrainConfig
from loratui.memory.estimate import estimate_peak, planner_for
from loratui.memory.flux import max_blocks_to_swap, swap_split, transformer_bytes
from loratui.memory.integration import dry_run_lines, dry_run_prediction, tier_budget, usable_from_total
from loratui.memory.recommend import recommend
from loratui.train.oom.ladder import OomLadder, kind_of, settings_of

GIB = 2**30
BASE = {
    "task_type": "image-generation",
    "model_family": "flux",
    "resolution": 1024,
    "lora_rank": 16,
    "batch_size": 1,
    "gradient_checkpointing": True,
    "cache_latents": True,
    "cache_text_encoder_outputs": True,
}


def flux_config(**changes: object) -> TrainConfig:
    return TrainConfig(**{**BASE, **changes})


def predict(**changes: object):
    return estimate_peak(flux_config(**changes), device="cuda")


@pytest.fixture(scope="module")
def base():
    return predict()


def test_base_weights_dtype_stores_the_blocks_smaller(base) -> None:
    fp8, nf4 = predict(base_weights_dtype="fp8"), predict(base_weights_dtype="nf4")
    bf16_weights = base.breakdown["transformer_weights"]
    # FLUX.1-dev: 11.9B parameters, 11.6B of them in the blocks' Linear weights
    assert 22 * GIB < bf16_weights < 23 * GIB
    assert 10.8 * GIB < fp8.breakdown["transformer_weights"] < 11.4 * GIB
    assert 5.5 * GIB < nf4.breakdown["transformer_weights"] < 6.2 * GIB
    assert base.total_bytes > fp8.total_bytes > nf4.total_bytes
    assert any("fp8 base" in note for note in fp8.notes)


def test_block_swap_moves_blocks_off_the_device_and_adds_the_prefetch_buffer() -> None:
    # kohya sd-scripts' meaning: N // 2 double and 2 x (N - N // 2) single blocks, one of each kind resident
    assert swap_split(18, 19, 38) == (9, 18) and swap_split(35, 19, 38) == (17, 36)
    assert swap_split(40, 19, 38) == (18, 37)  # capped per kind
    assert max_blocks_to_swap(19, 38) == 36 and max_blocks_to_swap(2, 3) == 2
    # T5 and CLIP stay loaded (no caching pass), so the step is the peak however many blocks are swapped
    previous = predict(cache_text_encoder_outputs=False)
    assert "block_swap_buffer" not in previous.breakdown
    for blocks in (8, 18, 36):
        swapped = predict(blocks_to_swap=blocks, cache_text_encoder_outputs=False)
        assert swapped.total_bytes < previous.total_bytes
        assert 0 < swapped.breakdown["block_swap_buffer"] < 1.5 * GIB  # two blocks in flight
        previous = swapped
    over = predict(blocks_to_swap=60, cache_text_encoder_outputs=False)
    assert over.total_bytes <= previous.total_bytes  # each kind capped, one block of it resident
    assert any("at most 36" in note for note in over.notes)
    summary = planner_for(flux_config(), "flux").summary
    kohya_16 = transformer_bytes(summary, flux_config(blocks_to_swap=16), 2)[2]
    double, single = kohya_16["double_block_bytes"], kohya_16["single_block_bytes"]
    assert (kohya_16["swapped_double"], kohya_16["swapped_single"]) == (8, 16)
    assert kohya_16["swapped_bytes"] == 8 * double + 16 * single
    # NF4 weights stay on the device: swapping an NF4 base moves only the blocks' other tensors
    nf4 = predict(base_weights_dtype="nf4", cache_text_encoder_outputs=False)
    nf4_swapped = predict(base_weights_dtype="nf4", blocks_to_swap=36, cache_text_encoder_outputs=False)
    saved = nf4.breakdown["transformer_weights"] - nf4_swapped.breakdown["transformer_weights"]
    assert 0 < saved < 1.5 * GIB
    # with cached outputs the T5 caching pass (before training) becomes the peak of a heavily swapped run
    assert predict(blocks_to_swap=36).phase.startswith("text-encoder caching")


def test_caching_takes_the_encoders_off_the_device(base) -> None:
    uncached = predict(cache_text_encoder_outputs=False)
    assert uncached.breakdown["text_encoders"] > 9 * GIB  # T5-XXL (4.8B) + CLIP-L in bf16
    assert "text_encoders" not in base.breakdown
    no_latents = predict(cache_latents=False)
    assert 0.1 * GIB < no_latents.breakdown["vae"] < 0.5 * GIB  # the AE in fp32
    assert no_latents.total_bytes > base.total_bytes
    fp8_t5 = predict(cache_text_encoder_outputs=False, t5xxl="/m/t5xxl_fp8_e4m3fn.safetensors")
    assert fp8_t5.breakdown["text_encoders"] < 0.6 * uncached.breakdown["text_encoders"]


def test_activations_follow_checkpointing_resolution_batch_and_tokens(base) -> None:
    acts = base.breakdown["activations"]
    assert predict(gradient_checkpointing=False).breakdown["activations"] > 3 * acts
    assert predict(resolution=512).breakdown["activations"] < 0.6 * acts
    assert predict(batch_size=2).breakdown["activations"] > 1.7 * acts
    assert predict(t5_max_length=256).breakdown["activations"] < acts
    assert any("4608 tokens" in note for note in base.notes)  # (1024/16)^2 image + 512 T5 tokens


def test_lora_rank_dtype_and_optimizer(base) -> None:
    lora = base.breakdown["lora_params"]
    # rank 16 on the default targets: 4.1M parameters per rank step, fp32
    assert 0.2 * GIB < lora < 0.3 * GIB
    assert predict(lora_rank=32).breakdown["lora_params"] == 2 * lora
    assert predict(lora_dtype="bf16").breakdown["lora_params"] == lora // 2
    assert predict(optimizer="adamw8bit").breakdown["optimizer_state"] < base.breakdown["optimizer_state"] / 3


def test_recommend_on_a_12gb_card_quantises_and_swaps() -> None:
    for resolution in (512, 1024):
        resolved = ResolvedConfig(flux_config(resolution=resolution), {}, "flux")
        top = recommend(resolved, usable_from_total(12 * GIB, "12 GB").bytes, top=3)
        assert top, "nothing fits a 12 GB card"
        best = top[0].config
        assert best.base_weights_dtype in ("fp8", "nf4")
        assert best.blocks_to_swap > 0 or best.base_weights_dtype == "nf4"
        assert best.resolution == resolution  # quality kept


def test_recommend_on_a_48gb_card_keeps_the_bf16_base() -> None:
    resolved = ResolvedConfig(flux_config(), {}, "flux")
    best = recommend(resolved, tier_budget(48), top=1)[0]
    assert best.config.base_weights_dtype == "bf16" and best.config.blocks_to_swap == 0


def test_dry_run_shows_the_flux_breakdown() -> None:
    resolved = ResolvedConfig(flux_config(base_weights_dtype="fp8", blocks_to_swap=10), {}, "flux")
    prediction = dry_run_prediction(resolved, usable_from_total(16 * GIB, "16 GB"))
    text = "\n".join(dry_run_lines(prediction))
    for expected in ("transformer_weights", "block_swap_buffer", "blocks_to_swap 10", "base weights", "fp8"):
        assert expected in text
    assert prediction["fits"] is True


def test_ladder_rungs_swap_then_quantise_in_order() -> None:
    cfg = flux_config(gradient_checkpointing=False, cache_latents=False, cache_text_encoder_outputs=False)
    kind = kind_of("flux")
    settings = settings_of(cfg, kind)
    assert kind == "flux" and settings["base_weights_dtype"] == "bf16"
    rungs = OomLadder(kind, settings).remaining(settings)
    names = [r.name for r in rungs]
    assert names[:4] == ["gradient_checkpointing", "offload", "optimizer_8bit", "block_swap"]
    steps = [(r.name, r.changes) for r in rungs if r.name in ("block_swap", "quantise_base")]
    assert steps == [
        ("block_swap", {"blocks_to_swap": 6}),
        ("block_swap", {"blocks_to_swap": 12}),
        ("block_swap", {"blocks_to_swap": 18}),
        ("quantise_base", {"base_weights_dtype": "fp8"}),
        ("block_swap", {"blocks_to_swap": 24}),
        ("block_swap", {"blocks_to_swap": 30}),
        ("block_swap", {"blocks_to_swap": 36}),
        ("quantise_base", {"base_weights_dtype": "nf4"}),
    ]
    assert names.index("quantise_base") < names.index("quality")
    assert not any(r.quality for r in rungs if r.name != "quality")
    # a trainer that cannot swap blocks: the quantisation rungs still come
    blocked = OomLadder(kind, settings, unavailable={"block_swap"}).remaining(settings)
    assert "block_swap" not in [r.name for r in blocked] and "quantise_base" in [r.name for r in blocked]


def test_planner_jump_skips_to_the_rung_that_fits() -> None:
    cfg = flux_config()
    settings = settings_of(cfg, "flux")
    budget = usable_from_total(16 * GIB, "16 GB").bytes

    def fits(changed: dict[str, object]) -> bool:
        estimate = estimate_peak(cfg.model_copy(update=changed), family="flux")
        return int(estimate.total_bytes * (1 - estimate.error_band)) <= budget

    chosen = OomLadder("flux", settings).choose(settings, fits)
    applied = {k: v for rung in chosen for k, v in rung.changes.items()}
    assert chosen[-1].name in ("block_swap", "quantise_base") and len(chosen) > 1
    assert fits({**settings, **applied})


def _single_file(path, double: int, single: int):
    import torch
    from safetensors.torch import save_file

    tensors = {"img_in.weight": torch.zeros((3072, 64), dtype=torch.float8_e4m3fn)}
    tensors.update({f"double_blocks.{i}.img_attn.qkv.weight": torch.zeros(0) for i in range(double)})
    tensors.update({f"single_blocks.{i}.linear1.weight": torch.zeros(0) for i in range(single)})
    tensors["guidance_in.in_layer.weight"] = torch.zeros(0)
    save_file(tensors, str(path))
    return path


def test_a_single_file_checkpoint_is_planned_from_its_header(tmp_path, base) -> None:
    """Original-layout keys give the block counts, width and guidance embedding."""
    from loratui.memory.flux import flux_spec

    compact = flux_spec(
        flux_config(base_model=str(_single_file(tmp_path / "compact.safetensors", 15, 30))), "flux"
    )
    config = compact.configs["transformer"]["config"]
    assert (config["num_layers"], config["num_single_layers"], config["num_attention_heads"]) == (15, 30, 24)
    assert any("15 double + 30 single" in note and "F8_E4M3" in note for note in compact.notes)
    path = _single_file(tmp_path / "flux1-dev-fp8.safetensors", 19, 38)
    full = flux_spec(flux_config(base_model=str(path)), "flux")
    assert full.fingerprint == flux_spec(flux_config(), "flux").fingerprint  # the shipped FLUX.1-dev table
    assert predict(base_model=str(path)).total_bytes == base.total_bytes


def test_recommend_cli_lists_the_flux_options(tmp_path) -> None:
    from typer.testing import CliRunner

    from loratui.cli.app import app

    (tmp_path / "data").mkdir()
    config = tmp_path / "flux.yaml"
    config.write_text(
        "task_type: image-generation\nmodel_family: flux\ndata_dir: data\nresolution: 1024\n"
        "gradient_checkpointing: true\ncache_latents: true\ncache_text_encoder_outputs: true\n",
        encoding="utf-8",
    )
    result = CliRunner().invoke(
        app, ["recommend", "--config", str(config), "--vram", "12GB"], env={"COLUMNS": "250"}
    )
    assert result.exit_code == 0, result.output
    assert "does not fit" in result.output and "base_weights_dtype=fp8" in result.output
    assert "blocks_to_swap=" in result.output


def test_flux_dev_presets_are_verified_by_the_planner() -> None:
    from loratui.config.presets import load_preset, preset_names
    from loratui.memory.integration import preset_family_config

    sections = {}
    for name in preset_names():
        preset = load_preset(name)
        section = preset.families.get("flux-dev")
        if section is None:
            assert "T5-XXL" in preset.unsupported["flux-dev"]  # the reason names what does not fit
            continue
        estimate = estimate_peak(preset_family_config("flux-dev", section), device="cuda")
        assert estimate.total_bytes * 1.05 <= tier_budget(preset.vram_gb), name
        sections[preset.vram_gb] = section
    assert set(sections) == {12, 16, 24, 48, 80}
    assert sections[12]["base_weights_dtype"] in ("fp8", "nf4") and sections[12]["blocks_to_swap"] > 0
    assert sections[80]["base_weights_dtype"] == "bf16" and sections[80]["blocks_to_swap"] == 0
    assert all(s["resolution"] == 1024 for s in sections.values())


def test_a_flux_config_takes_the_flux_dev_preset_section(tmp_path) -> None:
    from loratui.config import load_config

    config = tmp_path / "x.yaml"
    config.write_text("task_type: image-generation\nmodel_family: chroma\n", encoding="utf-8")
    resolved = load_config(config, preset="12gb")
    assert resolved.sources["blocks_to_swap"] == "preset 12gb[flux-dev]"
    assert resolved.config.base_weights_dtype == "fp8"
