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
    """AdamW, or 8-bit AdamW from bitsandbytes (`pip install 'loratui[quant]'`; on CUDA, or on the CPU with
    bitsandbytes >= 0.50)."""
    if name == "adamw8bit":
        from loratui.models.quant import bitsandbytes_problem, quiet_cpu_kernel_notice

        device_type = "cuda" if torch.cuda.is_available() else "cpu"  # where training runs (pick_device)
        problem = bitsandbytes_problem(device_type, "optimizer adamw8bit")
        if problem:
            raise MissingDependency(f"{problem} (or set optimizer: adamw)")
        quiet_cpu_kernel_notice()
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise MissingDependency(
                f'optimizer adamw8bit needs bitsandbytes: pip install "loratui[quant]" ({exc}) '
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


def configured_hyperparameters(optimizer: torch.optim.Optimizer, scheduler) -> list[dict[str, float]]:
    """Each parameter group's base learning rate and weight decay as the config set them (call before a
    checkpoint's optimizer and scheduler states are loaded over them)."""
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate's wrapper holds the LambdaLR
    return [
        {"lr": float(base), "weight_decay": float(group.get("weight_decay", 0.0))}
        for base, group in zip(inner.base_lrs, optimizer.param_groups, strict=True)
    ]


def apply_configured_hyperparameters(
    optimizer: torch.optim.Optimizer, scheduler, wanted: list[dict[str, float]]
) -> list[str]:
    """After loading a checkpoint's states: use the configured base learning rates and weight decay (the
    loaded states hold the checkpoint's). Returns one line per change, e.g. `learning_rate 0.0001 -> 0.0005`."""
    inner = getattr(scheduler, "scheduler", scheduler)
    changes: list[str] = []
    if len(wanted) != len(optimizer.param_groups):
        return changes
    for index, (group, want) in enumerate(zip(optimizer.param_groups, wanted, strict=True)):
        name = "learning_rate" if index == 0 else f"learning_rate of parameter group {index}"
        old = float(inner.base_lrs[index])
        if not math.isclose(old, want["lr"], rel_tol=1e-9, abs_tol=0.0):
            inner.base_lrs[index] = want["lr"]
            group["initial_lr"] = want["lr"]
            lambdas = getattr(inner, "lr_lambdas", None)
            if lambdas:
                group["lr"] = want["lr"] * lambdas[index](inner.last_epoch)
            else:
                group["lr"] = group["lr"] * (want["lr"] / old) if old else want["lr"]
            changes.append(f"{name} {old:g} -> {want['lr']:g}")
        decay = float(group.get("weight_decay", 0.0))
        if "weight_decay" in group and not math.isclose(decay, want["weight_decay"]):
            group["weight_decay"] = want["weight_decay"]
            if index == 0:
                changes.append(f"weight_decay {decay:g} -> {want['weight_decay']:g}")
    inner._last_lr = [group["lr"] for group in optimizer.param_groups]
    return changes
