"""Flux LoRA files: kohya `.safetensors` (default) or diffusers/PEFT `pytorch_lora_weights.safetensors`.

- kohya: original module names with fused weights (`kohya.py`), `alpha` per module, `ss_*` and `modelspec.*`
  metadata. ComfyUI, Forge and diffusers' `FluxPipeline.load_lora_weights` read it.
- diffusers: `transformer.<path>.lora_A.weight` / `.lora_B.weight` (`text_encoder.text_model...` for CLIP-L)
  with each module's scale folded into `lora_B`, so the file means the same with or without alpha metadata
  (diffusers reads scale 1 when a file has none, as does ComfyUI for these keys).

A Flux checkpoint holds `lora.safetensors` with `transformer.<path>.lora_A.weight` ... and meta.json with
`family` (`flux` or `chroma`), `variant` (`dev`, `schnell`, `chroma`), `module_scales`
(`transformer.<path>` -> alpha / rank as applied), `kohya` (the `KohyaInfo` fields), optionally
`transformer_config` (the diffusers transformer config, for the sizes) and `flux_training` (Flux settings
written as `ss_*` metadata). `export_flux_checkpoint` writes either format from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from loratui.models.flux.kohya import (
    ARCHITECTURE,
    TEXT_ENCODER,
    TRANSFORMER,
    FluxLoraError,
    build_flux_metadata,
    dims_from_lora,
    dims_of_transformer,
    from_kohya_state,
    is_flux_diffusers,
    is_flux_kohya,
    kohya_state,
    not_lora_kinds,
    to_kohya_modules,
    variant_from_metadata,
)
from loratui.models.flux.layout import FluxDims
from loratui.models.sd.kohya import (
    RUN_KEY,
    KohyaInfo,
    LoraModule,
    live_text_path,
    read_lora_file,
    text_model_path,
)
from loratui.util import jsonsafe

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
FLUX_FAMILIES = ("flux", "chroma")


@dataclass
class FluxLora:
    """A Flux LoRA read from a file: modules on diffusers paths (scale = alpha / rank each)."""

    modules: list[LoraModule]
    fmt: str  # kohya | diffusers
    variant: str | None  # dev | schnell | chroma, when the file says
    metadata: dict[str, str] = field(default_factory=dict)


def is_flux_lora_keys(keys: list[str]) -> bool:
    """Whether tensor names are a Flux LoRA in the kohya or a diffusers-style layout."""
    return is_flux_kohya(keys) or is_flux_diffusers(list(normalised_keys(dict.fromkeys(keys))))


# --- writing -------------------------------------------------------------------------------------------------


def write_flux_kohya(
    path: Path,
    modules: list[LoraModule],
    dims: FluxDims,
    info: KohyaInfo,
    variant: str,
    *,
    training: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the kohya/ComfyUI file with `ss_*` and ModelSpec metadata, atomically."""
    from safetensors.torch import save

    from loratui.util.atomic import atomic_write_bytes

    state = kohya_state(to_kohya_modules(modules, dims), dtype=dtype)
    atomic_write_bytes(Path(path), save(state, metadata=build_flux_metadata(info, variant, training)))
    return Path(path)


