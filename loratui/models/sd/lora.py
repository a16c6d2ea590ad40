"""LoRA layers on the UNet and text encoders (PEFT), their state, and starting from an existing LoRA."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loratui.models.sd.adapters import NetworkSpec, conv_paths, conv_rank_alpha, is_adapter_param
from loratui.models.sd.kohya import (
    LoraModule,
    from_kohya_state,
    is_kohya_state,
    live_text_path,
    name_map,
    read_lora_file,
)
from loratui.util import jsonsafe

ADAPTER = "default"
DEFAULT_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
#: kohya's text-encoder targets: CLIPAttention and CLIPMLP linears.
DEFAULT_TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


class LoraSetupError(ValueError):
    """LoRA targets or an init LoRA that do not fit the model."""


@dataclass
class LoraPlan:
    """Which module paths get LoRA layers, per component."""

    targets: dict[str, list[str]] = field(default_factory=dict)  # component -> module paths
    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    use_rslora: bool = False
    network: NetworkSpec = field(default_factory=NetworkSpec)
    target_names: list[str] = field(default_factory=list)  # the target names that chose the Linear layers

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def kohya_alpha(self) -> float:
        """The alpha a kohya file needs for the same scale (kohya scale = alpha / rank)."""
        return self.scale * self.rank


def adaptable_modules(model: torch.nn.Module) -> list[str]:
    """Paths of the Linear and Conv2d modules of a model (what LoRA can adapt).

    In a model that already has LoRA layers, the adapted modules keep their original paths.
    """
    paths = []
    for name, module in model.named_modules():
        if not name or ".lora_" in name or not isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            continue
        paths.append(name.removesuffix(".base_layer"))
    return paths


def match_targets(paths: list[str], target: str) -> list[str]:
    """Module paths selected by one target: an exact path, a suffix (`to_q`) or a sub-path (`ff.net`)."""
    needle = f".{target.strip('.')}."
    return [p for p in paths if p == target or needle in f".{p}."]


def target_names(requested: list[str] | None, *, train_text_encoder: bool) -> list[str]:
    """The target names in effect (the requested ones, or each component's defaults), in order."""
    names = list(requested or DEFAULT_UNET_TARGETS)
    if train_text_encoder and not requested:
        names += list(DEFAULT_TE_TARGETS)
    return names


def plan_targets(
    requested: list[str] | None,
    components: dict[str, torch.nn.Module],
    *,
    train_text_encoder: bool,
    convs: bool = False,
) -> dict[str, list[str]]:
    """Module paths to adapt per component (`convs`: also the UNet's ResNet convolutions, for LoCon, LoHa and
    LoKr). Unknown targets raise LoraSetupError listing valid choices."""
    paths = {name: adaptable_modules(model) for name, model in components.items()}
    unet_requested, te_requested = [], []
    unknown = []
    for target in requested or []:
        in_unet = bool(match_targets(paths["unet"], target))
        in_te = any(match_targets(p, target) for name, p in paths.items() if name != "unet")
        if in_unet:
            unet_requested.append(target)
        if in_te:
            te_requested.append(target)
        if not in_unet and not in_te:
            unknown.append(target)
    if unknown:
        raise LoraSetupError(
            f"target_modules {unknown} match no Linear/Conv2d module; UNet choices include to_q, to_k, to_v, "
            "to_out.0, ff.net, proj_in, proj_out, attn1, attn2; text encoder: q_proj, k_proj, v_proj, out_proj, "
            "fc1, fc2"
        )
    plan: dict[str, list[str]] = {}
    unet_targets = unet_requested or list(DEFAULT_UNET_TARGETS)
    chosen = {p for t in unet_targets for p in match_targets(paths["unet"], t)}
    if convs:
        chosen |= set(conv_paths(paths["unet"]))
    plan["unet"] = sorted(chosen)
    if train_text_encoder:
        te_targets = te_requested or list(DEFAULT_TE_TARGETS)
        for name, model_paths in paths.items():
            if name != "unet":
                plan[name] = sorted({p for t in te_targets for p in match_targets(model_paths, t)})
    return plan


def _conv3x3(model: torch.nn.Module, paths: list[str]) -> list[str]:
    modules = dict(model.named_modules())
    return [
        p
        for p in paths
        if isinstance(modules.get(p), torch.nn.Conv2d) and tuple(modules[p].kernel_size) != (1, 1)
    ]


def peft_config(plan: LoraPlan, paths: list[str], conv3x3: list[str]):
    """The PEFT config of one component for the plan's network type (3x3 convs at conv_rank/conv_alpha)."""
    spec = plan.network
    conv_rank, conv_alpha = conv_rank_alpha(spec, plan.rank, plan.alpha)
    ranks = {re.escape(p): conv_rank for p in conv3x3} if conv_rank != plan.rank else {}
    alphas = {re.escape(p): conv_alpha for p in conv3x3} if conv_alpha != plan.alpha or ranks else {}
    common = {"r": plan.rank, "target_modules": paths, "rank_pattern": ranks, "alpha_pattern": alphas}
    if spec.kind == "loha":
        from peft import LoHaConfig

        return LoHaConfig(alpha=plan.alpha, use_effective_conv2d=spec.use_tucker, init_weights=True, **common)
    if spec.kind == "lokr":
        from peft import LoKrConfig

        return LoKrConfig(
            alpha=plan.alpha,
            decompose_both=spec.decompose_both,
            decompose_factor=spec.factor,
            use_effective_conv2d=spec.use_tucker,
            init_weights=True,
            **common,
        )
    from peft import LoraConfig

    return LoraConfig(
        lora_alpha=plan.alpha,
        lora_dropout=plan.dropout,
        init_lora_weights=True,
        use_rslora=plan.use_rslora,
        use_dora=spec.kind == "dora",
        **common,
    )


def inject_lora(components: dict[str, torch.nn.Module], plan: LoraPlan) -> list[torch.nn.Parameter]:
    """Add the plan's adapter layers (fp32) to each component; returns the trainable parameters."""
    from peft import inject_adapter_in_model

    params: list[torch.nn.Parameter] = []
    for name, paths in plan.targets.items():
        model = components[name]
        config = peft_config(plan, paths, _conv3x3(model, paths))
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
        for param_name, param in model.named_parameters():
            if is_adapter_param(param_name):
                param.data = param.data.float()
                param.requires_grad_(True)
                params.append(param)
            else:
                param.requires_grad_(False)
    return params


def adapter_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable adapter parameters of one component."""
    return [p for n, p in model.named_parameters() if is_adapter_param(n)]


def lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Module path -> PEFT adapter layer (LoRA, LoHa or LoKr), for every adapted module of `model`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: mod for name, mod in model.named_modules() if isinstance(mod, BaseTunerLayer)}


def _state_key(component: str, param_name: str) -> str:
    """`<component>.<path>.lora_A.weight`, `.hada_w1_a`, `.lokr_w1`, `.lora_magnitude_vector.weight`, ..."""
    return f"{component}." + param_name.replace(f".{ADAPTER}.", ".").removesuffix(f".{ADAPTER}")


def lora_state(components: dict[str, torch.nn.Module], plan: LoraPlan) -> dict[str, torch.Tensor]:
    """Every adapter tensor by `_state_key` (detached, CPU, fp32)."""
    out = {}
    for name in plan.targets:
        for param_name, param in components[name].named_parameters():
            if is_adapter_param(param_name):
                out[_state_key(name, param_name)] = param.detach().float().cpu().clone()
    return out


def named_adapter_parameters(
    components: dict[str, torch.nn.Module], plan: LoraPlan
) -> dict[str, torch.nn.Parameter]:
    """The trained adapter parameters themselves, by the keys `lora_state` writes."""
    return {
        _state_key(name, param_name): param
        for name in plan.targets
        for param_name, param in components[name].named_parameters()
        if is_adapter_param(param_name)
    }


@torch.no_grad()
def load_lora_state(components: dict[str, torch.nn.Module], state: dict[str, torch.Tensor]) -> None:
    """Copy tensors from `lora_state` back into the layers; every layer must be present."""
    for name, model in components.items():
        for param_name, param in model.named_parameters():
            if not is_adapter_param(param_name):
                continue
            key = _state_key(name, param_name)
            if key not in state:
                raise KeyError(f"checkpoint has no tensor {key} (was it trained with another network_type?)")
            param.copy_(state[key].to(param.dtype))


def module_scales(components: dict[str, torch.nn.Module], plan: LoraPlan) -> dict[str, float]:
    """`<component>.<path>` -> the adapter's scale (alpha / rank, as PEFT applies it) per adapted module."""
    out = {}
    for name in plan.targets:
        for path, layer in lora_layers(components[name]).items():
            out[f"{name}.{path}"] = float(layer.scaling[ADAPTER])
    return out


def _is_flattened(model: torch.nn.Module) -> bool:
    return not hasattr(model, "text_model")


def diffusers_modules(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], components
) -> list[LoraModule]:
    """Modules of a diffusers/PEFT-style LoRA file (`unet.<path>.lora_A.weight`, ...)."""
    config = jsonsafe.loads(metadata.get("lora_adapter_metadata", "{}") or "{}", "lora_adapter_metadata")
    modules = []
    for key in sorted(tensors):
        if not key.endswith(".lora_A.weight"):
            continue
        stem = key[: -len(".lora_A.weight")]
        component, _, path = stem.partition(".")
        if component not in ("unet", "text_encoder", "text_encoder_2"):
            raise LoraSetupError(f"unexpected key {key} in a diffusers LoRA file")
        if component != "unet" and component in components:
            path = live_text_path(path, _is_flattened(components[component]))
        down = tensors[key].float()
        alpha = float(config.get(f"{component}.lora_alpha", down.shape[0]))
        modules.append(LoraModule(component, path, down, tensors[stem + ".lora_B.weight"].float(), alpha))
    return modules


