"""The one mapping between the original (BFL) Flux transformer layout and diffusers' module names.

The original layout, used by `flux1-dev.safetensors`, ComfyUI and kohya LoRA files, fuses several diffusers
linear layers into one weight: `double_blocks.N.img_attn.qkv` holds diffusers' `to_q`, `to_k`, `to_v` stacked
along the output rows, `single_blocks.N.linear1` holds `to_q`, `to_k`, `to_v` and `proj_mlp`. The final-layer
modulation stores (shift, scale) where diffusers stores (scale, shift). Every width comes from the tensors'
shapes (`FluxDims`), never from FLUX.1's fixed 3072/12288, so any size converts, tiny test models included.

Chroma uses the same blocks without per-block modulation layers; its `distilled_guidance_layer` approximator
produces all modulations, and it has no `time_in`, `vector_in`, `guidance_in` or final-layer modulation.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from loratui.config.base_model import FLUX_TRANSFORMER_PREFIXES

# diffusers modules inside one double block, per original module; fused ones list their parts in row order.
DOUBLE_BLOCK_MODULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ("img_attn.proj", ("attn.to_out.0",)),
    ("txt_attn.proj", ("attn.to_add_out",)),
    ("img_mlp.0", ("ff.net.0.proj",)),
    ("img_mlp.2", ("ff.net.2",)),
    ("txt_mlp.0", ("ff_context.net.0.proj",)),
    ("txt_mlp.2", ("ff_context.net.2",)),
    ("img_mod.lin", ("norm1.linear",)),
    ("txt_mod.lin", ("norm1_context.linear",)),
)
DOUBLE_BLOCK_NORMS: tuple[tuple[str, str], ...] = (
    ("img_attn.norm.query_norm", "attn.norm_q"),
    ("img_attn.norm.key_norm", "attn.norm_k"),
    ("txt_attn.norm.query_norm", "attn.norm_added_q"),
    ("txt_attn.norm.key_norm", "attn.norm_added_k"),
)
SINGLE_BLOCK_MODULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
    ("linear2", ("proj_out",)),
    ("modulation.lin", ("norm.linear",)),
)
SINGLE_BLOCK_NORMS: tuple[tuple[str, str], ...] = (
    ("norm.query_norm", "attn.norm_q"),
    ("norm.key_norm", "attn.norm_k"),
)
# Modules without modulation weights in Chroma (its approximator produces them).
MODULATION_MODULES = frozenset({"img_mod.lin", "txt_mod.lin", "modulation.lin"})

FLUX_EMBEDDERS: tuple[tuple[str, str], ...] = (
    ("img_in", "x_embedder"),
    ("txt_in", "context_embedder"),
    ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    ("final_layer.linear", "proj_out"),
)
GUIDANCE_EMBEDDERS: tuple[tuple[str, str], ...] = (
    ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
)
CHROMA_EMBEDDERS: tuple[tuple[str, str], ...] = (
    ("img_in", "x_embedder"),
    ("txt_in", "context_embedder"),
    ("final_layer.linear", "proj_out"),
    ("distilled_guidance_layer.in_proj", "distilled_guidance_layer.in_proj"),
    ("distilled_guidance_layer.out_proj", "distilled_guidance_layer.out_proj"),
)
FINAL_MODULATION = ("final_layer.adaLN_modulation.1", "norm_out.linear")

# Prefixes a transformer carries inside other files (ComfyUI all-in-one checkpoints, some re-saves).
TRANSFORMER_PREFIXES = tuple(p for p in FLUX_TRANSFORMER_PREFIXES if p)

_BLOCK_INDEX = re.compile(r"^(double_blocks|single_blocks|distilled_guidance_layer\.layers)\.(\d+)\.")


class LayoutError(ValueError):
    """A state dict that does not have the keys or shapes of a Flux transformer."""


@dataclass(frozen=True)
class FluxDims:
    """Sizes of a Flux-class transformer, read from tensor shapes."""

    hidden: int
    head_dim: int
    mlp_hidden: int
    num_double: int
    num_single: int
    in_channels: int
    out_channels: int
    context_dim: int
    pooled_dim: int = 0  # 0 for Chroma (no CLIP pooled vector)
    guidance: bool = False
    chroma: bool = False
    approximator_channels: int = 0
    approximator_hidden: int = 0
    approximator_layers: int = 0

    @property
    def heads(self) -> int:
        return self.hidden // self.head_dim

    @property
    def variant(self) -> str:
        """`chroma`, `dev` (guidance embedding) or `schnell` (none)."""
        if self.chroma:
            return "chroma"
        return "dev" if self.guidance else "schnell"

    @property
    def mlp_ratio(self) -> float:
        return self.mlp_hidden / self.hidden


@dataclass(frozen=True)
class ModuleMap:
    """One original module and the diffusers module(s) it holds.

    `parts` are concatenated along the output rows in this order, `widths[i]` rows each. `params` maps the
    original parameter names to diffusers' (`scale` -> `weight` for the RMS norms). `swap_halves`: the two
    row halves are stored in the opposite order (final-layer shift/scale).
    """

    original: str
    parts: tuple[str, ...]
    widths: tuple[int, ...]
    params: tuple[tuple[str, str], ...] = (("weight", "weight"), ("bias", "bias"))
    swap_halves: bool = False

    @property
    def fused(self) -> bool:
        return len(self.parts) > 1


_NORM_PARAMS = (("scale", "weight"),)


def strip_prefix(keys: Iterable[str]) -> str:
    """The prefix in front of the transformer's keys (`""` when there is none)."""
    keys = list(keys)
    for prefix in TRANSFORMER_PREFIXES:
        if any(k.startswith(prefix + "double_blocks.") for k in keys):
            return prefix
    return ""


