"""Multi-process agreement for the OOM ladder: every rank retries with the same rung.

With several training processes (accelerate / torch.distributed), one rank running out of memory must make
every rank abandon the step and lower the same settings, or the next gradient all-reduce hangs. Each rank
calls `agree_max` exactly once per attempt (before the update when it did not run out of memory, after
freeing when it did); with one process these are no-ops.
"""

from __future__ import annotations

from loratui.train.process.distributed import control, world_size


def agree_max(value: int) -> int:
    """The maximum of `value` over all ranks (an all-reduce with MAX); `value` itself with one process."""
    if world_size() == 1:
        return int(value)
    import torch
    import torch.distributed as dist

    group, device = control()
    flag = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return int(flag.item())


def any_rank(flag: bool) -> bool:
    """True when any rank passes True (the OOM flag, all-reduced with MAX)."""
    return agree_max(1 if flag else 0) > 0
