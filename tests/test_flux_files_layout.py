"""The original (BFL) <-> diffusers Flux layout: sizes from shapes, exact round trips, fused slices."""

from __future__ import annotations

import pytest
import torch

from loratui.models.flux.layout import (
    FluxDims,
    LayoutError,
    diffusers_class_name,
    diffusers_config,
    diffusers_to_original,
    diffusers_to_original_slices,
    dims_from_diffusers_config,
    dims_from_original,
    kohya_module_name,
    module_maps,
    original_to_diffusers,
    rope_axes,
    strip_prefix,
)

# Widths that are not FLUX.1's 3072/12288, so any fixed-width split would fail.
FLUX_KWARGS = dict(
    patch_size=1,
    in_channels=8,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=3,
    joint_attention_dim=20,
    pooled_projection_dim=12,
    axes_dims_rope=(4, 6, 6),
)
CHROMA_KWARGS = dict(
    patch_size=1,
    in_channels=8,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=3,
    joint_attention_dim=20,
    axes_dims_rope=(4, 6, 6),
    approximator_num_channels=16,
    approximator_hidden_dim=24,
    approximator_layers=2,
)


def _flux(guidance: bool):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(**FLUX_KWARGS, guidance_embeds=guidance).eval()


def _chroma():
    from diffusers import ChromaTransformer2DModel

    torch.manual_seed(0)
    return ChromaTransformer2DModel(**CHROMA_KWARGS).eval()


