"""Flux LoRA export and import: kohya names with fused weights, exact both ways, read by ComfyUI and diffusers.

The models are tiny `FluxTransformer2DModel`s built from their config class with random weights; the LoRA on
them has random (non-zero) `lora_A` and `lora_B`, so every check compares real deltas.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from loratui.models.flux.kohya import (
    FluxLoraError,
    KohyaModule,
    diffusers_skipped,
    dims_of_transformer,
    from_kohya_state,
    kohya_state,
    to_kohya_modules,
)
from loratui.models.flux.layout import (
    diffusers_to_original,
    diffusers_to_original_slices,
    original_to_diffusers,
)
from loratui.models.flux.lora import DOUBLE_BLOCK_TARGETS, SINGLE_BLOCK_TARGETS
from loratui.models.flux.lora_files import (
    apply_flux_init_lora,
    read_flux_init_lora,
    read_flux_lora,
    write_flux_diffusers,
    write_flux_kohya,
)
from loratui.models.sd.kohya import KohyaInfo, LoraModule

SMALL = {
    "patch_size": 1,
    "in_channels": 4,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 12,
    "pooled_projection_dim": 10,
    "guidance_embeds": True,
    "axes_dims_rope": (2, 2, 4),
}
DOUBLE_TARGETS = list(DOUBLE_BLOCK_TARGETS)
SINGLE_TARGETS = list(SINGLE_BLOCK_TARGETS)
#: the trainer's defaults plus modules outside the blocks (the final-layer modulation is stored swapped)
ALL_TARGETS = sorted(set(DOUBLE_TARGETS + SINGLE_TARGETS + ["norm_out.linear", "x_embedder", "norm1.linear"]))


def tiny_transformer(seed: int = 0, **overrides):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**{**SMALL, **overrides}).eval()


def lora_layers(model) -> dict:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: layer for name, layer in model.named_modules() if isinstance(layer, BaseTunerLayer)}


def add_random_lora(
    model, *, rank: int, alpha: float, targets=ALL_TARGETS, seed: int = 1, name: str = "default"
):
    """A PEFT LoRA on the model with random non-zero weights; returns its modules (diffusers paths)."""
    from peft import LoraConfig

    model.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True),
        adapter_name=name,
    )
    generator = torch.Generator().manual_seed(seed)
    modules = []
    with torch.no_grad():
        for path, layer in sorted(lora_layers(model).items()):
            if name not in layer.lora_A:
                continue
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            a.copy_(torch.randn(a.shape, generator=generator) * 0.3)
            b.copy_(torch.randn(b.shape, generator=generator) * 0.3)
            modules.append(
                LoraModule("transformer", path, a.detach().clone(), b.detach().clone(), float(alpha))
            )
    return modules


def forward_inputs(model, seed: int = 3) -> dict:
    cfg = model.config
    generator = torch.Generator().manual_seed(seed)
    n_img, n_txt = 4, 3
    inputs = {
        "hidden_states": torch.randn(1, n_img, cfg.in_channels, generator=generator),
        "encoder_hidden_states": torch.randn(1, n_txt, cfg.joint_attention_dim, generator=generator),
        "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, generator=generator),
        "timestep": torch.tensor([0.5]),
        "img_ids": torch.stack(
            [torch.zeros(n_img), torch.arange(n_img) // 2, torch.arange(n_img) % 2], dim=1
        ).float(),
        "txt_ids": torch.zeros(n_txt, 3),
    }
    if cfg.guidance_embeds:
        inputs["guidance"] = torch.tensor([3.5])
    return inputs


def run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def delta(module: LoraModule | KohyaModule) -> torch.Tensor:
    return module.up.float() @ module.down.float() * (module.alpha / module.rank)


def merged(base: dict[str, torch.Tensor], modules: list[LoraModule]) -> dict[str, torch.Tensor]:
    """The base weights with each PEFT module's delta added (what the LoRA means)."""
    out = {k: v.clone() for k, v in base.items()}
    for module in modules:
        out[f"{module.path}.weight"] += delta(module)
    return out


@pytest.fixture(scope="module")
def tiny_with_lora():
    model = tiny_transformer()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    modules = add_random_lora(model, rank=4, alpha=8.0)
    return model, base, modules


# --- ComfyUI's loader (facts from its source) ----------------------------------------------------------------


