"""How one optimizer step's samples are spread over the training processes (data parallel).

`batch_size` is per process: one optimizer step uses `batch_size x gradient_accumulation_steps x processes`
samples, each process a disjoint share (`shard`). A resumed run keeps its checkpoint's global batch, also on
another number of processes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def global_batch(per_device_batch: int, accumulation: int, processes: int) -> int:
    """Samples in one optimizer step over all processes."""
    return max(1, per_device_batch) * max(1, accumulation) * max(1, processes)


def _checkpoint_meta(checkpoint: Path | None) -> dict[str, Any] | None:
    """A checkpoint's meta.json (None: no checkpoint, or unreadable)."""

    if checkpoint is None:
        return None
    try:
        return json.loads((Path(checkpoint) / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def checkpoint_global_batch(checkpoint: Path | None) -> int | None:
    """The global batch a checkpoint was trained with (None: unknown, e.g. an older checkpoint)."""
    meta = _checkpoint_meta(checkpoint)
    if meta is None:
        return None
    value = meta.get("global_batch")
    return int(value) if value else None


def plan_batch(per_device_batch: int, accumulation: int, processes: int, resume_from: Path | None) -> int:
    """The global batch of this run's `StepPlan`: the checkpoint's when resuming (so the data order and the
    update stay those of the run, whatever the process count now), else batch x accumulation x processes."""
    return checkpoint_global_batch(resume_from) or global_batch(per_device_batch, accumulation, processes)


def batch_info(per_device_batch: int, accumulation: int, processes: int, plan_global: int) -> dict[str, Any]:
    """How the batch is spread, for `run_started` and the exported metadata."""
    per_rank = -(-plan_global // max(1, processes))
    return {
        "processes": processes,
        "batch_size_per_device": per_device_batch,
        "micro_batches_per_step": -(-per_rank // max(1, per_device_batch)),
        "global_batch": plan_global,
        "configured_accumulation": accumulation,
    }


def resume_note(checkpoint: Path | None, processes: int, batch: dict[str, Any]) -> str | None:
    """A warning when a run resumes on a different number of processes (the global batch is kept)."""
    meta = _checkpoint_meta(checkpoint)
    if meta is None:
        return None
    before = int(meta.get("processes") or 1)
    if before == processes:
        return None
    return (
        f"resuming a run trained on {before} process(es) with {processes}: the global batch stays "
        f"{batch['global_batch']} samples per step (each process now runs {batch['micro_batches_per_step']} "
        f"micro-batch(es) of {batch['batch_size_per_device']}), so the data order and the updates continue "
        "as planned"
    )


def shard(indices: Sequence[int], rank_: int, processes: int) -> list[int]:
    """This rank's disjoint share of one step's sample indices (every `processes`-th, from `rank_`)."""
    return list(indices)[rank_::processes]
