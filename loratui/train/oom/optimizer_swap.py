"""Rung 4 of the OOM ladder: switch a running AdamW to bitsandbytes' 8-bit AdamW, keeping its state.

The swap happens inside accelerate's `AcceleratedOptimizer` wrapper (the trainers keep their reference), and
the LR scheduler is pointed at the new optimizer. Moments are carried over: 32-bit state (tensors under
bitsandbytes' `min_8bit_size`) is copied, 8-bit state is quantised blockwise with the optimizer's own maps.
If carrying fails, the 8-bit optimizer starts with fresh moments (a warning says so).
"""

from __future__ import annotations

import math
import warnings
from typing import Any


def can_use_8bit(device: Any) -> bool:
    """bitsandbytes' 8-bit AdamW runs on this device: CUDA, or the CPU with bitsandbytes >= 0.50."""
    from loratui.models.quant import bitsandbytes_problem

    device_type = getattr(device, "type", None)
    return device_type is not None and bitsandbytes_problem(device_type, "8-bit AdamW") is None


def _carry(new: Any, old_state: dict, group: dict, p: Any, gindex: int, pindex: int) -> None:
    import bitsandbytes.functional as bnbf
    import torch

    new.init_state(group, p, gindex, pindex)
    state = new.state[p]
    state["step"] = int(float(old_state.get("step", 0)))
    for number, key in ((1, "exp_avg"), (2, "exp_avg_sq")):
        source = old_state[key].to(p.device, torch.float32)
        target = state[f"state{number}"]
        if target.dtype == torch.float32:
            target.copy_(source)
            continue
        absmax = state[f"absmax{number}"]
        blocksize = 2 ** math.ceil(math.log2(math.ceil(p.numel() / absmax.numel())))
        bnbf.quantize_blockwise(
            source, code=state[f"qmap{number}"], absmax=absmax, out=target, blocksize=blocksize
        )


def swap_to_8bit(optimizer: Any, scheduler: Any | None) -> bool:
    """Replace the AdamW inside `optimizer` (an accelerate wrapper) by 8-bit AdamW; False when not possible."""
    import bitsandbytes as bnb

    inner = getattr(optimizer, "optimizer", None)
    if inner is None:
        return False  # not wrapped: the trainer's own reference could not be updated
    groups = []
    for group in inner.param_groups:
        groups.append(
            {
                k: v
                for k, v in group.items()
                if k in ("params", "lr", "betas", "eps", "weight_decay", "initial_lr")
            }
        )
    defaults = inner.defaults
    new = bnb.optim.AdamW8bit(
        groups,
        lr=defaults["lr"],
        betas=defaults.get("betas", (0.9, 0.999)),
        eps=defaults.get("eps", 1e-8),
        weight_decay=defaults.get("weight_decay", 0.01),
    )
    try:
        for gindex, group in enumerate(new.param_groups):
            for pindex, p in enumerate(group["params"]):
                old_state = inner.state.get(p)
                if old_state and "exp_avg" in old_state:
                    _carry(new, old_state, group, p, gindex, pindex)
    except Exception as exc:
        new.state.clear()
        warnings.warn(
            f"8-bit AdamW starts with fresh moments (could not carry them over: {exc})", stacklevel=2
        )
    optimizer.optimizer = new
    inner_scheduler = getattr(scheduler, "scheduler", scheduler)
    if inner_scheduler is not None and hasattr(inner_scheduler, "optimizer"):
        inner_scheduler.optimizer = new
        _track_steps(new)
    inner.state.clear()
    return True


def _track_steps(optimizer: Any) -> None:
    """Mark `optimizer.step` the way a torch LR scheduler does when it is built on an optimizer, so the
    scheduler that now drives it does not warn that `step()` was replaced."""
    import functools
    import weakref

    step = optimizer.step.__func__
    owner = weakref.ref(optimizer)

    @functools.wraps(step)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        opt = owner()
        opt._opt_called = True
        return step(opt, *args, **kwargs)

    wrapper._wrapped_by_lr_sched = True
    optimizer.step = wrapper
