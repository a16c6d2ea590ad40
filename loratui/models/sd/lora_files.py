"""Stable Diffusion LoRA files: kohya/A1111 `.safetensors` (default) or diffusers `pytorch_lora_weights`.

`export_checkpoint` writes the LoRA of a checkpoint folder; the trainer calls it after the last step, and
`loratui export` (`loratui.export.sd_export`) for a run or checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from loratui.models.sd.kohya import (
    RUN_KEY,
    KohyaInfo,
    LoraModule,
    build_metadata,
    modules_from_peft,
    save_kohya,
    text_model_path,
)
from loratui.util.disk import no_space_guard, tensor_bytes

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"


DTYPES = {
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


class ExportError(ValueError):
    """An export that cannot be done (clear message, nothing written)."""


def usage_string(name: str, weight: float = 0.8) -> str:
    """What to type in AUTOMATIC1111/Forge prompts."""
    return f"<lora:{name}:{weight}>"


def parse_dtype(dtype: str | None) -> torch.dtype | None:
    if dtype is None:
        return None
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise ExportError(f"unknown --dtype {dtype!r}; use fp16, bf16 or fp32") from None


def file_run(path: Path) -> str | None:
    """The run that wrote an exported LoRA file (from its header), or None."""
    try:
        from loratui.config.base_model import read_safetensors_header

        return (read_safetensors_header(Path(path)).get("__metadata__") or {}).get(RUN_KEY)
    except (OSError, ValueError):
        return None


def check_output(path: Path, run: str | None, *, overwrite: bool, resuming: bool = False) -> None:
    """Refuse to replace a file written by a different run (or by another tool) unless allowed."""
    path = Path(path)
    if not path.exists() or overwrite or resuming:
        return
    owner = file_run(path)
    if run is not None and owner == run:
        return
    who = f"run {owner}" if owner else "another tool or an unknown run"
    raise ExportError(
        f"{path} already exists and was written by {who}; not replacing it. Use --overwrite, choose another "
        "output_dir/output_name, or --resume that run"
    )


def write_kohya(
    path: Path,
    modules: list[LoraModule],
    info: KohyaInfo,
    *,
    layers_per_block: int = 2,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the kohya/A1111 file with `ss_*` and ModelSpec metadata."""
    return save_kohya(
        path, modules, info.family, build_metadata(info), layers_per_block=layers_per_block, dtype=dtype
    )


def write_diffusers(
    path: Path, modules: list[LoraModule], *, dtype: torch.dtype | None = None, run: str | None = None
) -> Path:
    """Write a diffusers LoRA file (`unet.<path>.lora_A.weight` ...) with PEFT config metadata per component."""
    from safetensors.torch import save

    from loratui.util.atomic import atomic_write_bytes

    tensors: dict[str, torch.Tensor] = {}
    config: dict[str, Any] = {}
    by_component: dict[str, list[LoraModule]] = {}
    for module in modules:
        by_component.setdefault(module.component, []).append(module)
    for component, items in by_component.items():
        for module in items:
            path_out = module.path if component == "unet" else text_model_path(module.path)
            down, up = module.down.detach().cpu(), module.up.detach().cpu()
            if dtype is not None:
                down, up = down.to(dtype), up.to(dtype)
            tensors[f"{component}.{path_out}.lora_A.weight"] = down.contiguous()
            tensors[f"{component}.{path_out}.lora_B.weight"] = up.contiguous()
        rank = items[0].rank
        alphas = {m.alpha for m in items}
        config.update(
            {
                f"{component}.r": rank,
                f"{component}.lora_alpha": items[0].alpha if len(alphas) == 1 else max(alphas),
                f"{component}.target_modules": sorted(_target_names(items)),
                f"{component}.lora_dropout": 0.0,
                f"{component}.bias": "none",
                f"{component}.init_lora_weights": True,
                f"{component}.use_dora": False,
            }
        )
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(config, sort_keys=True)}
    if run:
        metadata[RUN_KEY] = run
    atomic_write_bytes(Path(path), save(tensors, metadata=metadata))
    return Path(path)


