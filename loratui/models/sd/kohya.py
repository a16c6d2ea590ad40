"""The kohya/A1111 LoRA file format: module names, tensors and header metadata.

One module = `<name>.lora_down.weight` [r, in], `<name>.lora_up.weight` [out, r] and `<name>.alpha`
(0-dim). `<name>` = prefix + module path with `.` replaced by `_`. SD 1.x/2.x UNets use diffusers module
paths; SDXL files use the original (SGM) UNet block names (`input_blocks.4.1...`, `middle_block.1...`,
`output_blocks.0.1...`). Text encoders: `lora_te` (SD 1.x/2.x), `lora_te1`/`lora_te2` (SDXL), always with
the `text_model.` path of transformers' CLIP models.

Inside loratui LoRA weights are kept with PEFT names: `<component>.<module path>.lora_A.weight` and
`.lora_B.weight`, component = unet, text_encoder or text_encoder_2.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
BASE_MODEL_VERSION = {"sd15": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
RUN_KEY = "loratui_run"
_RESNET_TO_SGM = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]


@dataclass
class LoraModule:
    """One adapted module: its place in the pipeline and its LoRA tensors."""

    component: str  # unet | text_encoder | text_encoder_2
    path: str  # module path inside the component (as in the live model)
    down: torch.Tensor  # lora_A / lora_down [r, in] (or [r, in, kh, kw] for convolutions)
    up: torch.Tensor  # lora_B / lora_up [out, r]
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


# --- names ---------------------------------------------------------------------------------------------


def text_model_path(path: str) -> str:
    """A CLIP text-encoder module path as kohya and diffusers files spell it (`text_model.encoder...`).

    transformers >= 5.6 flattened `CLIPTextModel` (no `text_model.` level); files keep the old spelling.
    """
    if path.startswith(("text_model.", "text_projection")):
        return path
    return "text_model." + path


def live_text_path(path: str, flattened: bool) -> str:
    """The inverse of `text_model_path` for a model that is (or is not) flattened."""
    return path.removeprefix("text_model.") if flattened else text_model_path(path)


def unet_path_to_sgm(path: str, layers_per_block: int = 2) -> str:
    """diffusers UNet module path -> the original SGM path used in SDXL kohya files."""
    step = layers_per_block + 1

    def resnet(rest: str) -> str:
        for new, old in ((a, b) for a, b in _RESNET_TO_SGM):
            if rest == new or rest.startswith(new + "."):
                return old + rest[len(new) :]
        return rest

    match = re.match(r"down_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.+)", path)
    if match:
        block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        index = 1 + block * step + layer
        return (
            f"input_blocks.{index}.1.{rest}"
            if kind == "attentions"
            else f"input_blocks.{index}.0.{resnet(rest)}"
        )
    match = re.match(r"up_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.+)", path)
    if match:
        block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        index = block * step + layer
        return (
            f"output_blocks.{index}.1.{rest}"
            if kind == "attentions"
            else f"output_blocks.{index}.0.{resnet(rest)}"
        )
    match = re.match(r"mid_block\.attentions\.0\.(.+)", path)
    if match:
        return f"middle_block.1.{match[1]}"
    match = re.match(r"mid_block\.resnets\.(\d)\.(.+)", path)
    if match:
        return f"middle_block.{2 * int(match[1])}.{resnet(match[2])}"
    raise ValueError(f"UNet module {path} has no SDXL (SGM) kohya name; train attention/resnet modules only")


def te_prefix(component: str, family: str) -> str:
    if component == "text_encoder":
        return "lora_te1" if family == "sdxl" else "lora_te"
    if component == "text_encoder_2":
        return "lora_te2"
    raise ValueError(f"not a text encoder: {component}")


def kohya_name(component: str, path: str, family: str, layers_per_block: int = 2) -> str:
    """The kohya module name of `path` in `component` for a model family."""
    if component == "unet":
        full = unet_path_to_sgm(path, layers_per_block) if family == "sdxl" else path
        return "lora_unet_" + full.replace(".", "_")
    return te_prefix(component, family) + "_" + text_model_path(path).replace(".", "_")


def name_map(
    module_paths: dict[str, Iterable[str]], family: str, layers_per_block: int = 2
) -> dict[str, tuple[str, str]]:
    """kohya name -> (component, live module path), for every module path given per component."""
    out: dict[str, tuple[str, str]] = {}
    for component, paths in module_paths.items():
        for path in paths:
            try:
                out[kohya_name(component, path, family, layers_per_block)] = (component, path)
            except ValueError:
                continue
    return out


# --- PEFT state <-> modules ------------------------------------------------------------------------------


def modules_from_peft(state: dict[str, torch.Tensor], alphas: dict[str, float] | float) -> list[LoraModule]:
    """LoRA modules from `<component>.<path>.lora_A.weight` / `.lora_B.weight` tensors.

    `alphas` is one alpha for every module, or a dict by component (`unet`, `text_encoder`, ...).
    """
    modules = []
    for key in sorted(state):
        if not key.endswith(".lora_A.weight"):
            continue
        stem = key[: -len(".lora_A.weight")]
        component, _, path = stem.partition(".")
        up = state.get(stem + ".lora_B.weight")
        if up is None:
            raise ValueError(f"{stem}: lora_A without lora_B")
        alpha = alphas if isinstance(alphas, int | float) else alphas.get(component)
        if alpha is None:
            raise ValueError(f"no alpha for component {component}")
        modules.append(LoraModule(component, path, state[key], up, float(alpha)))
    return modules


def modules_to_peft(modules: Iterable[LoraModule]) -> dict[str, torch.Tensor]:
    """The inverse of `modules_from_peft` (tensors only)."""
    out = {}
    for module in modules:
        out[f"{module.component}.{module.path}.lora_A.weight"] = module.down
        out[f"{module.component}.{module.path}.lora_B.weight"] = module.up
    return out


def to_kohya_state(
    modules: Iterable[LoraModule], family: str, *, layers_per_block: int = 2, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """kohya tensors (`lora_down`/`lora_up`/`alpha` per module)."""
    out: dict[str, torch.Tensor] = {}
    for module in modules:
        name = kohya_name(module.component, module.path, family, layers_per_block)
        down, up = module.down.detach().cpu(), module.up.detach().cpu()
        if dtype is not None:
            down, up = down.to(dtype), up.to(dtype)
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(module.alpha, dtype=dtype or torch.float32)
    return out


def from_kohya_state(
    state: dict[str, torch.Tensor], names: dict[str, tuple[str, str]]
) -> tuple[list[LoraModule], list[str]]:
    """Modules of a kohya state dict mapped with `names` (see `name_map`); also the names not found."""
    modules, unknown = [], []
    for key in sorted(state):
        if not key.endswith(".lora_down.weight"):
            continue
        name = key[: -len(".lora_down.weight")]
        target = names.get(name)
        if target is None:
            unknown.append(name)
            continue
        down = state[key].float()
        up = state[f"{name}.lora_up.weight"].float()
        alpha_t = state.get(f"{name}.alpha")
        alpha = float(alpha_t.item()) if alpha_t is not None else float(down.shape[0])
        modules.append(LoraModule(target[0], target[1], down, up, alpha))
    return modules, unknown


def is_kohya_state(keys: Iterable[str]) -> bool:
    return any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys)


def family_from_lora_keys(state: dict[str, torch.Tensor]) -> str:
    """sd15, sd2 or sdxl from a LoRA's names and cross-attention widths (kohya or diffusers keys)."""
    keys = list(state)
    if any(
        k.startswith(("lora_te2_", "text_encoder_2.")) or "input_blocks" in k or "output_blocks" in k
        for k in keys
    ):
        return "sdxl"
    for key, value in state.items():
        if "attn2" in key and "to_k" in key and ("lora_down" in key or "lora_A" in key):
            return "sd2" if value.shape[-1] == 1024 else "sd15"
    return "sd15"