def comfy_diffusers_key_map(num_double: int, num_single: int, hidden: int) -> dict[str, tuple]:
    """ComfyUI's mapping of diffusers-format Flux LoRA keys to the original weights, restated from
    comfyanonymous/ComfyUI `comfy/utils.py` `flux_to_diffusers` (used by `comfy/lora.py`
    `model_lora_keys_unet` for Flux models as `transformer.<diffusers key>`):

    - double block N: `attn.to_q/to_k/to_v` are rows (0, H), (H, H), (2H, H) of `double_blocks.N.img_attn.qkv`;
      `attn.add_q_proj/add_k_proj/add_v_proj` the same rows of `txt_attn.qkv`; `attn.to_out.0` -> `img_attn.proj`,
      `attn.to_add_out` -> `txt_attn.proj`, `ff.net.0.proj` -> `img_mlp.0`, `ff.net.2` -> `img_mlp.2`,
      `ff_context.net.0.proj` -> `txt_mlp.0`, `ff_context.net.2` -> `txt_mlp.2`, `norm1.linear` -> `img_mod.lin`,
      `norm1_context.linear` -> `txt_mod.lin`;
    - single block N: `attn.to_q/to_k/to_v` rows (0, H), (H, H), (2H, H) and `proj_mlp` rows (3H, 4H) of
      `single_blocks.N.linear1`; `proj_out` -> `linear2`; `norm.linear` -> `modulation.lin`;
    - `x_embedder` -> `img_in`, `context_embedder` -> `txt_in`, `proj_out` -> `final_layer.linear`,
      `time_text_embed.timestep_embedder.linear_1/2` -> `time_in.in_layer/out_layer`, `text_embedder` ->
      `vector_in`, `guidance_embedder` -> `guidance_in`, `norm_out.linear` -> `final_layer.adaLN_modulation.1`
      with `swap_scale_shift` applied to the delta.

    Values: (original module, (row offset, rows) or None, swap halves).
    """
    h = hidden
    out: dict[str, tuple] = {}
    for i in range(num_double):
        d, o = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for j, part in enumerate(("to_q", "to_k", "to_v")):
            out[f"{d}attn.{part}"] = (f"{o}img_attn.qkv", (j * h, h), False)
        for j, part in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
            out[f"{d}attn.{part}"] = (f"{o}txt_attn.qkv", (j * h, h), False)
        for src, dst in (
            ("attn.to_out.0", "img_attn.proj"),
            ("attn.to_add_out", "txt_attn.proj"),
            ("ff.net.0.proj", "img_mlp.0"),
            ("ff.net.2", "img_mlp.2"),
            ("ff_context.net.0.proj", "txt_mlp.0"),
            ("ff_context.net.2", "txt_mlp.2"),
            ("norm1.linear", "img_mod.lin"),
            ("norm1_context.linear", "txt_mod.lin"),
        ):
            out[d + src] = (o + dst, None, False)
    for i in range(num_single):
        d, o = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for j, part in enumerate(("attn.to_q", "attn.to_k", "attn.to_v")):
            out[d + part] = (f"{o}linear1", (j * h, h), False)
        out[f"{d}proj_mlp"] = (f"{o}linear1", (3 * h, 4 * h), False)
        out[f"{d}proj_out"] = (f"{o}linear2", None, False)
        out[f"{d}norm.linear"] = (f"{o}modulation.lin", None, False)
    for src, dst in (
        ("x_embedder", "img_in"),
        ("context_embedder", "txt_in"),
        ("proj_out", "final_layer.linear"),
        ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
        ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
        ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
        ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
        ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
        ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
    ):
        out[src] = (dst, None, False)
    out["norm_out.linear"] = ("final_layer.adaLN_modulation.1", None, True)
    return out


COMFY_LORA_SUFFIXES = (".lora_up.weight", ".lora_down.weight", ".alpha")  # comfy/lora.py load_lora, "regular"