def _target_names(modules: list[LoraModule]) -> set[str]:
    """PEFT target names that select exactly these modules' kind (`to_q`, `to_out.0`, `q_proj`, ...)."""
    names = set()
    for module in modules:
        parts = module.path.split(".")
        names.add(".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1])
    return names


def kohya_info_from_meta(meta: dict[str, Any]) -> KohyaInfo:
    known = {f.name for f in fields(KohyaInfo)}
    return KohyaInfo(**{k: v for k, v in (meta.get("kohya") or {}).items() if k in known})


def checkpoint_scales(lora_state: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, float]:
    """`<component>.<path>` -> adapter scale: recorded per module, or one kohya alpha (older checkpoints)."""
    if "module_scales" in meta:
        return {k: float(v) for k, v in meta["module_scales"].items()}
    alpha = float(meta["kohya_alpha"])
    return {
        key[: -len(".lora_A.weight")]: alpha / tensor.shape[0]
        for key, tensor in lora_state.items()
        if key.endswith(".lora_A.weight")
    }


def write_lycoris(
    path: Path,
    lora_state: dict[str, torch.Tensor],
    scales: dict[str, float],
    info: KohyaInfo,
    *,
    layers_per_block: int = 2,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write any adapter type in the LyCORIS/kohya key layout with `ss_*` and ModelSpec metadata."""
    from safetensors.torch import save

    from loratui.models.sd.lycoris import to_lycoris_state
    from loratui.util.atomic import atomic_write_bytes

    state = to_lycoris_state(lora_state, scales, info.family, layers_per_block=layers_per_block, dtype=dtype)
    atomic_write_bytes(Path(path), save(state, metadata=build_metadata(info)))
    return Path(path)


def _default_path(meta: dict[str, Any], fmt: str) -> Path:
    folder = Path(meta.get("output_dir") or ".")
    if fmt == "diffusers":
        return folder / DIFFUSERS_FILE
    return folder / f"{meta.get('name') or 'lora'}.safetensors"


def export_checkpoint(
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
    """Write the LoRA of a checkpoint folder (its EMA weights with `ema`); returns the file written."""
    from loratui.runs.checkpoints import load_checkpoint

    ckpt = load_checkpoint(Path(checkpoint), training_state=ema)
    meta = ckpt.meta
    lora_state = ema_lora_state(ckpt, Path(checkpoint)) if ema else ckpt.lora_state
    network_type = meta.get("network_type", "lora")
    if fmt == "diffusers" and network_type not in ("lora", "locon"):
        raise ExportError(
            f"the diffusers format holds LoRA only; this checkpoint is {network_type}: export --format kohya "
            "(the LyCORIS key layout that ComfyUI and A1111/Forge load)"
        )
    target = _resolve_out(out, meta, fmt)
    check_output(target, meta.get("run"), overwrite=overwrite, resuming=resuming)
    target.parent.mkdir(parents=True, exist_ok=True)
    needed = tensor_bytes(lora_state)
    with no_space_guard(target, what="the exported LoRA", needed=needed):
        scales = checkpoint_scales(lora_state, meta)
        if fmt == "diffusers":
            modules = modules_from_peft(lora_state, 1.0)
            for module in modules:
                module.alpha = scales[f"{module.component}.{module.path}"] * module.rank
            return write_diffusers(target, modules, dtype=dtype, run=meta.get("run"))
        info = kohya_info_from_meta(meta)
        info.steps, info.epoch = ckpt.step, int(meta.get("epochs_done", info.epoch))
        if finished_at is not None:
            info.finished_at = finished_at
        layers = int(meta.get("unet_layers_per_block", 2))
        return write_lycoris(target, lora_state, scales, info, layers_per_block=layers, dtype=dtype)


def ema_lora_state(ckpt: Any, path: Path) -> dict[str, torch.Tensor]:
    """The EMA weights a checkpoint's training state holds, keyed like its `lora.safetensors`."""
    from loratui.runs.checkpoints import nonfinite_tensors

    saved = (ckpt.training_state or {}).get("ema")
    if not saved:
        raise ExportError(f"{path} holds no EMA weights: train with ema_decay (e.g. 0.999) to keep them")
    state = {key: tensor.float() for key, tensor in saved["shadow"].items()}
    if set(state) != set(ckpt.lora_state):
        raise ExportError(f"{path}: the EMA tensors do not match the LoRA tensors; the checkpoint is damaged")
    bad = nonfinite_tensors(state)
    if bad:
        raise ExportError(
            f"{path}: the EMA weights hold nan/inf values (e.g. {bad[0]}); export without --ema"
        )
    return state


def _resolve_out(out: Path | None, meta: dict[str, Any], fmt: str) -> Path:
    if out is None:
        return _default_path(meta, fmt)
    out = Path(out)
    if out.suffix == ".safetensors":
        return out
    return out / (DIFFUSERS_FILE if fmt == "diffusers" else f"{meta.get('name') or 'lora'}.safetensors")
