"""Optimizers and learning-rate schedules."""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch


class MissingDependency(RuntimeError):
    """A feature needs an optional package; the message says how to install it."""


#: optimizers from the `optim` extra: name -> (module, class, what users call it)
OPTIONAL_OPTIMIZERS = {
    "prodigy": ("prodigyopt", "Prodigy", "Prodigy"),
    "adafactor": ("transformers.optimization", "Adafactor", "Adafactor"),
    "schedulefree_adamw": ("schedulefree", "AdamWScheduleFree", "schedule-free AdamW"),
    "came": ("came_pytorch", "CAME", "CAME"),
    "lion": ("lion_pytorch", "Lion", "Lion"),
}


def optimizer_class(name: str) -> type:
    """The class of an optional optimizer; MissingDependency naming the extra when its package is absent."""
    import importlib

    module, attr, label = OPTIONAL_OPTIMIZERS[name]
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as exc:
        raise MissingDependency(
            f'optimizer {name} ({label}) needs {module.split(".")[0]}: pip install "loratui[optim]" ({exc}) '
            "(or set optimizer: adamw)"
        ) from exc


def _checked_args(cls: type, name: str, args: dict[str, Any]) -> dict[str, Any]:
    """`optimizer_args` that are arguments of the optimizer's constructor; ValueError naming any other key."""
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "params")]
    unknown = sorted(set(args) - set(accepted))
    if unknown:
        raise ValueError(
            f"optimizer_args {', '.join(unknown)} {'is not an argument' if len(unknown) == 1 else 'are not arguments'}"
            f" of {name} ({cls.__name__}); it accepts: {', '.join(accepted)}"
        )
    return {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}


def relative_step(name: str, args: dict[str, Any] | None) -> bool:
    """Adafactor in relative-step mode: it computes its own step size (learning_rate and schedule unused)."""
    return name == "adafactor" and bool((args or {}).get("relative_step", False))


def build_optimizer(
    param_groups: Iterable, name: str, lr: float, weight_decay: float, args: dict[str, Any] | None = None
) -> torch.optim.Optimizer:
    """The configured optimizer over `param_groups`, with `optimizer_args` (`args`) on top of lr/weight decay.

    adamw: torch; adamw8bit: bitsandbytes (`pip install 'loratui[quant]'`; CUDA, or the CPU with bitsandbytes
    >= 0.50); prodigy, adafactor, schedulefree_adamw, came, lion: the `optim` extra. Adafactor defaults to a
    fixed step size (learning_rate); `relative_step=True` in optimizer_args uses its own relative step
    (kohya's AdaFactor with `relative_step=True`), the learning rate is then unused. Schedule-free AdamW is
    returned in train mode (see `eval_mode`)."""
    args = dict(args or {})
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
        cls = bnb.optim.AdamW8bit
        kwargs = {"lr": lr, "weight_decay": weight_decay}
    elif name == "adamw":
        cls, kwargs = torch.optim.AdamW, {"lr": lr, "weight_decay": weight_decay}
    elif name in OPTIONAL_OPTIMIZERS:
        cls = optimizer_class(name)
        kwargs = {"lr": lr, "weight_decay": weight_decay}
        if name == "adafactor":
            relative = relative_step(name, args)
            kwargs.update(
                scale_parameter=relative,
                relative_step=relative,
                warmup_init=False,
                lr=None if relative else lr,
            )
    else:
        raise ValueError(f"unknown optimizer {name!r}")
    kwargs.update(_checked_args(cls, name, args))
    optimizer = cls(param_groups, **kwargs)
    if name == "schedulefree_adamw":
        optimizer.train()  # schedule-free optimizers start in eval mode
    return optimizer


#: optimizer classes -> the `optimizer` value that builds them (checkpoints record the class)
CONFIG_NAMES = {
    "AdamW": "adamw",
    "AdamW8bit": "adamw8bit",
    "Prodigy": "prodigy",
    "Adafactor": "adafactor",
    "AdamWScheduleFree": "schedulefree_adamw",
    "CAME": "came",
    "Lion": "lion",
}


def optimizer_kind(optimizer: Any) -> str:
    """The class name of the optimizer inside `optimizer` (accelerate's wrapper unwrapped)."""
    return type(getattr(optimizer, "optimizer", optimizer)).__name__


