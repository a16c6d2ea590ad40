"""Flux base models from the files users have: original-layout transformer, fp8, separate ae/clip_l/t5xxl
files, all-in-one checkpoints; every tensor and the transformer's output compared with the diffusers folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loratui.config.base_model import inspect_base_model
from loratui.models.flux.detect import inspect_flux_file
from loratui.models.flux.single_file import (
    load_flux_single_file,
    write_single_files_from_folder,
)


def _folder_modules(folder: Path) -> dict[str, torch.nn.Module]:
    import diffusers
    import transformers

    chroma = (folder / "transformer" / "config.json").read_text().count("Chroma") > 0
    cls = diffusers.ChromaTransformer2DModel if chroma else diffusers.FluxTransformer2DModel
    out = {
        "transformer": cls.from_pretrained(folder / "transformer"),
        "vae": diffusers.AutoencoderKL.from_pretrained(folder / "vae"),
        "t5": transformers.T5EncoderModel.from_pretrained(
            folder / ("text_encoder" if chroma else "text_encoder_2")
        ),
    }
    if not chroma:
        out["clip"] = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder")
    return out


def _assert_same(parts, reference: dict[str, torch.nn.Module], cast=None) -> None:
    loaded = parts.modules()
    assert set(loaded) == set(reference)
    for name, module in reference.items():
        want = module.state_dict()
        got = loaded[name].state_dict()
        assert set(got) == set(want), name
        for key, tensor in want.items():
            expected = cast(key, tensor) if cast and name == "transformer" else tensor
            assert torch.equal(got[key].to(expected.dtype), expected), f"{name}: {key}"


def _transformer_output(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    config = model.config
    hidden = torch.randn(1, 16, config.in_channels, generator=g)
    text = torch.randn(1, 6, config.joint_attention_dim, generator=g)
    img_ids = torch.stack(
        torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1
    ).reshape(-1, 3)
    kwargs = dict(
        hidden_states=hidden,
        encoder_hidden_states=text,
        timestep=torch.tensor([0.7]),
        img_ids=img_ids,
        txt_ids=torch.zeros(6, 3),
        return_dict=False,
    )
    if hasattr(config, "pooled_projection_dim"):
        kwargs["pooled_projections"] = torch.randn(1, config.pooled_projection_dim, generator=g)
        if config.guidance_embeds:
            kwargs["guidance"] = torch.tensor([2.0])
    with torch.no_grad():
        return model(**kwargs)[0]


@pytest.mark.parametrize("variant", ["dev", "schnell", "chroma"])
def test_separate_files_load_like_the_folder(variant, tiny_flux, tmp_path):
    folder = tiny_flux(variant)
    paths = write_single_files_from_folder(folder, tmp_path)
    info = inspect_flux_file(paths["transformer"])
    assert (info.kind, info.layout, info.variant, info.parts) == ("transformer", "original", variant, {})
    with safe_open(str(paths["transformer"]), "pt") as handle:
        keys = set(handle.keys())
    assert "double_blocks.0.img_attn.qkv.weight" in keys and "single_blocks.1.linear1.weight" in keys
    assert ("guidance_in.in_layer.weight" in keys) == (variant == "dev")

    parts = load_flux_single_file(
        paths["transformer"],
        vae=paths["vae"],
        clip_l=paths.get("clip_l"),
        t5xxl=paths["t5xxl"],
        dtype=torch.float32,
    )
    reference = _folder_modules(folder)
    assert parts.variant == variant
    _assert_same(parts, reference)
    torch.testing.assert_close(
        _transformer_output(parts.transformer),
        _transformer_output(reference["transformer"]),
        atol=1e-6,
        rtol=0,
    )
    assert not any(p.requires_grad for m in parts.modules().values() for p in m.parameters())
    assert type(parts.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    prompt = "a photo of a cat"
    t5_tok = "tokenizer" if variant == "chroma" else "tokenizer_2"
    import transformers

    assert (
        parts.t5_tokenizer(prompt).input_ids
        == transformers.T5TokenizerFast.from_pretrained(str(folder / t5_tok))(prompt).input_ids
    )
    if variant != "chroma":
        assert (
            parts.clip_tokenizer(prompt).input_ids
            == transformers.CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))(prompt).input_ids
        )


def test_all_in_one_checkpoint(tiny_flux_dev, tmp_path):
    paths = write_single_files_from_folder(tiny_flux_dev, tmp_path, all_in_one="flux1-dev-aio.safetensors")
    path = paths["transformer"]
    with safe_open(str(path), "pt") as handle:
        prefixes = {k.split(".", 2)[0] + "." + k.split(".", 2)[1] for k in handle.keys()}  # noqa: SIM118
    assert {"model.diffusion_model", "text_encoders.clip_l", "text_encoders.t5xxl"} <= prefixes
    info = inspect_flux_file(path)
    assert info.all_in_one and info.prefix == "model.diffusion_model."
    assert info.parts == {
        "vae": "vae.",
        "clip_l": "text_encoders.clip_l.transformer.",
        "t5xxl": "text_encoders.t5xxl.transformer.",
    }
    model = inspect_base_model(str(path))
    assert (model.kind, model.family, model.variant) == ("flux-checkpoint", "flux", "dev")
    assert "also holds vae, clip_l, t5xxl" in model.notes

    parts = load_flux_single_file(path, dtype=torch.float32)
    reference = _folder_modules(tiny_flux_dev)
    _assert_same(parts, reference)
    assert model.params == sum(p.numel() for p in reference["transformer"].parameters())


def test_fp8_files_upcast_or_kept(tiny_flux_dev, tmp_path):
    paths = write_single_files_from_folder(tiny_flux_dev, tmp_path, fp8=True)
    assert paths["t5xxl"].name == "t5xxl_fp8_e4m3fn.safetensors"
    info = inspect_flux_file(paths["transformer"])
    assert info.fp8 and not info.scaled_fp8
    assert "fp8 weights" in inspect_base_model(str(paths["transformer"])).notes
    files = dict(vae=paths["vae"], clip_l=paths["clip_l"], t5xxl=paths["t5xxl"])

    def through_fp8(key, tensor):
        return tensor.to(torch.float8_e4m3fn).to(tensor.dtype) if tensor.ndim >= 2 else tensor

    upcast = load_flux_single_file(paths["transformer"], dtype=torch.float32, **files)
    reference = _folder_modules(tiny_flux_dev)
    _assert_same(
        upcast,
        {"transformer": reference["transformer"]}
        | {k: v for k, v in reference.items() if k in ("vae", "clip")}
        | {"t5": upcast.t5},
        cast=through_fp8,
    )
    assert all(p.dtype == torch.float32 for p in upcast.transformer.parameters())

    kept = load_flux_single_file(paths["transformer"], dtype=torch.bfloat16, fp8_weights=True, **files)
    weights = dict(kept.transformer.named_parameters())
    assert weights["single_transformer_blocks.0.attn.to_q.weight"].dtype == torch.float8_e4m3fn
    assert weights["single_transformer_blocks.0.attn.to_q.bias"].dtype == torch.bfloat16
    assert weights["transformer_blocks.0.attn.norm_q.weight"].dtype == torch.bfloat16
    for name, tensor in upcast.transformer.state_dict().items():
        assert torch.equal(
            weights[name].to(torch.float32),
            tensor.to(torch.bfloat16).to(torch.float32) if weights[name].dtype == torch.bfloat16 else tensor,
        ), name


def test_scaled_fp8_and_diffusers_layout_transformer(tiny_flux_dev, tmp_path):
    paths = write_single_files_from_folder(tiny_flux_dev, tmp_path)
    files = dict(vae=paths["vae"], clip_l=paths["clip_l"], t5xxl=paths["t5xxl"])
    state = load_file(str(paths["transformer"]))
    scaled = {}
    for key, tensor in state.items():
        if tensor.ndim >= 2:
            scale = tensor.abs().max() / 200
            scaled[key] = (tensor / scale).to(torch.float8_e4m3fn)
            scaled[key[: -len(".weight")] + ".scale_weight"] = scale.reshape(1)
        else:
            scaled[key] = tensor
    scaled["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    save_file(scaled, str(tmp_path / "flux1-dev-fp8-scaled.safetensors"))
    info = inspect_flux_file(tmp_path / "flux1-dev-fp8-scaled.safetensors")
    assert info.scaled_fp8 and info.variant == "dev"
    parts = load_flux_single_file(tmp_path / "flux1-dev-fp8-scaled.safetensors", dtype=torch.float32, **files)
    from loratui.models.flux.layout import original_to_diffusers

    expected = original_to_diffusers(
        {
            k: (v.float() * scaled[k[:-7] + ".scale_weight"].float() if v.ndim >= 2 else v)
            for k, v in scaled.items()
            if not k.endswith(".scale_weight") and k != "scaled_fp8"
        }
    )
    for key, tensor in parts.transformer.state_dict().items():
        assert torch.equal(tensor, expected[key]), key

    diffusers_file = tmp_path / "diffusers" / "diffusion_pytorch_model.safetensors"
    diffusers_file.parent.mkdir()
    shutil.copy(tiny_flux_dev / "transformer" / "diffusion_pytorch_model.safetensors", diffusers_file)
    info = inspect_flux_file(diffusers_file)
    assert (info.layout, info.variant) == ("diffusers", "dev")
    parts = load_flux_single_file(diffusers_file, dtype=torch.float32, **files)
    _assert_same(parts, _folder_modules(tiny_flux_dev))


def test_diffusers_folders_and_files_are_detected(tiny_flux, tmp_path):
    for variant, family in (("dev", "flux"), ("schnell", "flux"), ("chroma", "chroma")):
        folder = tiny_flux(variant)
        info = inspect_base_model(str(folder))
        assert (info.kind, info.family, info.variant) == ("diffusers-folder", family, variant)
        import diffusers

        cls = diffusers.ChromaTransformer2DModel if variant == "chroma" else diffusers.FluxTransformer2DModel
        assert info.params == sum(p.numel() for p in cls.from_pretrained(folder / "transformer").parameters())
    paths = write_single_files_from_folder(tiny_flux("dev"), tmp_path)
    kinds = {part: inspect_flux_file(path).kind for part, path in paths.items()}
    assert kinds == {"transformer": "transformer", "vae": "vae", "clip_l": "clip_l", "t5xxl": "t5xxl"}
    assert inspect_base_model(str(paths["t5xxl"])).kind == "text-encoder"


def test_single_files_sample_the_same_image_as_the_folder(tiny_flux_dev, tmp_path):
    """Through the trainer's loader (`load_flux` with vae/clip_l/t5xxl) and the sampling pipeline."""
    import numpy as np

    from loratui.models.flux.loading import load_flux
    from loratui.models.flux.pipeline import build_pipeline, default_sample_settings, generate

    paths = write_single_files_from_folder(tiny_flux_dev, tmp_path)
    images = []
    for parts in (
        load_flux(tiny_flux_dev),
        load_flux(paths["transformer"], vae=paths["vae"], clip_l=paths["clip_l"], t5xxl=paths["t5xxl"]),
    ):
        settings = default_sample_settings(parts, height=32, width=32, steps=2, seed=5)
        images.append(np.asarray(generate(parts, ["a red square"], settings, build_pipeline(parts))[0]))
    np.testing.assert_array_equal(images[0], images[1])
