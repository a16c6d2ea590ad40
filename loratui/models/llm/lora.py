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


def setup_lora(cfg: TrainConfig, model: Any) -> Any:
    """Gradient checkpointing / k-bit preparation, then LoRA (new, or continued from `init_lora`)."""
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    from loratui.util.seeding import set_global_seed

    ckpt_kwargs = {"use_reentrant": False}
    # FSDP keeps the non-quantised weights in bf16 (as the 4-bit storage), not cast up to fp32
    if cfg.load_in_4bit and not getattr(cfg, "fsdp", False):
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs=ckpt_kwargs,
        )
    elif cfg.gradient_checkpointing:
        enable_activation_checkpointing(model, ckpt_kwargs)
        model.enable_input_require_grads()
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