def _forward(model, chroma: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    tokens, txt = 16, 5
    kwargs = dict(
        hidden_states=torch.randn(1, tokens, 8, generator=g),
        encoder_hidden_states=torch.randn(1, txt, 20, generator=g),
        timestep=torch.tensor([0.5]),
        img_ids=torch.stack(
            torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1
        ).reshape(-1, 3),
        txt_ids=torch.zeros(txt, 3),
        return_dict=False,
    )
    if not chroma:
        kwargs["pooled_projections"] = torch.randn(1, 12, generator=g)
        if model.config.guidance_embeds:
            kwargs["guidance"] = torch.tensor([3.5])
    with torch.no_grad():
        return model(**kwargs)[0]


@pytest.mark.parametrize("kind", ["dev", "schnell", "chroma"])
def test_round_trip_through_the_original_layout_is_exact(kind):
    model = _chroma() if kind == "chroma" else _flux(guidance=kind == "dev")
    state = model.state_dict()
    dims = dims_from_diffusers_config(model.config)
    original = diffusers_to_original(state, dims)

    assert dims_from_original(original) == dims
    assert dims.variant == kind
    assert original["single_blocks.0.linear1.weight"].shape == (3 * 48 + 4 * 48, 48)
    assert original["double_blocks.1.img_attn.qkv.weight"].shape == (3 * 48, 48)
    assert ("guidance_in.in_layer.weight" in original) == (kind == "dev")
    assert ("distilled_guidance_layer.norms.1.scale" in original) == (kind == "chroma")

    back = original_to_diffusers(original)
    assert set(back) == set(state)
    for key, tensor in state.items():
        assert torch.equal(back[key], tensor), key

    config = diffusers_config(dims, model.config.axes_dims_rope)
    assert diffusers_class_name(dims) == type(model).__name__
    rebuilt = type(model)(**config).eval()
    rebuilt.load_state_dict(back, strict=True)
    torch.testing.assert_close(
        _forward(rebuilt, kind == "chroma"), _forward(model, kind == "chroma"), atol=1e-6, rtol=0
    )


def test_final_layer_halves_are_swapped():
    model = _flux(guidance=True)
    state = model.state_dict()
    original = diffusers_to_original(state, dims_from_diffusers_config(model.config))
    scale, shift = state["norm_out.linear.weight"].chunk(2)
    assert torch.equal(original["final_layer.adaLN_modulation.1.weight"], torch.cat([shift, scale]))


def test_matches_diffusers_converter_at_flux1_widths():
    """At FLUX.1's widths (3072 hidden, 128 head) the split equals diffusers' own converter, row for row.

    Input columns are kept at 1 so the check is cheap: the converters only cut rows."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    dims = FluxDims(
        hidden=3072,
        head_dim=128,
        mlp_hidden=12288,
        num_double=1,
        num_single=1,
        in_channels=64,
        out_channels=64,
        context_dim=4096,
        pooled_dim=768,
        guidance=True,
    )
    g = torch.Generator().manual_seed(0)
    original: dict[str, torch.Tensor] = {}
    for m in module_maps(dims):
        rows = sum(m.widths) if m.fused else None
        for src, _ in m.params:
            if src == "scale":
                shape = (dims.head_dim,)
            elif rows is not None:
                shape = (rows, 1) if src == "weight" else (rows,)
            else:
                shape = _flux1_shape(m.original, dims, src)
            original[f"{m.original}.{src}"] = torch.randn(shape, generator=g)
    assert dims_from_original(original) == dims

    ours = original_to_diffusers(original)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(
        {f"model.diffusion_model.{k}": v for k, v in original.items()}
    )
    assert set(ours) == set(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


def _flux1_shape(original: str, dims: FluxDims, param: str) -> tuple[int, ...]:
    """Shapes of the unfused modules at FLUX.1 widths (one input column where the input size is free)."""
    h = dims.hidden
    rows_cols = {
        "img_in": (h, dims.in_channels),
        "txt_in": (h, dims.context_dim),
        "time_in.in_layer": (h, 1),
        "time_in.out_layer": (h, 1),
        "vector_in.in_layer": (h, dims.pooled_dim),
        "vector_in.out_layer": (h, 1),
        "guidance_in.in_layer": (h, 1),
        "guidance_in.out_layer": (h, 1),
        "final_layer.linear": (dims.out_channels, 1),
        "final_layer.adaLN_modulation.1": (2 * h, 1),
    }
    suffix = (
        original.split(".", 2)[-1] if original.startswith(("double_blocks", "single_blocks")) else original
    )
    block = {
        "img_attn.proj": (h, 1),
        "txt_attn.proj": (h, 1),
        "img_mlp.0": (dims.mlp_hidden, 1),
        "img_mlp.2": (h, 1),
        "txt_mlp.0": (dims.mlp_hidden, 1),
        "txt_mlp.2": (h, 1),
        "img_mod.lin": (6 * h, 1),
        "txt_mod.lin": (6 * h, 1),
        "linear2": (h, 1),
        "modulation.lin": (3 * h, 1),
    }
    rows, cols = rows_cols.get(original) or block[suffix]
    return (rows, cols) if param == "weight" else (rows,)


def test_fused_slices_cover_every_row():
    dims = dims_from_diffusers_config(_flux(guidance=True).config)
    slices = diffusers_to_original_slices(dims)
    q, k, v, mlp = (
        slices[f"single_transformer_blocks.1.{p}"]
        for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
    )
    assert {s.original for s in (q, k, v, mlp)} == {"single_blocks.1.linear1"}
    assert [(s.offset, s.width) for s in (q, k, v, mlp)] == [(0, 48), (48, 48), (96, 48), (144, 192)]
    assert q.total == 336 and mlp.index == 3 and mlp.count == 4
    add_v = slices["transformer_blocks.0.attn.add_v_proj"]
    assert (add_v.original, add_v.offset, add_v.width, add_v.total) == (
        "double_blocks.0.txt_attn.qkv",
        96,
        48,
        144,
    )
    assert slices["transformer_blocks.0.ff.net.2"].original == "double_blocks.0.img_mlp.2"
    assert slices["transformer_blocks.0.ff.net.2"].count == 1
    assert kohya_module_name("double_blocks.0.img_attn.qkv") == "lora_unet_double_blocks_0_img_attn_qkv"


def test_sizes_come_from_shapes_and_prefixes_are_found():
    assert rope_axes(128) == (16, 56, 56)
    assert sum(rope_axes(16)) == 16 and all(a % 2 == 0 for a in rope_axes(16))
    assert (
        strip_prefix(["model.diffusion_model.double_blocks.0.img_in.weight", "vae.x"])
        == "model.diffusion_model."
    )
    assert strip_prefix(["double_blocks.0.img_attn.qkv.weight"]) == ""


def test_bad_layouts_are_named():
    model = _flux(guidance=False)
    original = diffusers_to_original(model.state_dict(), dims_from_diffusers_config(model.config))
    with pytest.raises(LayoutError, match="not a Flux transformer"):
        dims_from_original({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)})
    gap = {k: v for k, v in original.items() if not k.startswith("double_blocks.0.")}
    with pytest.raises(LayoutError, match=r"double_blocks \[0\] are missing"):
        dims_from_original(gap)
    missing = dict(original)
    del missing["single_blocks.1.linear2.weight"]
    with pytest.raises(LayoutError, match="single_blocks.1.linear2.weight"):
        original_to_diffusers(missing)
    extra = dict(original, **{"lora_unet_x.alpha": torch.ones(())})
    with pytest.raises(LayoutError, match="not part of the Flux layout"):
        original_to_diffusers(extra)


@pytest.mark.parametrize("name", ["flux1-dev", "flux1-schnell", "chroma"])
def test_real_architectures_round_trip_on_the_meta_device(name):
    """FLUX.1-dev/schnell and Chroma at full size (no memory: meta tensors): the original layout's shapes give
    back exactly the shipped transformer config."""
    import json
    from importlib import resources

    import diffusers

    spec = json.loads(resources.files("loratui.models.flux").joinpath("configs", f"{name}.json").read_text())
    kwargs = spec["transformer"]["config"]
    with torch.device("meta"):
        model = getattr(diffusers, spec["transformer"]["class"])(**kwargs)
    dims = dims_from_diffusers_config(model.config)
    original = diffusers_to_original(model.state_dict(), dims)
    assert original["single_blocks.37.linear1.weight"].shape == (3072 * 3 + 12288, 3072)
    found = dims_from_original({k: v.shape for k, v in original.items()})
    assert found == dims and found.heads == 24 and found.mlp_ratio == 4.0
    rebuilt = diffusers_config(found)
    assert {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()} == rebuilt
    assert sum(v.numel() for v in original.values()) == sum(p.numel() for p in model.parameters())