# --- metadata --------------------------------------------------------------------------------------------


@dataclass
class KohyaInfo:
    """What the header metadata of an exported LoRA describes."""

    name: str
    family: str
    rank: int
    alpha: float
    prediction_type: str = "epsilon"
    zero_terminal_snr: bool = False
    dropout: float = 0.0
    learning_rate: float | None = None
    text_encoder_lr: float | None = None
    train_unet: bool = True
    train_text_encoder: bool = False
    num_train_images: int = 0
    num_epochs: int = 0
    max_train_steps: int = 0
    steps: int = 0
    epoch: int = 0
    batch_size: int = 1  # per device
    gradient_accumulation_steps: int = 1
    num_processes: int = 1  # training processes (GPUs); the global batch is per device x accumulation x this
    total_batch_size: int | None = None  # samples per optimizer step over all processes (None: the product)
    mixed_precision: str = "no"
    resolution: int = 512
    seed: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)
    dataset_dirs: dict[str, dict[str, int]] = field(default_factory=dict)
    base_model_name: str = ""
    trigger_word: str | None = None
    run: str | None = None
    network_args: dict[str, Any] = field(default_factory=dict)
    network_module: str = "networks.lora"  # lycoris.kohya for LoHa, LoKr and DoRA
    extra: dict[str, str] = field(default_factory=dict)


