"""Mixed precision choices: resolve `auto`, pick dtypes for frozen weights."""

from __future__ import annotations

import torch


def resolve_precision(setting: str, device_type: str) -> str:
    """'no' | 'fp16' | 'bf16' for this device. On CPU, fp16 autocast is not used (bf16 or fp32)."""
    if device_type != "cuda":
        return "bf16" if setting == "bf16" else "no"
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def weight_dtype(precision: str) -> torch.dtype:
    """dtype for the frozen base weights under a precision setting (trainable LoRA stays fp32)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)


def pick_device() -> torch.device:
    """cuda when available, else cpu."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
