"""One optimizer step over several micro-batches (gradient accumulation), shared by both trainers.

The trainer's `micro_loss(batch_indices)` returns that micro-batch's loss already divided by the
normaliser of the WHOLE optimizer step (number of samples for SD, number of target tokens for LLMs), so
the accumulated gradient is identical however the step is split into micro-batches. This is what lets the
OOM ladder halve the micro-batch mid-run without changing the update.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass
class StepResult:
    """What one optimizer step did."""

    loss: float
    grad_norm: float | None
    micro_batches: int
    lr: float
    nonfinite: bool = False  # the loss or a gradient was nan/inf
    skipped: bool = False  # the update was not applied (fp16: the grad scaler skipped it)


def optimizer_step(
    micro_batches: Sequence[Sequence[int]],
    micro_loss: Callable[[Sequence[int]], torch.Tensor],
    *,
    accelerator,
    optimizer,
    scheduler,
    params: list[torch.nn.Parameter],
    max_grad_norm: float | None,
    model=None,
    before_update: Callable[[], None] | None = None,
) -> StepResult:
    """Run forward/backward for every micro-batch, then clip, step, schedule and zero the gradients.

    `accelerator` is an `accelerate.Accelerator` (handles the fp16 grad scaler). `model` is the prepared
    trained module, or a list of them. With several processes every micro-batch runs under their DDP
    `no_sync` and the gradients are averaged once, after `before_update`
    (`loratui.train.process.distributed.all_reduce_gradients`). `before_update` runs after the last backward and
    before the update (the OOM ladder uses it to let every process agree that none ran out of memory; it
    may raise to abandon the step).

    A nan/inf loss or gradient marks the result `nonfinite`. Without a grad scaler the update is then skipped
    (the weights stay as they were; the schedule still advances with the data); with fp16 skipping the step is
    the scaler's job, and `skipped` reports what it did.
    """
    total = 0.0
    several = accelerator.num_processes > 1
    models = [] if model is None else list(model) if isinstance(model, list | tuple) else [model]
    for batch in micro_batches:
        with contextlib.ExitStack() as unsynced:
            for module in models if several else []:
                unsynced.enter_context(accelerator.no_sync(module))
            loss = micro_loss(batch)
            accelerator.backward(loss)
        total += float(loss.detach())
        del loss
    if before_update is not None:
        before_update()
    sharded = _sharded(params)  # FSDP: the gradients were reduce-scattered in backward, each rank has a shard
    if several and not sharded:
        from loratui.train.process.distributed import all_reduce_gradients

        all_reduce_gradients(params)
    scaler = getattr(accelerator, "scaler", None)
    # several processes: the loss is each one's own, the gradients (all-reduced) are the same everywhere
    finite = _finite_everywhere(params) if sharded else gradients_finite(params)
    nonfinite = (not several and not math.isfinite(total)) or not finite
    grad_norm = None
    if max_grad_norm is not None and max_grad_norm > 0:
        norm = accelerator.clip_grad_norm_(params, max_grad_norm)
        if hasattr(norm, "full_tensor"):  # FSDP: the norm over every rank's shards
            norm = norm.full_tensor()
        grad_norm = float(norm) if norm is not None else None
    skipped = nonfinite
    if scaler is not None:
        optimizer.step()  # the scaler skips a step whose gradients hold nan/inf
        skipped = bool(getattr(optimizer, "step_was_skipped", False))
    elif not nonfinite:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    lr = float(scheduler.get_last_lr()[0])
    return StepResult(total, grad_norm, len(micro_batches), lr, nonfinite=nonfinite, skipped=skipped)


def gradients_finite(params: Sequence[torch.nn.Parameter]) -> bool:
    """False when any gradient holds nan or inf (one device sync for all of them)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    flags = [torch.isfinite(g).all() for g in grads]
    return bool(torch.stack([f.to(flags[0].device) for f in flags]).all())


def _sharded(params: Sequence[torch.nn.Parameter]) -> bool:
    """Whether the parameters are FSDP shards (DTensors)."""
    return bool(params) and hasattr(params[0], "full_tensor")


def _finite_everywhere(params: Sequence[torch.nn.Parameter]) -> bool:
    from loratui.train.process.fsdp import gradients_finite_everywhere

    return gradients_finite_everywhere(params)
