"""Flux LoRAs in kohya's file layout: original (BFL) module names, fused weights, header metadata.

Inside loratui a Flux LoRA is kept with PEFT names on diffusers modules: `transformer.<path>.lora_A.weight`
and `.lora_B.weight` (and `text_encoder.<path>...` for CLIP-L). kohya sd-scripts, ComfyUI and the files users
share name the original modules instead (`lora_unet_double_blocks_0_img_attn_qkv`, `lora_te1_text_model_...`),
where one original weight holds several diffusers modules stacked along its rows (`layout.py`).

Export fuses the parts exactly: `lora_down` is the parts' downs stacked, `lora_up` is block-diagonal with each
part's up in its rows, and `alpha` is the common scale times the fused rank, so that
`alpha / rank * up @ down` equals the sum of the parts' deltas. A part the LoRA does not train leaves its rows
zero. Import splits a fused module by the columns each part's rows use: a block-diagonal file (loratui's, and
kohya's `split_qkv`) gives each part its own block, a file with one shared down (kohya's default) gives every
part that down with its rows of the up. Both are exact; nothing is approximated.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from loratui.models.flux.layout import (
    FINAL_MODULATION,
    FluxDims,
    FusedSlice,
    diffusers_to_original_slices,
    kohya_module_name,
)
from loratui.models.sd.kohya import KohyaInfo, LoraModule, build_metadata, text_model_path

TRANSFORMER = "transformer"
TEXT_ENCODER = "text_encoder"  # CLIP-L
UNET_PREFIX = "lora_unet"
CLIP_PREFIX = "lora_te1"
NETWORK_MODULE = "networks.lora_flux"
BASE_MODEL_VERSION = "flux1"  # kohya's ss_base_model_version for FLUX.1 dev, schnell and Chroma LoRAs
ARCHITECTURE = {"dev": "flux-1-dev/lora", "schnell": "flux-1-schnell/lora", "chroma": "chroma/lora"}
IMPLEMENTATION = {
    "dev": "https://github.com/black-forest-labs/flux",
    "schnell": "https://github.com/black-forest-labs/flux",
    "chroma": "https://huggingface.co/lodestones/Chroma",
}
#: tensor kinds of LoRA variants that are not plain LoRA (refused on import, named in the message)
NOT_LORA = ("hada_", "lokr_", "dora_scale", ".diff", "lora_mid", ".w_norm", ".b_norm", ".a1.", ".b1.")
_CLIP_NAME = re.compile(
    r"^lora_te1?_text_model_encoder_layers_(\d+)_(self_attn_(?:q|k|v|out)_proj|mlp_fc[12])$"
)


class FluxLoraError(ValueError):
    """A Flux LoRA that cannot be written or read as asked; the message says what differs."""


@dataclass
class KohyaModule:
    """One module of a kohya file: its name and tensors."""

    name: str  # e.g. lora_unet_double_blocks_0_img_attn_qkv
    down: torch.Tensor  # [rank, in]
    up: torch.Tensor  # [out, rank]
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


# --- sizes -----------------------------------------------------------------------------------------------


def dims_of_transformer(transformer: Any) -> FluxDims:
    """The sizes of a live diffusers Flux/Chroma transformer."""
    from loratui.models.flux.layout import dims_from_diffusers_config

    chroma = type(transformer).__name__.startswith("Chroma")
    return dims_from_diffusers_config(dict(transformer.config), chroma=chroma)


#: per key form: the block pattern (kind, index, rest) and the modules whose input width is the hidden width
_SIZE_PATTERNS = (
    (
        re.compile(
            r"^transformer\.(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)\.lora_A\.weight$"
        ),
        re.compile(r"attn\.(to_[qkv]|add_[qkv]_proj)|proj_mlp|ff(_context)?\.net\.0\.proj"),
    ),
    (
        re.compile(r"^lora_unet_(double_blocks|single_blocks)_(\d+)_(\w+?)\.lora_down\.weight$"),
        re.compile(r"img_attn_qkv|txt_attn_qkv|img_mlp_0|txt_mlp_0|linear1"),
    ),
)


def dims_from_lora(state: Mapping[str, torch.Tensor], variant: str) -> FluxDims:
    """Sizes enough to name, fuse and split a LoRA's modules when no model is at hand (a checkpoint or a
    file converted on its own); PEFT (`transformer.<path>.lora_A.weight`) or kohya keys.

    Block counts come from the highest block index named; the hidden width from the input width of a qkv,
    attention-projection or MLP-input module (all take the hidden states); the MLP width is 4x hidden as in
    every diffusers Flux and Chroma block."""
    hidden, counts = 0, {"double": 0, "single": 0}
    for key, tensor in state.items():
        for blocks, hidden_inputs in _SIZE_PATTERNS:
            found = blocks.match(key)
            if not found:
                continue
            kind = "single" if found[1].startswith("single") else "double"
            counts[kind] = max(counts[kind], int(found[2]) + 1)
            if hidden_inputs.fullmatch(found[3]):
                hidden = int(tensor.shape[1])
    if not hidden:
        raise FluxLoraError(
            "the LoRA adapts no qkv/attention projection, linear1/proj_mlp or MLP input, so the transformer's "
            "width is unknown; export it from a run whose checkpoint records its base model"
        )
    return FluxDims(
        hidden=hidden,
        head_dim=hidden,
        mlp_hidden=4 * hidden,
        num_double=counts["double"],
        num_single=counts["single"],
        in_channels=0,
        out_channels=0,
        context_dim=0,
        guidance=variant == "dev",
        chroma=variant == "chroma",
    )


# --- export: PEFT modules -> kohya modules ------------------------------------------------------------------


def _swap_halves(rows: torch.Tensor) -> torch.Tensor:
    first, second = rows.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _fuse(original: str, parts: list[tuple[FusedSlice, LoraModule]]) -> KohyaModule:
    """One kohya module for a fused original weight from the LoRA modules of (some of) its parts."""
    total = parts[0][0].total
    scales = {module.alpha / module.rank for _, module in parts}
    common = scales.pop() if len(scales) == 1 else 1.0  # unequal scales are folded into the ups
    rank = sum(module.rank for _, module in parts)
    down = torch.cat([module.down.detach().float().cpu() for _, module in parts], dim=0)
    up = torch.zeros(total, rank, dtype=torch.float32)
    column = 0
    for where, module in parts:
        if module.up.shape[0] != where.width:
            raise FluxLoraError(
                f"{module.path} has {module.up.shape[0]} output rows but {original} holds {where.width} for it"
            )
        factor = (module.alpha / module.rank) / common
        block = module.up.detach().float().cpu()
        up[where.offset : where.offset + where.width, column : column + module.rank] = (
            block if factor == 1.0 else block * factor
        )
        column += module.rank
    return KohyaModule(kohya_module_name(original, UNET_PREFIX), down, up, common * rank)


def to_kohya_modules(modules: Iterable[LoraModule], dims: FluxDims) -> list[KohyaModule]:
    """kohya modules (original names, fused where the original layout fuses) for PEFT LoRA modules."""
    slices = diffusers_to_original_slices(dims)
    groups: dict[str, list[tuple[FusedSlice, LoraModule]]] = {}
    out: list[KohyaModule] = []
    for module in modules:
        if module.component == TEXT_ENCODER:
            name = f"{CLIP_PREFIX}_{text_model_path(module.path).replace('.', '_')}"
            out.append(
                KohyaModule(
                    name, module.down.detach().float().cpu(), module.up.detach().float().cpu(), module.alpha
                )
            )
            continue
        if module.component != TRANSFORMER:
            raise FluxLoraError(
                f"{module.component}.{module.path}: Flux LoRA files hold the transformer and CLIP-L only"
            )
        where = slices.get(module.path)
        if where is None:
            raise FluxLoraError(
                f"transformer module {module.path} has no place in the original Flux layout, so kohya-format "
                "tools cannot load it; export --format diffusers, or train the usual targets"
            )
        groups.setdefault(where.original, []).append((where, module))
    for original, parts in groups.items():
        if parts[0][0].count > 1:
            out.append(_fuse(original, sorted(parts, key=lambda item: item[0].index)))
            continue
        module = parts[0][1]
        up = module.up.detach().float().cpu()
        alpha = module.alpha
        if original.startswith("final_layer."):
            # diffusers' kohya converter reads the final layer without its alpha (scale 1): fold the scale in
            up, alpha = up * (module.alpha / module.rank), float(module.rank)
        if module.path == FINAL_MODULATION[1]:
            up = _swap_halves(up)  # diffusers keeps (scale, shift), the original layout (shift, scale)
        out.append(
            KohyaModule(
                kohya_module_name(original, UNET_PREFIX), module.down.detach().float().cpu(), up, alpha
            )
        )
    return sorted(out, key=lambda m: _natural(m.name))


def diffusers_skipped(names: Iterable[str]) -> list[str]:
    """kohya module names outside the double/single blocks: diffusers' `FluxPipeline.load_lora_weights`
    (0.42) converts them without the `transformer.` prefix it then filters on, so it skips them; ComfyUI and
    Forge load them."""
    blocks = (f"{UNET_PREFIX}_double_blocks_", f"{UNET_PREFIX}_single_blocks_", CLIP_PREFIX)
    return sorted(name for name in names if not name.startswith(blocks))


def _natural(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def kohya_state(modules: Iterable[KohyaModule], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """`<name>.lora_down.weight`, `<name>.lora_up.weight` and `<name>.alpha` per module."""
    out: dict[str, torch.Tensor] = {}
    for module in modules:
        down, up = module.down, module.up
        if dtype is not None:
            down, up = down.to(dtype), up.to(dtype)
        out[f"{module.name}.lora_down.weight"] = down.contiguous()
        out[f"{module.name}.lora_up.weight"] = up.contiguous()
        out[f"{module.name}.alpha"] = torch.tensor(float(module.alpha), dtype=dtype or torch.float32)
    return out


# --- import: kohya modules -> PEFT modules -------------------------------------------------------------------


def is_flux_kohya(keys: Iterable[str]) -> bool:
    """Whether tensor names are a kohya-style Flux LoRA (original block names)."""
    return any(k.startswith((f"{UNET_PREFIX}_double_blocks_", f"{UNET_PREFIX}_single_blocks_")) for k in keys)


def is_flux_diffusers(keys: Iterable[str]) -> bool:
    """Whether tensor names are a diffusers/PEFT Flux LoRA (`transformer.transformer_blocks.N...`)."""
    return any(
        k.startswith((f"{TRANSFORMER}.transformer_blocks.", f"{TRANSFORMER}.single_transformer_blocks."))
        for k in keys
    )


def not_lora_kinds(keys: Iterable[str]) -> list[str]:
    """The tensor kinds in `keys` that plain LoRA does not have (LoHa, LoKr, DoRA, full diffs, ...)."""
    return sorted({kind.strip("._") for k in keys for kind in NOT_LORA if kind in k})


@dataclass
class KohyaImport:
    """What reading a kohya Flux file found: modules on diffusers paths, and names it could not place."""

    modules: list[LoraModule]
    unknown: list[str]  # module names that are not in this model (or not CLIP-L / transformer)
    problems: list[str]  # modules in the model whose tensors do not fit it


def _kohya_names(dims: FluxDims) -> dict[str, tuple[str, list[FusedSlice], list[str]]]:
    """kohya name -> (original module, its slices in row order, the diffusers paths of its parts)."""
    grouped: dict[str, list[tuple[str, FusedSlice]]] = {}
    for path, where in diffusers_to_original_slices(dims).items():
        grouped.setdefault(where.original, []).append((path, where))
    out = {}
    for original, items in grouped.items():
        items.sort(key=lambda item: item[1].index)
        out[kohya_module_name(original, UNET_PREFIX)] = (
            original,
            [w for _, w in items],
            [p for p, _ in items],
        )
    return out


def _split(
    original: str,
    paths: list[str],
    slices: list[FusedSlice],
    down: torch.Tensor,
    up: torch.Tensor,
    alpha: float,
) -> list[LoraModule]:
    """Exact per-part modules of one fused original module (see the module docstring)."""
    scale = alpha / down.shape[0]
    modules = []
    for path, where in zip(paths, slices, strict=True):
        rows = up[where.offset : where.offset + where.width]
        used = rows.abs().sum(dim=0) != 0
        if not bool(used.any()):
            continue  # this part is not trained
        part_down, part_up = down[used], rows[:, used]
        modules.append(LoraModule(TRANSFORMER, path, part_down, part_up, scale * part_down.shape[0]))
    return modules


def from_kohya_state(
    state: Mapping[str, torch.Tensor], dims: FluxDims, in_features: Mapping[str, int] | None = None
) -> KohyaImport:
    """PEFT modules (diffusers paths; CLIP-L as `text_model...` paths) of a kohya Flux LoRA.

    `in_features`: input widths of the model's modules by diffusers path, to name modules whose inputs
    differ from the file's (another model's LoRA). Fused modules must have the rows of the original weight.
    """
    names = _kohya_names(dims)
    modules: list[LoraModule] = []
    unknown: list[str] = []
    problems: list[str] = []
    for key in sorted(state, key=_natural):
        if not key.endswith(".lora_down.weight"):
            continue
        name = key.removesuffix(".lora_down.weight")
        down = state[key].float()
        up_key = f"{name}.lora_up.weight"
        if up_key not in state:
            problems.append(f"{name} has lora_down without lora_up")
            continue
        up = state[up_key].float()
        alpha_t = state.get(f"{name}.alpha")
        alpha = float(alpha_t.item()) if alpha_t is not None else float(down.shape[0])
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            problems.append(
                f"{name}: lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)} do not pair"
            )
            continue
        clip = _CLIP_NAME.match(name)
        if clip:
            path = f"text_model.encoder.layers.{clip[1]}.{clip[2].replace('self_attn_', 'self_attn.').replace('mlp_', 'mlp.')}"
            modules.append(LoraModule(TEXT_ENCODER, path, down, up, alpha))
            continue
        target = names.get(name)
        if target is None:
            unknown.append(name)
            continue
        original, slices, paths = target
        if in_features is not None and paths[0] in in_features and in_features[paths[0]] != down.shape[1]:
            problems.append(
                f"{original} takes {down.shape[1]} inputs in the file, {in_features[paths[0]]} in this model"
            )
            continue
        if len(paths) == 1:
            if paths[0] == FINAL_MODULATION[1]:
                up = _swap_halves(up)
            modules.append(LoraModule(TRANSFORMER, paths[0], down, up, alpha))
            continue
        total = slices[0].total
        if up.shape[0] != total:
            widths = "+".join(str(s.width) for s in slices)
            problems.append(
                f"{original} has {up.shape[0]} output rows in the file, {total} ({widths}) in this model"
            )
            continue
        modules.extend(_split(original, paths, slices, down, up, alpha))
    return KohyaImport(modules, unknown, problems)


# --- metadata --------------------------------------------------------------------------------------------


def build_flux_metadata(
    info: KohyaInfo, variant: str, training: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """kohya `ss_*` and ModelSpec header metadata for a Flux LoRA (every value a string).

    The keys kohya's Flux trainer writes: `ss_base_model_version` `flux1`, `ss_network_module`
    `networks.lora_flux`, `modelspec.architecture` `flux-1-dev/lora`, `flux-1-schnell/lora` or `chroma/lora`,
    no `modelspec.prediction_type` (flow matching). `training` adds the Flux settings (`ss_guidance_scale`,
    `ss_timestep_sampling`, ...) as given."""
    if variant not in ARCHITECTURE:
        raise FluxLoraError(f"unknown Flux variant {variant!r}; expected dev, schnell or chroma")
    meta = build_metadata(info)
    for key in ("ss_v_parameterization", "ss_zero_terminal_snr", "modelspec.prediction_type"):
        meta.pop(key, None)
    finished = info.finished_at or time.time()
    meta.update(
        {
            "ss_v2": "False",
            "ss_base_model_version": BASE_MODEL_VERSION,
            "ss_network_module": NETWORK_MODULE
            if info.network_module == "networks.lora"
            else info.network_module,
            "ss_model_type": "chroma" if variant == "chroma" else "flux",
            "modelspec.architecture": ARCHITECTURE[variant],
            "modelspec.implementation": IMPLEMENTATION[variant],
            "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(finished)),
        }
    )
    for key, value in (training or {}).items():
        meta[key if key.startswith("ss_") else f"ss_{key}"] = (
            json.dumps(value) if isinstance(value, dict | list) else str(value)
        )
    meta.update(info.extra)
    return meta


def variant_from_metadata(metadata: Mapping[str, str]) -> str | None:
    """dev, schnell or chroma from a LoRA file's ModelSpec architecture (None when it does not say)."""
    arch = metadata.get("modelspec.architecture", "")
    for variant, value in ARCHITECTURE.items():
        if arch == value or arch.startswith(value.split("/")[0] + "/"):
            return variant
    if metadata.get("ss_model_type") == "chroma":
        return "chroma"
    return None
