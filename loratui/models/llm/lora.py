"""LoRA on a causal language model: the PEFT config and how it is added (new or continued from `init_lora`).

Dropout: PEFT gives every adapted module its own `lora_dropout` layer, applied to that module's input inside the
module's forward; with `lora_dropout: 0` it is `nn.Identity` (no copy of the input). With dropout > 0 each adapted
module keeps its own dropped-out copy of its input for backward, also where modules share an input (q, k and v
projections). PEFT has no hook for a dropout shared by modules with the same input: it would need a dropout layer
that remembers another module's input tensor and output across calls (tied to the call order, to checkpoint
recomputation and to PEFT's internals), and it would change PEFT's independent masks into one shared mask. Not
done; the memory planner traces exactly what PEFT does.
"""

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
    if cfg.load_in_4bit:
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
