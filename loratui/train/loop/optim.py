"""Optimizers and learning-rate schedules."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


class MissingDependency(RuntimeError):
    """A feature needs an optional package; the message says how to install it."""


def build_optimizer(
    param_groups: Iterable, name: str, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """AdamW, or 8-bit AdamW from bitsandbytes (`pip install 'loratui[quant]'`)."""
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise MissingDependency(
                "optimizer adamw8bit needs bitsandbytes: pip install 'loratui[quant]' "
                "(or set optimizer: adamw)"
            ) from exc
        return bnb.optim.AdamW8bit(param_groups, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay)


def lr_lambda(name: str, warmup_steps: int, total_steps: int):
    """Multiplier of the peak LR at step s (0-based count of completed optimizer steps)."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if name in ("constant", "constant_with_warmup"):
            return 1.0
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        if name == "linear":
            return max(0.0, 1.0 - progress)
        if name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        raise ValueError(f"unknown lr_scheduler {name!r}")

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int):
    """A LambdaLR following `lr_lambda`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(name, warmup_steps, total_steps))