def read_init_lora(
    path: Path, components: dict[str, torch.nn.Module], family: str, layers_per_block: int
) -> list[LoraModule]:
    """Read a kohya or diffusers LoRA file as modules addressed by live module paths."""
    if not Path(path).is_file():
        raise LoraSetupError(f"init_lora not found: {path}")
    tensors, metadata = read_lora_file(Path(path))
    if is_kohya_state(tensors):
        names = name_map(
            {name: adaptable_modules(m) for name, m in components.items()}, family, layers_per_block
        )
        modules, unknown = from_kohya_state(tensors, names)
        if unknown:
            raise LoraSetupError(
                f"init_lora {path} has {len(unknown)} module(s) this {family} model does not have "
                f"(e.g. {unknown[0]}); was it trained on another model family?"
            )
        return modules
    return diffusers_modules(tensors, metadata, components)


@torch.no_grad()
def apply_init_lora(
    modules: list[LoraModule], components: dict[str, torch.nn.Module], plan: LoraPlan
) -> tuple[int, list[str]]:
    """Start the LoRA layers from `modules` (rescaled to this run's alpha). Returns (loaded, not trained)."""
    layers = {name: lora_layers(model) for name, model in components.items()}
    loaded, skipped = 0, []
    for module in modules:
        layer = layers.get(module.component, {}).get(module.path)
        if layer is None:
            skipped.append(f"{module.component}.{module.path}")
            continue
        if module.rank != plan.rank:
            raise LoraSetupError(
                f"init_lora has rank {module.rank} but lora_rank is {plan.rank}; set lora_rank: {module.rank}"
            )
        factor = (module.alpha / module.rank) / plan.scale
        layer.lora_A[ADAPTER].weight.copy_(module.down.reshape(layer.lora_A[ADAPTER].weight.shape))
        layer.lora_B[ADAPTER].weight.copy_((module.up * factor).reshape(layer.lora_B[ADAPTER].weight.shape))
        loaded += 1
    return loaded, skipped