def check_resumable(saved: str | None, optimizer: Any, checkpoint: Any) -> None:
    """Refuse to load one optimizer's state into another (its tensors would not match); AdamW state into 8-bit
    AdamW is the OOM ladder's swap and allowed. `saved`: the class recorded in the checkpoint (None: older)."""
    current = optimizer_kind(optimizer)
    if saved is None or saved == current or (saved, current) == ("AdamW", "AdamW8bit"):
        return
    name = CONFIG_NAMES.get(saved, saved)
    raise ValueError(
        f"{checkpoint} was trained with optimizer {name}, this run uses {CONFIG_NAMES.get(current, current)}; "
        f"set optimizer: {name} to resume it (or start a new run)"
    )


def _train_mode_switch(optimizer: Any) -> Any | None:
    """The schedule-free optimizer inside `optimizer` (accelerate's wrapper unwrapped), else None."""
    inner = getattr(optimizer, "optimizer", optimizer)
    groups = getattr(inner, "param_groups", None) or []
    if groups and "train_mode" in groups[0] and hasattr(inner, "eval") and hasattr(inner, "train"):
        return inner
    return None


@contextlib.contextmanager
def eval_mode(optimizer: Any) -> Iterator[None]:
    """Schedule-free optimizers keep training weights y between their averaged weights x and z; x is what to
    sample, evaluate, checkpoint and export. Inside this block the model holds x (`optimizer.eval()`); on leaving,
    the training weights are restored (`optimizer.train()`). Other optimizers: nothing happens."""
    inner = _train_mode_switch(optimizer)
    if inner is None or not inner.param_groups[0]["train_mode"]:
        yield
        return
    inner.eval()
    try:
        yield
    finally:
        inner.train()


def resume_train_mode(optimizer: Any) -> None:
    """After loading a checkpoint (saved in eval mode, weights x): back to the training weights y."""
    inner = _train_mode_switch(optimizer)
    if inner is not None and not inner.param_groups[0]["train_mode"]:
        inner.train()


def final_weights(optimizer: Any) -> None:
    """At the end of training: leave a schedule-free optimizer's averaged weights x in the model (for the last
    checkpoint, the export and what the caller does with the model afterwards)."""
    inner = _train_mode_switch(optimizer)
    if inner is not None and inner.param_groups[0]["train_mode"]:
        inner.eval()


def lr_lambda(name: str, warmup_steps: int, total_steps: int, num_cycles: int = 1, power: float = 1.0):
    """Multiplier of the peak LR at step s (0-based count of completed optimizer steps).

    After the warm-up, `progress` runs from 0 to 1. cosine_with_restarts and polynomial follow transformers'
    `get_cosine_with_hard_restarts_schedule_with_warmup` and `get_polynomial_decay_schedule_with_warmup` (with
    lr_end 0); rex is the REX profile (1 - p) / (1/2 + (1 - p)/2) of Chen, Wolfe & Kyrillidis, "REX: Revisiting
    Budgeted Training with an Improved Schedule" (MLSys 2022, arXiv:2107.04197)."""

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
        if name == "cosine_with_restarts":
            if progress >= 1.0:
                return 0.0
            return 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0)))
        if name == "polynomial":
            return max(0.0, 1.0 - progress) ** power
        if name == "rex":
            remaining = max(0.0, 1.0 - progress)
            return remaining / (0.5 + 0.5 * remaining)
        raise ValueError(f"unknown lr_scheduler {name!r}")

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    warmup_steps: int,
    total_steps: int,
    num_cycles: int = 1,
    power: float = 1.0,
):
    """A LambdaLR following `lr_lambda`; for Adafactor in relative-step mode transformers' AdafactorSchedule
    (it reports the step size Adafactor computes; the optimizer ignores any schedule)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if inner.param_groups and inner.param_groups[0].get("relative_step") and inner.defaults.get("lr") is None:
        from transformers.optimization import AdafactorSchedule

        return AdafactorSchedule(optimizer)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(name, warmup_steps, total_steps, num_cycles, power)
    )


def optimizer_from_config(cfg: Any, params: Any, total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """The config's optimizer over `params` (tensors or parameter groups) and its learning-rate schedule."""
    optimizer = build_optimizer(
        params, cfg.optimizer, cfg.learning_rate, cfg.weight_decay, cfg.optimizer_args
    )
    scheduler = build_scheduler(
        optimizer,
        cfg.lr_scheduler,
        cfg.lr_warmup_steps,
        total_steps,
        cfg.lr_scheduler_num_cycles,
        cfg.lr_scheduler_power,
    )
    return optimizer, scheduler


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