def comfy_swap_scale_shift(weight: torch.Tensor) -> torch.Tensor:
    shift, scale = weight.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def comfy_apply_kohya(
    original: dict[str, torch.Tensor], lora: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """ComfyUI on a kohya file: `lora_unet_<original key with . as _>` names `diffusion_model.<key>.weight`
    (comfy/lora.py `model_lora_keys_unet`); the patch is `alpha / lora_down.shape[0] * lora_up @ lora_down`
    (`calculate_weight`, "lora"); a key no module consumes is reported as "lora key not loaded"."""
    key_map = {
        "lora_unet_" + k.removesuffix(".weight").replace(".", "_"): k
        for k in original
        if k.endswith(".weight")
    }
    out = {k: v.clone() for k, v in original.items()}
    consumed = set()
    for name, weight_key in key_map.items():
        if f"{name}.lora_up.weight" not in lora:
            continue
        up, down = lora[f"{name}.lora_up.weight"], lora[f"{name}.lora_down.weight"]
        alpha = lora[f"{name}.alpha"].item() / down.shape[0] if f"{name}.alpha" in lora else 1.0
        out[weight_key] += alpha * (up.float() @ down.float()).reshape(out[weight_key].shape)
        consumed.update(f"{name}{suffix}" for suffix in COMFY_LORA_SUFFIXES if f"{name}{suffix}" in lora)
    not_loaded = sorted(set(lora) - consumed)
    assert not not_loaded, f"ComfyUI would not load: {not_loaded[:5]}"
    return out


def comfy_apply_diffusers(original: dict, lora: dict, key_map: dict) -> dict:
    """ComfyUI on a diffusers-format file (`transformer.<path>.lora_B/lora_A.weight`, no alpha: scale 1)."""
    out = {k: v.clone() for k, v in original.items()}
    consumed = set()
    for path, (dst, rows, swap) in key_map.items():
        b_key, a_key = f"transformer.{path}.lora_B.weight", f"transformer.{path}.lora_A.weight"
        if b_key not in lora:
            continue
        diff = lora[b_key].float() @ lora[a_key].float()
        if swap:
            diff = comfy_swap_scale_shift(diff)
        target = out[f"{dst}.weight"]
        if rows is None:
            target += diff
        else:
            target.narrow(0, rows[0], rows[1]).add_(diff)
        consumed.update((a_key, b_key))
    assert set(lora) == consumed, sorted(set(lora) - consumed)[:5]
    return out


def test_comfyui_diffusers_key_facts_agree_with_the_layout():
    """Every diffusers linear module sits where ComfyUI's own mapping puts it (same original, same rows)."""
    model = tiny_transformer()
    dims = dims_of_transformer(model)
    comfy = comfy_diffusers_key_map(dims.num_double, dims.num_single, dims.hidden)
    ours = diffusers_to_original_slices(dims)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears == set(comfy) == set(ours)
    for path, (original, rows, _swap) in comfy.items():
        where = ours[path]
        assert where.original == original, path
        if rows is not None:
            assert (where.offset, where.width) == rows, path
        else:
            assert where.count == 1, path


def test_kohya_export_is_exact_for_comfyui_and_round_trips(tiny_with_lora, tmp_path):
    model, base, modules = tiny_with_lora
    dims = dims_of_transformer(model)
    kohya = to_kohya_modules(modules, dims)
    fused = {m.name: m for m in kohya}
    qkv = fused["lora_unet_double_blocks_0_img_attn_qkv"]
    assert qkv.rank == 12 and qkv.alpha == pytest.approx(24.0)  # 3 parts of rank 4, scale 8/4 kept
    linear1 = fused["lora_unet_single_blocks_1_linear1"]
    assert tuple(linear1.up.shape) == (7 * dims.hidden, 16)
    assert torch.count_nonzero(linear1.up[: dims.hidden, 4:]) == 0  # block-diagonal

    path = write_flux_kohya(
        tmp_path / "lora.safetensors",
        modules,
        dims,
        KohyaInfo(name="lora", family="flux", rank=4, alpha=8),
        "dev",
    )
    from safetensors.torch import load_file

    state = load_file(str(path))
    original = diffusers_to_original({k: v for k, v in base.items()}, dims)
    patched = comfy_apply_kohya(original, state)
    expected = merged(base, modules)
    for key, value in original_to_diffusers(patched, dims).items():
        torch.testing.assert_close(value, expected[key], atol=1e-5, rtol=1e-5, msg=key)

    back = read_flux_lora(path, dims=dims)
    assert back.fmt == "kohya" and back.variant == "dev"
    assert {m.path for m in back.modules} == {m.path for m in modules}
    by_path = {m.path: m for m in back.modules}
    for module in modules:
        again = by_path[module.path]
        assert again.rank == module.rank
        if module.path not in ("proj_out", "norm_out.linear"):  # the final layer is written at scale 1
            assert again.alpha == pytest.approx(module.alpha)
        torch.testing.assert_close(delta(again), delta(module), atol=1e-6, rtol=1e-5)


def test_diffusers_format_is_read_the_same_by_comfyui_and_loratui(tiny_with_lora, tmp_path):
    model, base, modules = tiny_with_lora
    dims = dims_of_transformer(model)
    path = write_flux_diffusers(tmp_path / "pytorch_lora_weights.safetensors", modules, "dev")
    from safetensors.torch import load_file

    state = load_file(str(path))
    assert not any(k.endswith(".alpha") for k in state)
    comfy = comfy_diffusers_key_map(dims.num_double, dims.num_single, dims.hidden)
    patched = comfy_apply_diffusers(diffusers_to_original(base, dims), state, comfy)
    expected = merged(base, modules)
    for key, value in original_to_diffusers(patched, dims).items():
        torch.testing.assert_close(value, expected[key], atol=1e-5, rtol=1e-5, msg=key)
    back = {m.path: m for m in read_flux_lora(path).modules}
    for module in modules:
        torch.testing.assert_close(delta(back[module.path]), delta(module), atol=1e-6, rtol=1e-5)


# --- files from other trainers ------------------------------------------------------------------------------------


def test_shared_down_and_partial_groups_import_exactly():
    """kohya's default Flux training shares one down for q, k, v (and for linear1's four parts); a group
    trained only in part leaves the other parts' rows zero. Both split exactly, with the ranks they really have."""
    model = tiny_transformer()
    dims = dims_of_transformer(model)
    h = dims.hidden
    g = torch.Generator().manual_seed(5)
    state = {
        "lora_unet_double_blocks_1_img_attn_qkv.lora_down.weight": torch.randn(6, h, generator=g),
        "lora_unet_double_blocks_1_img_attn_qkv.lora_up.weight": torch.randn(3 * h, 6, generator=g),
        "lora_unet_double_blocks_1_img_attn_qkv.alpha": torch.tensor(3.0),
        "lora_unet_single_blocks_0_linear1.lora_down.weight": torch.randn(6, h, generator=g),
        "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.randn(7 * h, 6, generator=g),
        "lora_unet_single_blocks_0_linear1.alpha": torch.tensor(6.0),
    }
    partial = torch.zeros(3 * h, 4)  # to_q (rank 2) and to_v (rank 2) trained, to_k not
    partial[:h, :2] = torch.randn(h, 2, generator=g)
    partial[2 * h :, 2:] = torch.randn(h, 2, generator=g)
    state["lora_unet_double_blocks_0_txt_attn_qkv.lora_down.weight"] = torch.randn(4, h, generator=g)
    state["lora_unet_double_blocks_0_txt_attn_qkv.lora_up.weight"] = partial
    state["lora_unet_double_blocks_0_txt_attn_qkv.alpha"] = torch.tensor(4.0)

    found = from_kohya_state(state, dims)
    assert not found.unknown and not found.problems
    parts = {m.path: m for m in found.modules}
    assert set(parts) == {
        *(f"transformer_blocks.1.attn.{p}" for p in ("to_q", "to_k", "to_v")),
        *(f"single_transformer_blocks.0.{p}" for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
        "transformer_blocks.0.attn.add_q_proj",
        "transformer_blocks.0.attn.add_v_proj",
    }
    assert parts["transformer_blocks.1.attn.to_k"].rank == 6  # the shared down, whole
    assert parts["transformer_blocks.0.attn.add_v_proj"].rank == 2  # its own block only
    for name, rows in (
        ("lora_unet_double_blocks_1_img_attn_qkv", ["to_q", "to_k", "to_v"]),
        ("lora_unet_double_blocks_0_txt_attn_qkv", ["add_q_proj", "add_k_proj", "add_v_proj"]),
    ):
        whole = KohyaModule(
            name,
            state[f"{name}.lora_down.weight"],
            state[f"{name}.lora_up.weight"],
            state[f"{name}.alpha"].item(),
        )
        block = 1 if "double_blocks_1" in name else 0
        pieces = [
            delta(parts[f"transformer_blocks.{block}.attn.{p}"])
            if f"transformer_blocks.{block}.attn.{p}" in parts
            else torch.zeros(h, h)
            for p in rows
        ]
        torch.testing.assert_close(torch.cat(pieces), delta(whole), atol=1e-5, rtol=1e-5)
    name = "lora_unet_single_blocks_0_linear1"
    whole = KohyaModule(name, state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"], 6.0)
    pieces = [
        delta(parts[f"single_transformer_blocks.0.{p}"])
        for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
    ]
    torch.testing.assert_close(torch.cat(pieces), delta(whole), atol=1e-5, rtol=1e-5)


def test_files_that_do_not_fit_are_refused_with_what_differs(tmp_path):
    from safetensors.torch import save_file

    dims = dims_of_transformer(tiny_transformer())
    h = dims.hidden
    wrong_width = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(4, h),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(3 * h + 3, 4),
    }
    found = from_kohya_state(wrong_width, dims)
    assert found.problems == [
        f"double_blocks.0.img_attn.qkv has {3 * h + 3} output rows in the file, {3 * h} ({h}+{h}+{h}) in this model"
    ]

    t5 = {"lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": torch.randn(2, 8)}
    t5["lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight"] = torch.randn(8, 2)
    t5["lora_unet_double_blocks_0_img_attn_proj.lora_down.weight"] = torch.randn(2, h)
    t5["lora_unet_double_blocks_0_img_attn_proj.lora_up.weight"] = torch.randn(h, 2)
    save_file(t5, tmp_path / "t5.safetensors")
    with pytest.raises(FluxLoraError, match="lora_te2_encoder_block_0_layer_0_SelfAttention_q"):
        read_flux_lora(tmp_path / "t5.safetensors", dims=dims)

    lokr = {"lora_unet_double_blocks_0_img_attn_proj.lokr_w1": torch.randn(2, 2)}
    save_file(lokr, tmp_path / "lokr.safetensors")
    with pytest.raises(FluxLoraError, match="lokr"):
        read_flux_lora(tmp_path / "lokr.safetensors", dims=dims)


# --- init_lora ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_init_lora_continues_exactly_from_either_format(tiny_with_lora, tmp_path, fmt):
    source, _, modules = tiny_with_lora
    inputs = forward_inputs(source)
    expected = run(source, inputs)
    dims = dims_of_transformer(source)
    if fmt == "kohya":
        info = KohyaInfo(name="other", family="flux", rank=4, alpha=8)
        path = write_flux_kohya(tmp_path / "other.safetensors", modules, dims, info, "dev")
    else:
        path = write_flux_diffusers(tmp_path / "pytorch_lora_weights.safetensors", modules, "dev")

    from peft import LoraConfig

    target = tiny_transformer()  # the same base weights (same seed), a fresh LoRA of another rank and alpha
    target.add_adapter(LoraConfig(r=6, lora_alpha=3.0, target_modules=ALL_TARGETS, init_lora_weights=True))
    assert not torch.allclose(run(target, inputs), expected, atol=1e-3)
    lora = read_flux_init_lora(path, target)
    loaded, skipped = apply_flux_init_lora(lora.modules, {"transformer": target})
    assert loaded == len(modules) and skipped == []
    torch.testing.assert_close(run(target, inputs), expected, atol=1e-5, rtol=1e-5)

    small = tiny_transformer()
    small.add_adapter(LoraConfig(r=2, lora_alpha=2.0, target_modules=ALL_TARGETS, init_lora_weights=True))
    with pytest.raises(FluxLoraError, match="set lora_rank: 4"):
        apply_flux_init_lora(read_flux_init_lora(path, small).modules, {"transformer": small})


def test_init_lora_for_another_width_is_refused(tiny_with_lora, tmp_path):
    source, _, modules = tiny_with_lora
    path = write_flux_kohya(
        tmp_path / "l.safetensors",
        modules,
        dims_of_transformer(source),
        KohyaInfo(name="l", family="flux", rank=4, alpha=8),
        "dev",
    )
    wider = tiny_transformer(attention_head_dim=12, axes_dims_rope=(4, 4, 4))
    with pytest.raises(FluxLoraError, match="takes 16 inputs in the file, 24 in this model"):
        read_flux_init_lora(path, wider)


# --- diffusers' FluxPipeline.load_lora_weights ------------------------------------------------------------------

#: diffusers' kohya Flux converter (`_convert_kohya_flux_lora_to_diffusers`) splits double-block qkv in equal
#: thirds (any width) but single_blocks.N.linear1 at FLUX.1's fixed widths [3072, 3072, 3072, 12288] (and
#: asserts they add up). So the double blocks are checked on the tiny model and linear1 on a transformer of
#: FLUX.1's width (24 heads of 128) with one single block and no double block.
BLOCK_CASES = {  # transformer overrides, double-block targets, single-block targets, compare outputs
    "double-blocks-tiny": (
        {},
        DOUBLE_TARGETS + ["norm1.linear", "norm1_context.linear"],
        ["proj_out", "norm.linear"],
        True,
    ),
    "single-block-flux1-width": (  # the loaded layers are compared; forward passes at this width cost seconds
        {
            "num_layers": 0,
            "num_single_layers": 1,
            "attention_head_dim": 128,
            "num_attention_heads": 24,
            "axes_dims_rope": (16, 56, 56),
        },
        [],
        SINGLE_TARGETS + ["norm.linear"],
        False,
    ),
}


@pytest.mark.parametrize("case", sorted(BLOCK_CASES))
def test_diffusers_load_lora_weights_consumes_every_key_of_the_kohya_export(tmp_path, caplog, case):
    import logging

    from diffusers import FluxPipeline

    overrides, double, single, compare_outputs = BLOCK_CASES[case]
    if compare_outputs:
        model = tiny_transformer(seed=0, **overrides)
    else:  # only shapes matter: skip initialising a third of a billion weights
        from accelerate import init_empty_weights

        with init_empty_weights():
            model = tiny_transformer(seed=0, **overrides)
        model = model.to_empty(device="cpu")
    inputs = forward_inputs(model)
    base_out = run(model, inputs) if compare_outputs else None
    in_blocks = [  # full paths: `proj_out` alone would also pick the final layer's proj_out
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and any(
            name.startswith(prefix) and name.endswith("." + target)
            for prefix, targets in (("transformer_blocks.", double), ("single_transformer_blocks.", single))
            for target in targets
        )
    ]
    modules = add_random_lora(model, rank=4, alpha=8.0, targets=in_blocks, name="trained")
    peft_out = run(model, inputs) if compare_outputs else None
    dims = dims_of_transformer(model)
    info = KohyaInfo(name="lora", family="flux", rank=4, alpha=8)
    path = write_flux_kohya(tmp_path / "lora.safetensors", modules, dims, info, "dev")
    model.delete_adapters("trained")

    converted = FluxPipeline.lora_state_dict(str(path))
    converted = converted[0] if isinstance(converted, tuple) else converted
    assert sorted(converted) == sorted(
        f"transformer.{m.path}.lora_{ab}.weight" for m in modules for ab in "AB"
    )  # every fused part became its own lora_A/lora_B pair under the transformer
    pipe = FluxPipeline(
        scheduler=None,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=model,
    )
    with caplog.at_level(logging.WARNING, logger="diffusers"):
        pipe.load_lora_weights(str(path), adapter_name="kohya")
    assert not [r for r in caplog.records if "nsupported" in r.message or "ncompatible" in r.message]
    layers = lora_layers(model)
    probe = torch.randn(dims.hidden + dims.mlp_hidden, 3, generator=torch.Generator().manual_seed(7))
    for module in modules:  # the loaded layer's delta applied to a probe (cheaper than the full matrix)
        layer, x = layers[module.path], probe[: module.down.shape[1]]
        loaded = layer.lora_B["kohya"].weight @ (layer.lora_A["kohya"].weight @ x) * layer.scaling["kohya"]
        expected = module.up @ (module.down @ x) * (module.alpha / module.rank)
        torch.testing.assert_close(loaded, expected, atol=1e-5, rtol=1e-5, msg=module.path)
    if compare_outputs:
        out = run(model, inputs)
        assert (out - base_out).abs().max() > 1e-3
        torch.testing.assert_close(out, peft_out, atol=1e-5, rtol=1e-5)


def test_diffusers_skips_kohya_modules_outside_the_blocks():
    """diffusers 0.42's kohya Flux converter names img_in, txt_in, time_in, vector_in, guidance_in and
    final_layer without the `transformer.` prefix that `load_lora_adapter` keeps, so it drops them silently;
    loratui's export says so when a LoRA has them. (When this fails, diffusers loads them: drop the note.)"""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    state = {
        "lora_unet_img_in.lora_down.weight": torch.randn(2, 4),
        "lora_unet_img_in.lora_up.weight": torch.randn(8, 2),
        "lora_unet_img_in.alpha": torch.tensor(2.0),
        "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.randn(2, 8),
        "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.randn(8, 2),
        "lora_unet_double_blocks_0_img_attn_proj.alpha": torch.tensor(2.0),
    }
    converted = _convert_kohya_flux_lora_to_diffusers(dict(state))
    assert "transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight" in converted
    assert "x_embedder.lora_A.weight" in converted and "transformer.x_embedder.lora_A.weight" not in converted
    names = [m.name for m in to_kohya_modules(_two_modules(), dims_of_transformer(tiny_transformer()))]
    assert diffusers_skipped(names) == ["lora_unet_img_in"]


def _two_modules() -> list[LoraModule]:
    g = torch.Generator().manual_seed(0)
    return [
        LoraModule(
            "transformer", "x_embedder", torch.randn(2, 4, generator=g), torch.randn(16, 2, generator=g), 2.0
        ),
        LoraModule(
            "transformer",
            "transformer_blocks.0.attn.to_out.0",
            torch.randn(2, 16, generator=g),
            torch.randn(16, 2, generator=g),
            2.0,
        ),
    ]


# --- loratui export ------------------------------------------------------------------------------------------------


def _flux_run(tmp_path: Path, modules: list[LoraModule], transformer) -> Path:
    """A run folder with one Flux checkpoint as the trainer writes it (PEFT tensors + meta)."""
    from loratui.runs.checkpoints import write_checkpoint
    from loratui.runs.rundir import create_run_dir

    run = create_run_dir(tmp_path / "runs", "fluxy")
    state = {}
    for m in modules:
        state[f"transformer.{m.path}.lora_A.weight"] = m.down
        state[f"transformer.{m.path}.lora_B.weight"] = m.up
    info = KohyaInfo(
        name="fluxy", family="flux", rank=4, alpha=8.0, learning_rate=1e-4, resolution=512, steps=7
    )
    meta = {
        "family": "flux",
        "variant": "dev",
        "run": run.name,
        "name": "fluxy",
        "output_dir": str(tmp_path / "out"),
        "module_scales": {f"transformer.{m.path}": m.alpha / m.rank for m in modules},
        "lora": {"rank": 4, "alpha": 8.0},
        "kohya": asdict(info),
        "transformer_config": dict(transformer.config),
        "flux_training": {"guidance_scale": 1.0, "timestep_sampling": "sigmoid"},
    }
    (run.path / "config.yaml").write_text(
        "task_type: image-generation\nmodel_family: flux\n", encoding="utf-8"
    )
    write_checkpoint(run, 7, lora_state=state, training_state={"rng": {}}, meta=meta, config_yaml="")
    return run.path


def test_loratui_export_writes_flux_kohya_and_diffusers_files(tiny_with_lora, tmp_path):
    from io import StringIO

    from rich.console import Console
    from safetensors import safe_open

    from loratui.cli.cmd_export import run_image_export

    model, base, modules = tiny_with_lora
    run_dir = _flux_run(tmp_path, modules, model)
    out = StringIO()
    assert run_image_export(run_dir, console=Console(file=out, width=300)) == 0, out.getvalue()
    written = tmp_path / "out" / "fluxy.safetensors"
    assert f"exported: {written}" in out.getvalue()
    assert "skips its 3 module(s) outside the blocks" in out.getvalue()  # x_embedder, proj_out, norm_out
    with safe_open(str(written), framework="pt") as handle:
        meta = handle.metadata()
        keys = list(handle.keys())
    assert meta["ss_base_model_version"] == "flux1"
    assert meta["ss_network_module"] == "networks.lora_flux"
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert meta["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8"
    assert meta["ss_guidance_scale"] == "1.0" and meta["ss_timestep_sampling"] == "sigmoid"
    assert meta["ss_steps"] == "7" and "modelspec.prediction_type" not in meta
    names = {k.split(".", 1)[0] for k in keys}
    assert all(f"{n}.alpha" in keys for n in names)
    assert "lora_unet_single_blocks_0_linear1" in names and "lora_unet_double_blocks_1_txt_attn_qkv" in names

    # the kohya file converts to the diffusers format and back to the same deltas
    out = StringIO()
    assert run_image_export(written, fmt="diffusers", out=tmp_path / "d", console=Console(file=out)) == 0
    diffusers_file = tmp_path / "d" / "pytorch_lora_weights.safetensors"
    again = {m.path: m for m in read_flux_lora(diffusers_file).modules}
    assert run_image_export(diffusers_file, fmt="kohya", console=Console(file=StringIO())) == 0
    round_trip = {
        m.path: m for m in read_flux_lora(tmp_path / "d" / "pytorch_lora_weights_kohya.safetensors").modules
    }
    for module in modules:
        torch.testing.assert_close(delta(again[module.path]), delta(module), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(delta(round_trip[module.path]), delta(module), atol=1e-6, rtol=1e-5)

    out = StringIO()
    assert run_image_export(run_dir, fmt="diffusers", console=Console(file=out, width=300)) == 0
    assert "FluxPipeline: pipe.load_lora_weights" in out.getvalue()
    out = StringIO()
    assert run_image_export(run_dir, merge=True, console=Console(file=out)) == 2
    assert "--merge is only available for LLM adapters" in out.getvalue()


@pytest.mark.filterwarnings("ignore:.*FluxPosEmbed.*:FutureWarning")  # inside diffusers' Chroma constructor
def test_chroma_exports_with_its_architecture_and_without_modulation_modules(tmp_path):
    """Chroma has the Flux blocks without per-block modulation layers: the same fused names, `chroma/lora`."""
    from diffusers import ChromaTransformer2DModel
    from safetensors import safe_open

    torch.manual_seed(0)
    model = ChromaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=12,
        axes_dims_rope=(2, 2, 4),
        approximator_num_channels=8,
        approximator_hidden_dim=16,
        approximator_layers=1,
    )
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    targets = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and name.startswith(("transformer_blocks.", "single_transformer_blocks."))
    ]
    modules = add_random_lora(model, rank=2, alpha=1.0, targets=targets)
    dims = dims_of_transformer(model)
    assert dims.chroma
    info = KohyaInfo(name="c", family="chroma", rank=2, alpha=1.0)
    path = write_flux_kohya(tmp_path / "c.safetensors", modules, dims, info, "chroma")
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        state = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    assert meta["modelspec.architecture"] == "chroma/lora" and meta["ss_model_type"] == "chroma"
    assert not [k for k in state if "_mod_" in k or "modulation" in k]
    patched = comfy_apply_kohya(diffusers_to_original(base, dims), state)
    expected = merged(base, modules)
    for key, value in original_to_diffusers(patched, dims).items():
        torch.testing.assert_close(value, expected[key], atol=1e-5, rtol=1e-5, msg=key)
    back = read_flux_lora(path, dims=dims)
    assert back.variant == "chroma" and len(back.modules) == len(modules)


@pytest.mark.parametrize("spelling", ["bare", "peft-model", "down-up"])
def test_diffusers_style_files_from_other_trainers_read_the_same(tiny_with_lora, tmp_path, spelling):
    from safetensors.torch import load_file, save_file

    _, _, modules = tiny_with_lora
    written = write_flux_diffusers(tmp_path / "a.safetensors", modules, None)
    renamed = {}
    for key, tensor in load_file(str(written)).items():
        path = key.removeprefix("transformer.")
        if spelling == "bare":
            renamed[path] = tensor
        elif spelling == "peft-model":
            renamed[f"base_model.model.{path}"] = tensor
        else:
            renamed[key.replace(".lora_A.", ".lora_down.").replace(".lora_B.", ".lora_up.")] = tensor
    save_file(renamed, tmp_path / "b.safetensors")
    back = {m.path: m for m in read_flux_lora(tmp_path / "b.safetensors").modules}
    assert set(back) == {m.path for m in modules}
    for module in modules:
        torch.testing.assert_close(delta(back[module.path]), delta(module), atol=1e-6, rtol=1e-5)


def test_full_size_flux1_dev_export_converts_exactly_in_diffusers():
    """At FLUX.1-dev's real sizes (19 double, 38 single blocks, from the shipped config) a rank-2 LoRA on the
    trainer's default targets exports to 19 x 2 qkv + 38 linear1 fused modules, and diffusers' converter turns
    every one back into the same per-module factors (checked on a probe)."""
    import json
    from importlib import resources

    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    from loratui.models.flux.layout import dims_from_diffusers_config

    config = json.loads(
        resources.files("loratui.models.flux").joinpath("configs", "flux1-dev.json").read_text("utf-8")
    )
    dims = dims_from_diffusers_config(config["transformer"]["config"])
    h, m = dims.hidden, dims.mlp_hidden
    shapes = {  # (in, out) of the default targets
        **{f"attn.{p}": (h, h) for p in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj")},
        **{"attn.add_v_proj": (h, h), "attn.to_add_out": (h, h), "ff.net.0.proj": (h, m), "ff.net.2": (m, h)},
        **{"ff_context.net.0.proj": (h, m), "ff_context.net.2": (m, h)},
    }
    single = {
        "attn.to_q": (h, h),
        "attn.to_k": (h, h),
        "attn.to_v": (h, h),
        "proj_mlp": (h, m),
        "proj_out": (h + m, h),
    }
    g = torch.Generator().manual_seed(0)
    modules = [
        LoraModule(
            "transformer",
            f"{prefix}.{i}.{name}",
            torch.randn(2, i_o[0], generator=g),
            torch.randn(i_o[1], 2, generator=g),
            4.0,
        )
        for prefix, count, table in (
            ("transformer_blocks", dims.num_double, shapes),
            ("single_transformer_blocks", dims.num_single, single),
        )
        for i in range(count)
        for name, i_o in table.items()
    ]
    kohya = to_kohya_modules(modules, dims)
    assert len(kohya) == 19 * 8 + 38 * 2
    converted = _convert_kohya_flux_lora_to_diffusers(kohya_state(kohya))
    assert len(converted) == 2 * len(modules)
    probe = torch.randn(h + m, 1, generator=g)
    for module in modules:
        a = converted[f"transformer.{module.path}.lora_A.weight"]
        b = converted[f"transformer.{module.path}.lora_B.weight"]
        assert a.shape[0] == 2  # split back to the module's own rank (the block-diagonal form is recognised)
        x = probe[: a.shape[1]]
        torch.testing.assert_close(b @ (a @ x), module.up @ (module.down @ x) * 2.0, atol=1e-4, rtol=1e-5)
