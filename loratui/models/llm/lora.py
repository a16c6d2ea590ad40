"""LoRA on a causal language model: the PEFT config and how it is added (new or continued from `init_lora`).

Which modules are adapted is decided by `loratui.models.llm.families` (the family defaults, MoE experts,
`all-linear`); the PEFT config always lists short module names (`q_proj`), as PEFT writes them for a list.

Dropout: PEFT gives every adapted module its own `lora_dropout` layer, applied to that module's input inside the
module's forward; with `lora_dropout: 0` it is `nn.Identity` (no copy of the input). With dropout > 0 the modules
that read the same tensor (q, k and v; gate and up) share one dropped-out copy of it
(`loratui.models.llm.shared_dropout`), where PEFT alone would keep one per module.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loratui.config import TrainConfig
from loratui.models.checkpointing import enable_activation_checkpointing
from loratui.models.llm.families import TargetPlan, UnsupportedArchitecture, plan_targets

#: a callback for the notes of `plan_for` (level "info" | "warning", text)
Notify = Callable[[str, str], None]


def model_layout(model: Any) -> tuple[str | None, list[str], list[str], str]:
    """(model type, full paths of its `nn.Linear` modules, of its fused 3-D expert weights, short name of the
    output layer) of a transformers causal LM."""
    import torch

    linear, experts = [], []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            linear.append(name)
            continue
        for pname, param in module.named_parameters(recurse=False):
            if param.ndim == 3 and name:
                experts.append(f"{name}.{pname}")
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    output_name = next((n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m is output), "lm_head")
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    return getattr(text, "model_type", None), linear, experts, output_name


def plan_for(cfg: TrainConfig, model: Any) -> TargetPlan:
    """The LoRA targets of this config on this model (see `loratui.models.llm.families`)."""
    model_type, linear, experts, output_name = model_layout(model)
    return plan_targets(
        model_type,
        linear,
        experts,
        cfg.target_modules,
        lora_dropout=cfg.lora_dropout,
        output_name=output_name,
    )


def lora_config(cfg: TrainConfig, model: Any, plan: TargetPlan | None = None) -> Any:
    """The PEFT LoraConfig for this config on `model` (family default targets, `all-linear`, or the names given)."""
    from peft import LoraConfig

    plan = plan or plan_for(cfg, model)
    return LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.effective_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(plan.modules),
        target_parameters=list(plan.parameters) or None,
        use_rslora=cfg.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def freeze_base(model: Any, gradient_checkpointing: bool) -> None:
    """Freeze every base weight and turn on activation checkpointing (non-reentrant) when asked.

    The same for 16/32-bit and 4-bit (QLoRA) bases: unlike PEFT's `prepare_model_for_kbit_training`, nothing is
    upcast to fp32, so a QLoRA base keeps its embeddings, norms and `lm_head` in the compute dtype. Inputs are
    made to require gradients so that checkpointed blocks over frozen embeddings still backpropagate."""
    for param in model.parameters():
        param.requires_grad_(False)
    if gradient_checkpointing:
        enable_activation_checkpointing(model, {"use_reentrant": False})
        model.enable_input_require_grads()


def setup_lora(cfg: TrainConfig, model: Any, notify: Notify | None = None) -> Any:
    """Freezing and gradient checkpointing, then LoRA (new, or continued from `init_lora`). `notify`
    receives what the run's log should say about the targets (MoE experts adapted or left out, ...)."""
    from peft import PeftModel, get_peft_model

    from loratui.models.llm.shared_dropout import share_lora_dropout
    from loratui.util.seeding import set_global_seed

    freeze_base(model, cfg.gradient_checkpointing)
    set_global_seed(cfg.seed)
    if cfg.init_lora:
        folder = Path(cfg.init_lora)
        if not (folder / "adapter_config.json").is_file():
            raise ValueError(f"init_lora: {folder} is not a PEFT adapter folder (no adapter_config.json)")
        model = PeftModel.from_pretrained(model, str(folder), is_trainable=True)
        share_lora_dropout(model)
        return model
    plan = plan_for(cfg, model)
    for level, text in plan.notes:
        if notify is not None:
            notify(level, text)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = get_peft_model(model, lora_config(cfg, model, plan))
    except UnsupportedArchitecture:
        raise
    except ValueError as exc:
        raise ValueError(
            f"cannot place LoRA on target_modules {plan.modules + plan.parameters}: {exc}. "
            "Set target_modules to this model's linear layer names, or target_modules: all-linear"
        ) from exc
    share_lora_dropout(model)
    return model


LORA_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def apply_lora_dtype(cfg: TrainConfig, model: Any) -> Any:
    """Cast the trainable LoRA weights to `lora_dtype` (fp32 by default; bf16 halves their weights, gradients
    and AdamW state). PEFT casts each adapted layer's input to the LoRA weights' dtype."""
    import torch

    dtype = getattr(torch, LORA_DTYPES[cfg.lora_dtype])
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)
    return model