def _architecture(family: str, prediction_type: str) -> str:
    if family == "sdxl":
        return "stable-diffusion-xl-v1-base/lora"
    if family == "sd2":
        return (
            "stable-diffusion-v2-768-v/lora"
            if prediction_type == "v_prediction"
            else "stable-diffusion-v2-512/lora"
        )
    return "stable-diffusion-v1/lora"


def build_metadata(info: KohyaInfo) -> dict[str, str]:
    """kohya `ss_*` and ModelSpec header metadata (every value a string)."""
    finished = info.finished_at or time.time()
    res = f"{info.resolution}x{info.resolution}"
    meta: dict[str, Any] = {
        "ss_v2": str(info.family == "sd2"),
        "ss_base_model_version": BASE_MODEL_VERSION.get(info.family, "sd_v1"),
        "ss_network_module": info.network_module,
        "ss_network_dim": str(info.rank),
        "ss_network_alpha": _num(info.alpha),
        "ss_network_args": json.dumps(info.network_args),
        "ss_network_dropout": _num(info.dropout),
        "ss_output_name": info.name,
        "ss_learning_rate": _num(info.learning_rate) if info.learning_rate is not None else "None",
        "ss_unet_lr": _num(info.learning_rate)
        if info.train_unet and info.learning_rate is not None
        else "None",
        "ss_text_encoder_lr": (
            _num(info.text_encoder_lr or info.learning_rate)
            if info.train_text_encoder and info.learning_rate
            else "None"
        ),
        "ss_network_train_unet_only": str(not info.train_text_encoder),
        "ss_num_train_images": str(info.num_train_images),
        "ss_num_epochs": str(info.num_epochs),
        "ss_steps": str(info.steps),
        "ss_max_train_steps": str(info.max_train_steps or info.steps),
        "ss_epoch": str(info.epoch),
        "ss_batch_size_per_device": str(info.batch_size),
        "ss_gradient_accumulation_steps": str(info.gradient_accumulation_steps),
        "ss_total_batch_size": str(
            info.total_batch_size or info.batch_size * info.gradient_accumulation_steps * info.num_processes
        ),
        "ss_num_processes": str(info.num_processes),
        "ss_mixed_precision": info.mixed_precision,
        "ss_resolution": f"({info.resolution}, {info.resolution})",
        "ss_seed": str(info.seed),
        "ss_training_started_at": str(info.started_at or finished),
        "ss_training_finished_at": str(finished),
        "ss_tag_frequency": json.dumps(info.tag_frequency, ensure_ascii=False),
        "ss_dataset_dirs": json.dumps(info.dataset_dirs, ensure_ascii=False),
        "ss_sd_model_name": info.base_model_name,
        "ss_v_parameterization": str(info.prediction_type == "v_prediction"),
        "ss_zero_terminal_snr": str(info.zero_terminal_snr),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": _architecture(info.family, info.prediction_type),
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": info.name,
        "modelspec.resolution": res,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(finished)),
    }
    if info.prediction_type == "v_prediction":
        meta["modelspec.prediction_type"] = "v"
    if info.trigger_word:
        meta["modelspec.trigger_phrase"] = info.trigger_word
    if info.run:
        meta[RUN_KEY] = info.run
    meta.update(info.extra)
    return {k: str(v) for k, v in meta.items()}


def _num(value: float | int | None) -> str:
    if value is None:
        return "None"
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


# --- files -----------------------------------------------------------------------------------------------


def save_kohya(
    path: Path,
    modules: list[LoraModule],
    family: str,
    metadata: dict[str, str],
    *,
    layers_per_block: int = 2,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a kohya/A1111 `.safetensors` file atomically."""
    from safetensors.torch import save

    from loratui.util.atomic import atomic_write_bytes

    state = to_kohya_state(modules, family, layers_per_block=layers_per_block, dtype=dtype)
    atomic_write_bytes(Path(path), save(state, metadata=metadata))
    return Path(path)


class LoraFileError(ValueError):
    """A LoRA file that cannot be read (truncated, damaged, not safetensors); the message names it."""


def read_lora_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a LoRA `.safetensors` file. Raises `LoraFileError` for a file that
    is not a complete safetensors file (e.g. cut short by an interrupted copy)."""
    from safetensors import SafetensorError, safe_open

    from loratui.config.base_model import unreadable_safetensors

    tensors = {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                tensors[key] = handle.get_tensor(key)
    except (SafetensorError, OSError, RecursionError) as exc:
        raise LoraFileError(unreadable_safetensors(path, exc)) from exc
    return tensors, dict(metadata)