def diffusers_state(modules: list[LoraModule], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """PEFT tensors with each module's scale folded into `lora_B` (the file's meaning needs no alpha)."""
    tensors: dict[str, torch.Tensor] = {}
    for module in modules:
        path = text_model_path(module.path) if module.component == TEXT_ENCODER else module.path
        down = module.down.detach().float().cpu()
        up = module.up.detach().float().cpu() * (module.alpha / module.rank)
        if dtype is not None:
            down, up = down.to(dtype), up.to(dtype)
        tensors[f"{module.component}.{path}.lora_A.weight"] = down.contiguous()
        tensors[f"{module.component}.{path}.lora_B.weight"] = up.contiguous()
    return tensors


def write_flux_diffusers(
    path: Path,
    modules: list[LoraModule],
    variant: str | None,
    *,
    dtype: torch.dtype | None = None,
    run: str | None = None,
) -> Path:
    """Write a diffusers/PEFT LoRA file (`pipe.load_lora_weights(folder)` loads it), atomically."""
    from safetensors.torch import save

    from loratui.util.atomic import atomic_write_bytes

    metadata = {"format": "pt"}
    if variant in ARCHITECTURE:
        metadata["modelspec.architecture"] = ARCHITECTURE[variant]
    if run:
        metadata[RUN_KEY] = run
    atomic_write_bytes(Path(path), save(diffusers_state(modules, dtype), metadata=metadata))
    return Path(path)


# --- reading -------------------------------------------------------------------------------------------------


def _diffusers_alpha(config: dict[str, Any], component: str, path: str, rank: int) -> float:
    pattern = config.get(f"{component}.alpha_pattern") or {}
    for key, value in pattern.items():
        if path == key or path.endswith("." + key):
            return float(value)
    return float(config.get(f"{component}.lora_alpha", rank))


#: module paths at the top of a Flux transformer, for files that leave out the `transformer.` prefix
_TRANSFORMER_ROOTS = (
    "transformer_blocks.",
    "single_transformer_blocks.",
    "x_embedder",
    "context_embedder",
    "time_text_embed.",
    "norm_out.",
    "proj_out",
)


def normalised_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers-style keys as other trainers write them, in one spelling: `transformer.<path>.lora_A.weight`
    (PEFT's `base_model.model.` prefix or no prefix at all; `lora_down`/`lora_up` under `transformer.`)."""
    out = {}
    for key, tensor in tensors.items():
        name = key.removeprefix("base_model.model.")
        if name.startswith(_TRANSFORMER_ROOTS):
            name = f"{TRANSFORMER}.{name}"
        if name.startswith(f"{TRANSFORMER}."):
            name = name.replace(".lora_down.weight", ".lora_A.weight").replace(
                ".lora_up.weight", ".lora_B.weight"
            )
        out[name] = tensor
    return out


def diffusers_modules(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> list[LoraModule]:
    """Modules of a diffusers/PEFT Flux LoRA (`transformer.<path>.lora_A.weight`, alpha tensors or
    `lora_adapter_metadata` when present, else scale 1 as diffusers reads such files)."""
    config = jsonsafe.loads(metadata.get("lora_adapter_metadata", "{}") or "{}", "lora_adapter_metadata")
    modules = []
    for key in sorted(tensors):
        if not key.endswith(".lora_A.weight"):
            continue
        stem = key.removesuffix(".lora_A.weight")
        component, _, path = stem.partition(".")
        if component not in (TRANSFORMER, TEXT_ENCODER):
            raise FluxLoraError(
                f"{key}: a Flux LoRA holds transformer and text_encoder (CLIP-L) modules only"
            )
        up = tensors.get(f"{stem}.lora_B.weight")
        if up is None:
            raise FluxLoraError(f"{stem} has lora_A without lora_B")
        down = tensors[key].float()
        alpha_t = tensors.get(f"{stem}.alpha")
        alpha = (
            float(alpha_t.item())
            if alpha_t is not None
            else _diffusers_alpha(config, component, path, int(down.shape[0]))
        )
        modules.append(LoraModule(component, path, down, up.float(), alpha))
    return modules


def read_flux_lora(
    path: Path, *, dims: FluxDims | None = None, in_features: dict[str, int] | None = None
) -> FluxLora:
    """Read a kohya or diffusers Flux LoRA file as modules on diffusers paths.

    `dims`: the sizes of the model it is meant for (a kohya file's fused modules are split at its widths;
    without it they come from the file). Raises `FluxLoraError` naming what does not fit, `LoraFileError` for an
    unreadable file."""
    tensors, metadata = read_lora_file(Path(path))
    keys = list(tensors)
    odd = not_lora_kinds(keys)
    if odd:
        raise FluxLoraError(
            f"{path} holds {', '.join(odd)} tensors: it is not a plain LoRA (LyCORIS/DoRA/full-weight diffs); "
            "loratui reads plain LoRA Flux files only"
        )
    variant = variant_from_metadata(metadata)
    if is_flux_kohya(keys):
        sizes = dims or dims_from_lora(tensors, variant or "dev")
        found = from_kohya_state(tensors, sizes, in_features)
        if found.unknown:
            raise FluxLoraError(
                f"{len(found.unknown)} module(s) of {path} are not in this Flux transformer or CLIP-L, e.g. "
                f"{', '.join(found.unknown[:3])}; was it trained for another model (T5 LoRA, Flux.2, SD)?"
            )
        if found.problems:
            raise FluxLoraError(
                f"{path} does not fit this model: {'; '.join(found.problems[:3])}"
                + (f" (and {len(found.problems) - 3} more)" if len(found.problems) > 3 else "")
            )
        return FluxLora(found.modules, "kohya", variant, metadata)
    tensors = normalised_keys(tensors)
    if is_flux_diffusers(list(tensors)):
        modules = diffusers_modules(tensors, metadata)
        return FluxLora(modules, "diffusers", variant, metadata)
    first = next(iter(tensors), "no tensors")
    raise FluxLoraError(
        f"{path} is not a Flux LoRA (first tensor: {first}); Flux LoRAs name lora_unet_double_blocks_N_... "
        "(kohya) or transformer.transformer_blocks.N... (diffusers)"
    )


# --- checkpoints -----------------------------------------------------------------------------------------------


def flux_checkpoint_modules(lora_state: dict[str, torch.Tensor], meta: dict[str, Any]) -> list[LoraModule]:
    """The LoRA modules of a Flux checkpoint with their alphas (scale x rank, from `module_scales`)."""
    scales = {k: float(v) for k, v in (meta.get("module_scales") or {}).items()}
    modules = []
    for key in sorted(lora_state):
        if not key.endswith(".lora_A.weight"):
            continue
        stem = key.removesuffix(".lora_A.weight")
        component, _, path = stem.partition(".")
        down = lora_state[key]
        up = lora_state[f"{stem}.lora_B.weight"]
        scale = scales.get(stem)
        if scale is None:
            lora = meta.get("lora") or {}
            if "alpha" not in lora or "rank" not in lora:
                raise FluxLoraError(f"the checkpoint records no scale for {stem}")
            scale = float(lora["alpha"]) / float(lora["rank"])
        modules.append(LoraModule(component, path, down, up, scale * down.shape[0]))
    return modules


def checkpoint_variant(meta: dict[str, Any]) -> str:
    variant = meta.get("variant") or ("chroma" if meta.get("family") == "chroma" else None)
    if variant not in ARCHITECTURE:
        raise FluxLoraError(
            f"the checkpoint does not say which Flux variant it trained (variant: {variant!r})"
        )
    return str(variant)


def checkpoint_dims(lora_state: dict[str, torch.Tensor], meta: dict[str, Any], variant: str) -> FluxDims:
    config = meta.get("transformer_config")
    if config:
        from loratui.models.flux.layout import dims_from_diffusers_config

        return dims_from_diffusers_config(config, chroma=variant == "chroma")
    return dims_from_lora(lora_state, variant)


#: checkpoint meta keys that fill `KohyaInfo` fields when the meta has no `kohya` block
_META_TO_INFO = {
    "name": "name",
    "learning_rate": "learning_rate",
    "resolution": "resolution",
    "seed": "seed",
    "base_model_name": "base_model_name",
    "started_at": "started_at",
    "total_steps": "max_train_steps",
    "run": "run",
}
#: checkpoint meta keys of the Flux objective, written as kohya's `ss_*` keys
_FLUX_SETTINGS = (
    "timestep_sampling",
    "guidance_scale",
    "sigmoid_scale",
    "discrete_flow_shift",
    "t5_max_length",
)


def kohya_info_from_meta(meta: dict[str, Any], variant: str) -> KohyaInfo:
    """The `KohyaInfo` of a checkpoint: its `kohya` block, else what the meta records."""
    known = {f.name for f in fields(KohyaInfo)}
    values = {k: v for k, v in (meta.get("kohya") or {}).items() if k in known}
    for key, name in _META_TO_INFO.items():
        if meta.get(key) is not None:
            values.setdefault(name, meta[key])
    lora = meta.get("lora") or {}
    values.setdefault("name", "lora")
    values.setdefault("rank", int(lora.get("rank", 0)))
    scale = float(lora["alpha"]) / float(lora["rank"]) if lora.get("rank") else 1.0
    values.setdefault("alpha", float(meta.get("kohya_alpha", scale * values["rank"])))
    values["family"] = "chroma" if variant == "chroma" else "flux"
    values.setdefault("resolution", 1024)
    if isinstance(values["resolution"], list | tuple):
        values["resolution"] = int(values["resolution"][0])
    return KohyaInfo(**values)


def flux_settings(meta: dict[str, Any]) -> dict[str, Any]:
    """The Flux training settings of a checkpoint for the `ss_*` metadata."""
    settings = dict(meta.get("flux_training") or {})
    for key in _FLUX_SETTINGS:
        if meta.get(key) is not None:
            settings.setdefault(key, meta[key])
    return settings


def write_flux_checkpoint_lora(
    target: Path,
    lora_state: dict[str, torch.Tensor],
    meta: dict[str, Any],
    *,
    fmt: str,
    step: int,
    dtype: torch.dtype | None = None,
    finished_at: float | None = None,
) -> Path:
    """Write the LoRA of a Flux checkpoint (its tensors and meta) as a kohya or diffusers file."""
    variant = checkpoint_variant(meta)
    modules = flux_checkpoint_modules(lora_state, meta)
    if fmt == "diffusers":
        return write_flux_diffusers(target, modules, variant, dtype=dtype, run=meta.get("run"))
    info = kohya_info_from_meta(meta, variant)
    info.steps, info.epoch = step, int(meta.get("epochs_done", info.epoch))
    if finished_at is not None:
        info.finished_at = finished_at
    if meta.get("run"):
        info.run = meta["run"]
    dims = checkpoint_dims(lora_state, meta, variant)
    return write_flux_kohya(target, modules, dims, info, variant, training=flux_settings(meta), dtype=dtype)


# --- init_lora -------------------------------------------------------------------------------------------------


def module_in_features(model: torch.nn.Module) -> dict[str, int]:
    """Input width per Linear module path (PEFT-wrapped modules under their original paths)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".lora_" not in name:
            out[name.removesuffix(".base_layer")] = int(module.in_features)
    return out


def read_flux_init_lora(path: Path, transformer: torch.nn.Module) -> FluxLora:
    """An `init_lora` file (kohya or diffusers, from loratui or another trainer) read for this transformer."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FluxLoraError(f"init_lora not found: {path}")
    return read_flux_lora(
        path, dims=dims_of_transformer(transformer), in_features=module_in_features(transformer)
    )


def _lora_layers(model: torch.nn.Module) -> dict[str, Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}


@torch.no_grad()
def apply_flux_init_lora(
    modules: list[LoraModule], components: dict[str, torch.nn.Module], adapter: str = "default"
) -> tuple[int, list[str]]:
    """Start the run's LoRA layers from `modules`, exactly: each module's scale is rescaled to the layer's,
    a smaller rank fills the first rows of `lora_A` (the rest keep their fresh values, with zero `lora_B`
    columns, so they add nothing yet). Returns (modules loaded, modules this run does not train).

    Raises `FluxLoraError` for a rank above the run's `lora_rank` or a shape that differs."""
    layers = {name: _lora_layers(model) for name, model in components.items()}
    loaded, skipped = 0, []
    for module in modules:
        component_layers = layers.get(module.component, {})
        path = module.path
        if module.component == TEXT_ENCODER and module.component in components:
            path = live_text_path(path, not hasattr(components[module.component], "text_model"))
        layer = component_layers.get(path)
        if layer is None or adapter not in layer.lora_A:
            skipped.append(f"{module.component}.{module.path}")
            continue
        lora_a, lora_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        rank = lora_a.shape[0]
        if module.rank > rank:
            raise FluxLoraError(
                f"init_lora: {module.path} has rank {module.rank}, this run trains rank {rank}; "
                f"set lora_rank: {module.rank} (or more)"
            )
        if module.down.shape[1] != lora_a.shape[1] or module.up.shape[0] != lora_b.shape[0]:
            raise FluxLoraError(
                f"init_lora: {module.path} is {module.up.shape[0]}x{module.down.shape[1]} in the file, "
                f"{lora_b.shape[0]}x{lora_a.shape[1]} in this model; was it trained for another model?"
            )
        factor = (module.alpha / module.rank) / float(layer.scaling[adapter])
        lora_a[: module.rank].copy_(module.down.to(lora_a.dtype))
        lora_b.zero_()
        lora_b[:, : module.rank].copy_((module.up * factor).to(lora_b.dtype))
        loaded += 1
    return loaded, skipped


# --- checkpoint folders -----------------------------------------------------------------------------------------


def is_flux_checkpoint_meta(meta: dict[str, Any]) -> bool:
    return meta.get("family") in FLUX_FAMILIES


def default_output(meta: dict[str, Any], fmt: str, out: Path | None) -> Path:
    """Where an export goes: `out` (a file, or a folder to put the file in), else the run's output_dir."""
    name = DIFFUSERS_FILE if fmt == "diffusers" else f"{meta.get('name') or 'lora'}.safetensors"
    if out is None:
        return Path(meta.get("output_dir") or ".") / name
    out = Path(out)
    return out if out.suffix == ".safetensors" else out / name


def export_flux_checkpoint(
    checkpoint: Path,
    *,
    fmt: str = "kohya",
    out: Path | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    resuming: bool = False,
    finished_at: float | None = None,
    ema: bool = False,
) -> Path:
    """Write the LoRA of a Flux checkpoint folder (its EMA weights with `ema`); returns the file written.

    The trainer calls it after the last step (`fmt="kohya"`), `loratui export` for a run or checkpoint."""
    from loratui.models.sd.lora_files import check_output, ema_lora_state
    from loratui.runs.checkpoints import load_checkpoint
    from loratui.util.disk import no_space_guard, tensor_bytes

    ckpt = load_checkpoint(Path(checkpoint), training_state=ema)
    meta = ckpt.meta
    lora_state = ema_lora_state(ckpt, Path(checkpoint)) if ema else ckpt.lora_state
    if meta.get("network_type", "lora") != "lora":
        raise FluxLoraError(
            f"this checkpoint is {meta['network_type']}; Flux LoRA files hold plain LoRA (network_type: lora)"
        )
    target = default_output(meta, fmt, out)
    check_output(target, meta.get("run"), overwrite=overwrite, resuming=resuming)
    target.parent.mkdir(parents=True, exist_ok=True)
    with no_space_guard(target, what="the exported LoRA", needed=tensor_bytes(lora_state)):
        return write_flux_checkpoint_lora(
            target, lora_state, meta, fmt=fmt, step=ckpt.step, dtype=dtype, finished_at=finished_at
        )
