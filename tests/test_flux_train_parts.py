"""Tiny Flux models, loading a diffusers folder into FluxParts, and sampling through the pipeline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from loratui.models.flux.loading import FluxLoadError, folder_variant, load_flux
from loratui.models.flux.pipeline import build_pipeline, default_sample_settings, generate
from loratui.tiny_models import build_tiny_flux, is_tiny_model, read_marker
from loratui.tiny_models.flux import tiny_flux_config


def test_tiny_configs_keep_the_real_architecture() -> None:
    dev, schnell, chroma = (tiny_flux_config(v) for v in ("dev", "schnell", "chroma"))
    assert dev["transformer"]["class"] == "FluxTransformer2DModel"
    assert dev["transformer"]["config"]["guidance_embeds"] is True
    assert schnell["transformer"]["config"]["guidance_embeds"] is False
    assert chroma["transformer"]["class"] == "ChromaTransformer2DModel"
    assert "text_encoder_2" not in chroma
    for config in (dev, schnell, chroma):
        transformer = config["transformer"]["config"]
        assert sum(transformer["axes_dims_rope"]) == transformer["attention_head_dim"]
        assert config["vae"]["latent_channels"] == 16
        assert transformer["in_channels"] == 64  # 16 channels x 2x2 patches


def test_tiny_build_is_idempotent_and_labelled(tiny_flux_dev: Path, tmp_path: Path) -> None:
    assert is_tiny_model(tiny_flux_dev)
    marker = read_marker(tiny_flux_dev)
    assert marker["settings"] == {"variant": "dev", "seed": 0}
    stamp = (tiny_flux_dev / "transformer" / "config.json").stat().st_mtime_ns
    assert build_tiny_flux(tiny_flux_dev, "dev") == tiny_flux_dev
    assert (tiny_flux_dev / "transformer" / "config.json").stat().st_mtime_ns == stamp
    user_folder = tmp_path / "mine"
    user_folder.mkdir()
    (user_folder / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        build_tiny_flux(user_folder, "dev")
    assert (user_folder / "notes.txt").read_text() == "keep"


@pytest.mark.parametrize("variant", ["dev", "schnell", "chroma"])
def test_load_folder_into_parts(variant: str, tiny_flux) -> None:
    folder = tiny_flux(variant)
    assert folder_variant(folder) == variant
    parts = load_flux(folder, dtype=torch.float32)
    assert parts.variant == variant
    assert parts.vae.config.latent_channels == 16
    assert parts.has_guidance == (variant == "dev")
    assert (parts.clip is None) == (variant == "chroma")
    assert type(parts.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert not any(p.requires_grad for m in parts.modules().values() for p in m.parameters())
    ids = parts.t5_tokenizer(["a photo of a cat"], padding="max_length", max_length=16).input_ids[0]
    assert ids[:5] != [parts.t5_tokenizer.unk_token_id] * 5 and ids[-1] == parts.t5_tokenizer.pad_token_id
    assert parts.default_t5_max_length <= parts.t5_tokenizer.model_max_length


def test_pipeline_samples_are_seeded_and_follow_the_weights(tiny_flux_dev: Path) -> None:
    parts = load_flux(tiny_flux_dev)
    settings = default_sample_settings(parts, height=32, width=32, steps=2, seed=3)
    pipe = build_pipeline(parts)
    assert pipe.transformer is parts.transformer  # the live modules, not copies
    first = np.asarray(generate(parts, ["a red square"], settings, pipe)[0], dtype=np.float32)
    again = np.asarray(generate(parts, ["a red square"], settings, pipe)[0], dtype=np.float32)
    assert first.shape == (32, 32, 3)
    np.testing.assert_array_equal(first, again)
    with torch.no_grad():
        parts.transformer.proj_out.bias.add_(0.5)
    changed = np.asarray(generate(parts, ["a red square"], settings, pipe)[0], dtype=np.float32)
    assert np.abs(changed - first).max() > 0


def test_chroma_pipeline_generates(tiny_flux) -> None:
    parts = load_flux(tiny_flux("chroma"))
    settings = default_sample_settings(parts, height=32, width=32, steps=2)
    assert settings.guidance_scale == 1.0
    (image,) = generate(parts, ["a blue circle"], settings)
    assert image.size == (32, 32)


def test_folder_errors_name_what_is_missing(tiny_flux_dev: Path, tmp_path: Path) -> None:
    no_t5 = tmp_path / "no_t5"
    shutil.copytree(tiny_flux_dev, no_t5)
    shutil.rmtree(no_t5 / "text_encoder_2")
    with pytest.raises(FluxLoadError, match="T5-XXL"):
        load_flux(no_t5)
    with pytest.raises(FluxLoadError, match="separate files"):
        load_flux(tiny_flux_dev, t5xxl=tmp_path / "t5.safetensors")
    sd_like = tmp_path / "sd"
    sd_like.mkdir()
    (sd_like / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (sd_like / "transformer").mkdir()
    (sd_like / "transformer" / "config.json").write_text("{}")
    with pytest.raises(FluxLoadError, match="not a Flux pipeline"):
        load_flux(sd_like)
    with pytest.raises(FluxLoadError, match="not found"):
        load_flux(tmp_path / "nowhere")
