"""LoRA on a causal language model: the PEFT config and how it is added (new or continued from `init_lora`)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from loratui.config import TrainConfig
from loratui.models.checkpointing import enable_activation_checkpointing

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def lora_config(cfg: TrainConfig) -> Any:
    """The PEFT LoraConfig for this config (q,k,v,o projections by default; `all-linear` supported)."""
    from peft import LoraConfig

    targets: Any = cfg.target_modules or DEFAULT_TARGETS
    if [t.lower() for t in targets] == ["all-linear"]:
        targets = "all-linear"
    return LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.effective_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
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


def setup_lora(cfg: TrainConfig, model: Any) -> Any:
    """Freezing and gradient checkpointing, then LoRA (new, or continued from `init_lora`)."""
    from peft import PeftModel, get_peft_model

    from loratui.util.seeding import set_global_seed

    freeze_base(model, cfg.gradient_checkpointing)
    set_global_seed(cfg.seed)
    if cfg.init_lora:
        folder = Path(cfg.init_lora)
        if not (folder / "adapter_config.json").is_file():
            raise ValueError(f"init_lora: {folder} is not a PEFT adapter folder (no adapter_config.json)")
        return PeftModel.from_pretrained(model, str(folder), is_trainable=True)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return get_peft_model(model, lora_config(cfg))
    except ValueError as exc:
        raise ValueError(
            f"cannot place LoRA on target_modules {cfg.target_modules or DEFAULT_TARGETS}: {exc}. "
            "Set target_modules to this model's linear layer names, or target_modules: all-linear"
        ) from exc
