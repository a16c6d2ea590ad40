"""Flux config keys: kohya spellings, checks that need the model (resolution, blocks_to_swap, file paths), and
keys reported as doing nothing for SD / text runs, for Flux runs, and for a Flux variant."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loratui.config import load_config
from loratui.config.base_model import flux_block_count, guess_task_type, inspect_base_model
from loratui.config.errors import ConfigError
from loratui.config.loader import check_paths
from loratui.config.task_keys import FLUX_ONLY, SD_ONLY, VARIANT_KEYS, ignored_settings
from loratui.models.flux.layout import diffusers_to_original, dims_from_diffusers_config

SMALL = dict(
    patch_size=1,
    in_channels=8,
    num_layers=2,
    num_single_layers=3,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=16,
    axes_dims_rope=(2, 2, 4),
)


def _transformer_file(path: Path, variant: str) -> Path:
    """A small Flux transformer (dev, schnell or Chroma) saved in the original single-file layout."""
    import diffusers

    torch.manual_seed(0)
    if variant == "chroma":
        model = diffusers.ChromaTransformer2DModel(
            **SMALL, approximator_num_channels=8, approximator_hidden_dim=16, approximator_layers=1
        )
    else:
        model = diffusers.FluxTransformer2DModel(
            **SMALL, pooled_projection_dim=12, guidance_embeds=variant == "dev"
        )
    state = diffusers_to_original(model.state_dict(), dims_from_diffusers_config(model.config))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flux-config")
    return {v: _transformer_file(root / f"{v}.safetensors", v) for v in ("dev", "schnell", "chroma")}


def _write(tmp_path: Path, base: Path | str, text: str) -> Path:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    path = tmp_path / "c.yaml"
    path.write_text(f"base_model: {base}\ntrain_data_dir: {data}\n{text}", encoding="utf-8")
    return path


def test_flux_files_set_family_task_and_variant(flux_files, tmp_path):
    for variant, family in (("dev", "flux"), ("schnell", "flux"), ("chroma", "chroma")):
        info = inspect_base_model(str(flux_files[variant]))
        assert (info.kind, info.family, info.variant) == ("flux-checkpoint", family, variant)
        assert guess_task_type(str(flux_files[variant]), "") == "image-generation"
        resolved = load_config(_write(tmp_path, flux_files[variant], ""))
        assert resolved.family == family and resolved.config.task_type == "image-generation"
    assert flux_block_count(str(flux_files["dev"])) == (2, 3)
    resolved = load_config(_write(tmp_path, "black-forest-labs/FLUX.1-dev", "task_type: image-generation\n"))
    assert resolved.family == "flux"


def test_kohya_flux_spellings(flux_files, tmp_path):
    files = {name: tmp_path / f"{name}.safetensors" for name in ("ae", "clip_l", "t5xxl_fp16")}
    for path in files.values():
        path.write_bytes(b"")
    config = _write(
        tmp_path,
        flux_files["dev"],
        f"ae: {files['ae']}\nclip_l: {files['clip_l']}\nt5xxl: {files['t5xxl_fp16']}\n"
        "t5xxl_max_token_length: 256\nfp8_base: true\nguidance_scale: 1.0\nblocks_to_swap: 2\n",
    )
    cfg = load_config(config).config
    assert (cfg.vae, cfg.clip_l, cfg.t5xxl) == tuple(str(files[n]) for n in ("ae", "clip_l", "t5xxl_fp16"))
    assert (cfg.t5_max_length, cfg.base_weights_dtype, cfg.blocks_to_swap) == (256, "fp8", 2)
    assert (
        load_config(_write(tmp_path, flux_files["dev"], "fp8_base: false\n")).config.base_weights_dtype
        == "bf16"
    )
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, flux_files["dev"], "fp8_base: true\nbase_weights_dtype: nf4\n"))
    assert "`base_weights_dtype`: same setting as `fp8_base`" in str(err.value)


def test_resolution_must_be_a_multiple_of_16_for_flux(flux_files, tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, flux_files["dev"], "resolution: 520\n"))
    text = str(err.value)
    assert "`resolution`: 520 is not a multiple of 16" in text and "use 512 or 528" in text
    assert f"{tmp_path / 'c.yaml'}:3" in text
    sd = tmp_path / "sd.safetensors"
    sd.write_bytes(b"")
    assert (
        load_config(_write(tmp_path, sd, "resolution: 520\ntask_type: image-generation\n")).config.resolution
        == 520
    )
    explicit = _write(
        tmp_path, "some/hub-model", "model_family: flux\ntask_type: image-generation\nresolution: 776\n"
    )
    with pytest.raises(ConfigError, match="776 is not a multiple of 16"):
        load_config(explicit)


def test_blocks_to_swap_is_checked_against_the_model(flux_files, tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, flux_files["schnell"], "blocks_to_swap: 3\n"))
    assert "3 asks for 1 double and 4 single blocks in CPU memory" in str(err.value)
    assert "2 double and 3 single blocks" in str(err.value) and "use at most 2" in str(err.value)
    assert (
        load_config(_write(tmp_path, flux_files["schnell"], "blocks_to_swap: 2\n")).config.blocks_to_swap == 2
    )
    folder = tmp_path / "FLUX.1-dev"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    (folder / "transformer" / "config.json").write_text(
        json.dumps({"_class_name": "FluxTransformer2DModel", "num_layers": 19, "num_single_layers": 38})
    )
    assert flux_block_count(str(folder)) == (19, 38)
    with pytest.raises(ConfigError, match="use at most 36"):
        load_config(_write(tmp_path, folder, "blocks_to_swap: 37\n"))
    assert load_config(_write(tmp_path, folder, "blocks_to_swap: 35\n")).family == "flux"  # kohya's largest


def test_separate_file_paths_must_exist(flux_files, tmp_path):
    config = _write(
        tmp_path, flux_files["dev"], f"t5xxl: {tmp_path / 'nowhere' / 't5xxl_fp16.safetensors'}\n"
    )
    problems = check_paths(load_config(config))
    assert [(p.key, p.line) for p in problems] == [("t5xxl", 3)]
    assert "path does not exist" in problems[0].message


def test_flux_keys_reported_for_sd_and_text_runs(tmp_path):
    sd = tmp_path / "sd15.safetensors"
    sd.write_bytes(b"")
    config = _write(tmp_path, sd, "task_type: image-generation\nblocks_to_swap: 4\nt5xxl: t5.safetensors\n")
    found = {item.key: item.message() for item in ignored_settings(load_config(config))}
    assert list(found) == ["t5xxl", "blocks_to_swap"]
    assert (
        found["blocks_to_swap"].startswith("`blocks_to_swap` (config ")
        and "does nothing for SD runs" in found["blocks_to_swap"]
    )
    text = _write(tmp_path, sd, "task_type: text-generation\nbase_weights_dtype: fp8\n")
    found = {item.key: item.message() for item in ignored_settings(load_config(text))}
    assert (
        list(found) == ["base_weights_dtype"] and "does nothing for text runs" in found["base_weights_dtype"]
    )


def test_sd_keys_and_variant_keys_reported_for_flux_runs(flux_files, tmp_path):
    text = (
        "prediction_type: v_prediction\nmin_snr_gamma: 5\nguidance_scale: 3.5\nclip_l: clip_l.safetensors\n"
    )
    found = {
        i.key: i.message() for i in ignored_settings(load_config(_write(tmp_path, flux_files["dev"], text)))
    }
    assert list(found) == ["min_snr_gamma", "prediction_type"]
    assert all("does nothing for Flux runs" in m for m in found.values())

    found = {
        i.key: i.message()
        for i in ignored_settings(load_config(_write(tmp_path, flux_files["schnell"], text)))
    }
    assert (
        "guidance_scale" in found
        and "does nothing for FLUX.1-schnell: only FLUX.1-dev" in found["guidance_scale"]
    )

    text += "train_text_encoder: true\n"
    found = {
        i.key: i.message()
        for i in ignored_settings(load_config(_write(tmp_path, flux_files["chroma"], text)))
    }
    assert {"guidance_scale", "clip_l", "train_text_encoder"} <= set(found)
    assert "Chroma has no CLIP-L" in found["clip_l"]


def test_report_tables_name_schema_keys():
    from loratui.config import FIELD_NAMES

    for table in (FLUX_ONLY, SD_ONLY, VARIANT_KEYS):
        assert set(table) <= set(FIELD_NAMES)
    assert not set(FLUX_ONLY) & set(SD_ONLY)


def test_kohya_model_prediction_type(flux_files, tmp_path):
    assert (
        load_config(
            _write(tmp_path, flux_files["dev"], "model_prediction_type: raw\n")
        ).config.model_prediction_type
        == "raw"
    )
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, flux_files["dev"], "model_prediction_type: sigma_scaled\n"))
    assert (
        "`model_prediction_type`: 'sigma_scaled': the Flux trainer reads the transformer output as the flow"
        in str(err.value)
    )


def test_kohya_flux_keys_are_taken_or_reported(flux_files, tmp_path):
    from loratui.models.flux.flow_match import draw_sigma, shift_sigma

    text = (
        "timestep_sampling: sigma\ndiscrete_flow_shift: 3.1582\nnetwork_train_unet_only: true\n"
        "apply_t5_attn_mask: true\ncache_text_encoder_outputs: true\ncache_text_encoder_outputs_to_disk: true\n"
    )
    resolved = load_config(_write(tmp_path, flux_files["dev"], text))
    cfg = resolved.config
    assert (cfg.timestep_sampling, cfg.train_text_encoder, cfg.apply_t5_attn_mask) == ("sigma", False, True)
    found = {item.key: item.message() for item in ignored_settings(resolved)}
    assert "without an attention mask" in found["apply_t5_attn_mask"]
    assert "never on disk" in found["cache_text_encoder_outputs_to_disk"]
    both = load_config(_write(tmp_path, flux_files["dev"], "network_train_unet_only: false\n")).config
    assert both.train_text_encoder is True
    # kohya's `sigma`: one of the 1000 training sigmas, uniformly, shifted by discrete_flow_shift
    generator = torch.Generator().manual_seed(0)
    draws = [draw_sigma(generator, "sigma", discrete_flow_shift=3.1582) for _ in range(400)]
    grid = {round(shift_sigma(k / 1000, 3.1582), 12) for k in range(1, 1001)}
    assert all(round(d, 12) in grid for d in draws) and len(set(draws)) > 300
    assert 0.6 < sum(draws) / len(draws) < 0.8  # the shift moves the mean of U(0, 1) toward noise