def _block_count(keys: Iterable[str], kind: str) -> int:
    indices = {int(m.group(2)) for k in keys if (m := _BLOCK_INDEX.match(k)) and m.group(1) == kind}
    if not indices:
        return 0
    if indices != set(range(max(indices) + 1)):
        missing = sorted(set(range(max(indices) + 1)) - indices)
        raise LayoutError(f"{kind} {missing} are missing (the file holds {len(indices)} of them)")
    return max(indices) + 1


def _shape(shapes: Mapping[str, Any], key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise LayoutError(f"the key {key!r} is missing")
    value = shapes[key]
    return tuple(int(d) for d in (value.shape if hasattr(value, "shape") else value))


def dims_from_original(shapes: Mapping[str, Any]) -> FluxDims:
    """Sizes from an original-layout state dict (no prefix); values are tensors or shapes."""
    keys = list(shapes)
    num_double = _block_count(keys, "double_blocks")
    num_single = _block_count(keys, "single_blocks")
    if num_double == 0 and num_single == 0:
        raise LayoutError(
            "no double_blocks.N / single_blocks.N keys: not a Flux transformer in the original layout"
        )
    hidden, in_channels = _shape(shapes, "img_in.weight")
    ref = (
        "double_blocks.0.img_attn.norm.query_norm.scale"
        if num_double
        else "single_blocks.0.norm.query_norm.scale"
    )
    (head_dim,) = _shape(shapes, ref)
    if head_dim <= 0 or hidden % head_dim:
        raise LayoutError(f"hidden width {hidden} is not a multiple of the head width {head_dim}")
    if num_double:
        mlp_hidden = _shape(shapes, "double_blocks.0.img_mlp.0.weight")[0]
    else:
        mlp_hidden = _shape(shapes, "single_blocks.0.linear1.weight")[0] - 3 * hidden
    context_dim = _shape(shapes, "txt_in.weight")[1]
    out_channels = _shape(shapes, "final_layer.linear.weight")[0]
    chroma = any(k.startswith("distilled_guidance_layer.") for k in keys)
    if chroma:
        approx_hidden, approx_channels = _shape(shapes, "distilled_guidance_layer.in_proj.weight")
        return FluxDims(
            hidden=hidden,
            head_dim=head_dim,
            mlp_hidden=mlp_hidden,
            num_double=num_double,
            num_single=num_single,
            in_channels=in_channels,
            out_channels=out_channels,
            context_dim=context_dim,
            chroma=True,
            approximator_channels=approx_channels,
            approximator_hidden=approx_hidden,
            approximator_layers=_block_count(keys, "distilled_guidance_layer.layers"),
        )
    return FluxDims(
        hidden=hidden,
        head_dim=head_dim,
        mlp_hidden=mlp_hidden,
        num_double=num_double,
        num_single=num_single,
        in_channels=in_channels,
        out_channels=out_channels,
        context_dim=context_dim,
        pooled_dim=_shape(shapes, "vector_in.in_layer.weight")[1],
        guidance="guidance_in.in_layer.weight" in shapes,
    )


def dims_from_diffusers_config(config: Mapping[str, Any], *, chroma: bool | None = None) -> FluxDims:
    """Sizes from a diffusers transformer config (`FluxTransformer2DModel` / `ChromaTransformer2DModel`)."""
    head_dim = int(config["attention_head_dim"])
    hidden = head_dim * int(config["num_attention_heads"])
    patch = int(config.get("patch_size", 1))
    in_channels = int(config["in_channels"])
    out_channels = int(config.get("out_channels") or in_channels) * patch * patch
    is_chroma = "approximator_layers" in config if chroma is None else chroma
    common = dict(
        hidden=hidden,
        head_dim=head_dim,
        mlp_hidden=int(hidden * float(config.get("mlp_ratio", 4.0))),
        num_double=int(config["num_layers"]),
        num_single=int(config["num_single_layers"]),
        in_channels=in_channels,
        out_channels=out_channels,
        context_dim=int(config["joint_attention_dim"]),
    )
    if is_chroma:
        return FluxDims(
            **common,
            chroma=True,
            approximator_channels=int(config["approximator_num_channels"]),
            approximator_hidden=int(config["approximator_hidden_dim"]),
            approximator_layers=int(config["approximator_layers"]),
        )
    return FluxDims(
        **common,
        pooled_dim=int(config["pooled_projection_dim"]),
        guidance=bool(config.get("guidance_embeds")),
    )


def dims_from_diffusers_state(shapes: Mapping[str, Any]) -> FluxDims:
    """Sizes from a diffusers-layout transformer state dict (no prefix); values are tensors or shapes."""
    original_like = {
        "img_in.weight": _shape(shapes, "x_embedder.weight"),
        "txt_in.weight": _shape(shapes, "context_embedder.weight"),
        "final_layer.linear.weight": _shape(shapes, "proj_out.weight"),
    }
    for key in shapes:
        found = re.match(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.", key)
        if found:
            kind = "double_blocks" if found.group(1) == "transformer_blocks" else "single_blocks"
            original_like[f"{kind}.{found.group(2)}.x"] = ()
        found = re.match(r"^distilled_guidance_layer\.layers\.(\d+)\.", key)
        if found:
            original_like[f"distilled_guidance_layer.layers.{found.group(1)}.x"] = ()
    if "transformer_blocks.0.attn.norm_q.weight" in shapes:
        original_like["double_blocks.0.img_attn.norm.query_norm.scale"] = _shape(
            shapes, "transformer_blocks.0.attn.norm_q.weight"
        )
        original_like["double_blocks.0.img_mlp.0.weight"] = _shape(
            shapes, "transformer_blocks.0.ff.net.0.proj.weight"
        )
    else:
        original_like["single_blocks.0.norm.query_norm.scale"] = _shape(
            shapes, "single_transformer_blocks.0.attn.norm_q.weight"
        )
        hidden = original_like["img_in.weight"][0]
        mlp = _shape(shapes, "single_transformer_blocks.0.proj_mlp.weight")[0]
        original_like["single_blocks.0.linear1.weight"] = (3 * hidden + mlp, hidden)
    if "distilled_guidance_layer.in_proj.weight" in shapes:
        original_like["distilled_guidance_layer.in_proj.weight"] = _shape(
            shapes, "distilled_guidance_layer.in_proj.weight"
        )
    else:
        original_like["vector_in.in_layer.weight"] = _shape(
            shapes, "time_text_embed.text_embedder.linear_1.weight"
        )
        if "time_text_embed.guidance_embedder.linear_1.weight" in shapes:
            original_like["guidance_in.in_layer.weight"] = ()
    return dims_from_original(original_like)


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Rotary axes (time, height, width) for a head width: FLUX.1's (16, 56, 56) at 128, even parts otherwise."""
    first = max(2, 2 * round(head_dim / 16))
    while first < head_dim and (head_dim - first) % 4:
        first += 2
    rest = (head_dim - first) // 2
    if rest <= 0 or rest % 2:
        raise LayoutError(f"head width {head_dim} cannot be split into even rotary axes")
    return (first, rest, rest)


def diffusers_config(dims: FluxDims, axes_dims_rope: Iterable[int] | None = None) -> dict[str, Any]:
    """Constructor kwargs for diffusers' transformer class of these sizes (see `diffusers_class_name`)."""
    if dims.mlp_hidden != 4 * dims.hidden:
        raise LayoutError(
            f"MLP width {dims.mlp_hidden} is not 4x the hidden width {dims.hidden}; diffusers' Flux blocks "
            "only build a 4x MLP"
        )
    axes = tuple(int(a) for a in axes_dims_rope) if axes_dims_rope is not None else rope_axes(dims.head_dim)
    if sum(axes) != dims.head_dim:
        raise LayoutError(f"rotary axes {axes} do not add up to the head width {dims.head_dim}")
    config: dict[str, Any] = {
        "patch_size": 1,
        "in_channels": dims.in_channels,
        "num_layers": dims.num_double,
        "num_single_layers": dims.num_single,
        "attention_head_dim": dims.head_dim,
        "num_attention_heads": dims.heads,
        "joint_attention_dim": dims.context_dim,
        "axes_dims_rope": list(axes),
    }
    if dims.out_channels != dims.in_channels:
        config["out_channels"] = dims.out_channels
    if dims.chroma:
        config.update(
            approximator_num_channels=dims.approximator_channels,
            approximator_hidden_dim=dims.approximator_hidden,
            approximator_layers=dims.approximator_layers,
        )
    else:
        config.update(pooled_projection_dim=dims.pooled_dim, guidance_embeds=dims.guidance)
    return config


def diffusers_class_name(dims: FluxDims) -> str:
    return "ChromaTransformer2DModel" if dims.chroma else "FluxTransformer2DModel"


def module_maps(dims: FluxDims) -> list[ModuleMap]:
    """Every original module of a transformer with these sizes and the diffusers module(s) it holds."""
    h = dims.hidden
    maps: list[ModuleMap] = []
    embedders = (
        CHROMA_EMBEDDERS if dims.chroma else FLUX_EMBEDDERS + (GUIDANCE_EMBEDDERS if dims.guidance else ())
    )
    for original, diffusers_name in embedders:
        maps.append(ModuleMap(original, (diffusers_name,), (0,)))
    if dims.chroma:
        for i in range(dims.approximator_layers):
            src, dst = f"distilled_guidance_layer.layers.{i}", f"distilled_guidance_layer.layers.{i}"
            maps.append(ModuleMap(f"{src}.in_layer", (f"{dst}.linear_1",), (0,)))
            maps.append(ModuleMap(f"{src}.out_layer", (f"{dst}.linear_2",), (0,)))
            maps.append(
                ModuleMap(
                    f"distilled_guidance_layer.norms.{i}",
                    (f"distilled_guidance_layer.norms.{i}",),
                    (0,),
                    _NORM_PARAMS,
                )
            )
    else:
        maps.append(ModuleMap(FINAL_MODULATION[0], (FINAL_MODULATION[1],), (0,), swap_halves=True))
    for i in range(dims.num_double):
        for original, parts in DOUBLE_BLOCK_MODULES:
            if dims.chroma and original in MODULATION_MODULES:
                continue
            widths = (h,) * len(parts) if len(parts) > 1 else (0,)
            maps.append(
                ModuleMap(
                    f"double_blocks.{i}.{original}",
                    tuple(f"transformer_blocks.{i}.{p}" for p in parts),
                    widths,
                )
            )
        for original, part in DOUBLE_BLOCK_NORMS:
            maps.append(
                ModuleMap(
                    f"double_blocks.{i}.{original}", (f"transformer_blocks.{i}.{part}",), (0,), _NORM_PARAMS
                )
            )
    for i in range(dims.num_single):
        for original, parts in SINGLE_BLOCK_MODULES:
            if dims.chroma and original in MODULATION_MODULES:
                continue
            widths = (h, h, h, dims.mlp_hidden) if len(parts) > 1 else (0,)
            maps.append(
                ModuleMap(
                    f"single_blocks.{i}.{original}",
                    tuple(f"single_transformer_blocks.{i}.{p}" for p in parts),
                    widths,
                )
            )
        for original, part in SINGLE_BLOCK_NORMS:
            maps.append(
                ModuleMap(
                    f"single_blocks.{i}.{original}",
                    (f"single_transformer_blocks.{i}.{part}",),
                    (0,),
                    _NORM_PARAMS,
                )
            )
    return maps


@dataclass(frozen=True)
class FusedSlice:
    """Where one diffusers linear module sits inside an original (possibly fused) weight."""

    original: str  # original module name, e.g. "single_blocks.0.linear1"
    offset: int  # first output row inside the original weight
    width: int  # output rows of this diffusers module
    total: int  # output rows of the whole original weight
    index: int  # position among the fused parts
    count: int  # number of fused parts


def diffusers_to_original_slices(dims: FluxDims) -> dict[str, FusedSlice]:
    """diffusers linear module name -> its slice of the original weight (for LoRA export and import).

    Only linear modules (weight and bias) are listed; the final-layer modulation is listed with its halves
    unswapped, since LoRA tooling that targets it must swap the up-projection's halves (`swap_halves`).
    """
    out: dict[str, FusedSlice] = {}
    for m in module_maps(dims):
        if m.params == _NORM_PARAMS:
            continue
        if not m.fused:
            out[m.parts[0]] = FusedSlice(m.original, 0, 0, 0, 0, 1)
            continue
        total = sum(m.widths)
        offset = 0
        for index, (part, width) in enumerate(zip(m.parts, m.widths, strict=True)):
            out[part] = FusedSlice(m.original, offset, width, total, index, len(m.parts))
            offset += width
    return out


def original_to_diffusers(state_dict: Mapping[str, Any], dims: FluxDims | None = None) -> dict[str, Any]:
    """Convert an original-layout transformer state dict (prefix already removed) to diffusers names.

    Fused weights are split at widths from `dims` (worked out from the shapes when not given); tensors are
    sliced views, not copies. Unknown or missing keys raise `LayoutError` naming them.
    """
    import torch

    dims = dims or dims_from_original(state_dict)
    out: dict[str, Any] = {}
    used: set[str] = set()
    missing: list[str] = []
    for m in module_maps(dims):
        for src_param, dst_param in m.params:
            key = f"{m.original}.{src_param}"
            if key not in state_dict:
                if src_param != "bias":
                    missing.append(key)
                continue
            used.add(key)
            tensor = state_dict[key]
            if m.swap_halves:
                shift, scale = tensor.chunk(2, dim=0)
                tensor = torch.cat([scale, shift], dim=0)
            if m.fused:
                if tensor.shape[0] != sum(m.widths):
                    raise LayoutError(
                        f"{key} has {tensor.shape[0]} rows, expected {sum(m.widths)} ({m.widths})"
                    )
                for part, piece in zip(m.parts, torch.split(tensor, list(m.widths), dim=0), strict=True):
                    out[f"{part}.{dst_param}"] = piece
            else:
                out[f"{m.parts[0]}.{dst_param}"] = tensor
    if missing:
        raise LayoutError(
            f"{len(missing)} keys of the Flux layout are missing, e.g. {', '.join(missing[:3])}"
        )
    extra = sorted(set(state_dict) - used)
    if extra:
        raise LayoutError(f"{len(extra)} keys are not part of the Flux layout, e.g. {', '.join(extra[:3])}")
    return out


def diffusers_to_original(state_dict: Mapping[str, Any], dims: FluxDims) -> dict[str, Any]:
    """Convert a diffusers transformer state dict to the original layout (fused weights concatenated)."""
    import torch

    out: dict[str, Any] = {}
    used: set[str] = set()
    for m in module_maps(dims):
        for src_param, dst_param in m.params:
            keys = [f"{part}.{dst_param}" for part in m.parts]
            present = [k in state_dict for k in keys]
            if not any(present):
                if src_param == "bias":
                    continue
                raise LayoutError(f"the key {keys[0]!r} is missing")
            if not all(present):
                raise LayoutError(f"{m.original}.{src_param} needs all of {keys}")
            used.update(keys)
            tensors = [state_dict[k] for k in keys]
            tensor = torch.cat(tensors, dim=0) if m.fused else tensors[0]
            if m.swap_halves:
                scale, shift = tensor.chunk(2, dim=0)
                tensor = torch.cat([shift, scale], dim=0)
            out[f"{m.original}.{src_param}"] = tensor
    extra = sorted(set(state_dict) - used)
    if extra:
        raise LayoutError(f"{len(extra)} keys are not part of the Flux layout, e.g. {', '.join(extra[:3])}")
    return out


def kohya_module_name(original: str, prefix: str = "lora_unet") -> str:
    """kohya's LoRA name for an original module: `double_blocks.0.img_attn.qkv` -> `lora_unet_double_blocks_0_img_attn_qkv`."""
    return f"{prefix}_{original.replace('.', '_')}"
