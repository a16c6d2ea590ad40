"""Saving a checkpoint from the loop (rank 0 only) and the RNG states it carries.

The checkpoint folder itself (its files, atomic writing, reading back) is `loratui.runs.checkpoints`.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from loratui.runs.checkpoints import write_checkpoint
from loratui.runs.rundir import RunDir


def rng_state() -> dict[str, Any]:
    """Global RNG states (torch CPU/CUDA and Python)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(_py_state())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _py_state() -> tuple:
    version, internal, gauss = random.getstate()
    return (version, list(internal), gauss)


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo `rng_state()`."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class NonFiniteWeights(ValueError):
    """The trained LoRA holds nan/inf values; it is not exported as the result."""


def refuse_nonfinite(tensors: dict[str, torch.Tensor], run: RunDir) -> None:
    """Raise `NonFiniteWeights` (naming the newest intact checkpoint) when `tensors` hold nan/inf."""
    from loratui.runs.checkpoints import checkpoint_problems, nonfinite_tensors

    bad = nonfinite_tensors(tensors)
    if not bad:
        return
    good = None
    for path in reversed(run.checkpoints()):
        if not checkpoint_problems(path) and not nonfinite_tensors(load_file(path / "lora.safetensors")):
            good = path
            break
    where = f"the last good checkpoint is {good}" if good else "no checkpoint has finite weights"
    raise NonFiniteWeights(
        f"the trained LoRA holds nan/inf values in {len(bad)} of {len(tensors)} tensors (e.g. {bad[0]}), so "
        f"it was not exported: training diverged (learning_rate too high, or fp16 overflow); {where}"
    )


def save_checkpoint(
    run: RunDir,
    step: int,
    *,
    lora_state: dict[str, torch.Tensor],
    training_state: dict[str, Any],
    meta: dict[str, Any],
    config_yaml: str,
    keep_last_n: int | None = None,
) -> Path:
    """Write `checkpoints/step-<step>/` and rotate old ones; returns the folder.

    With several training processes only rank 0 writes (every rank holds the same LoRA weights and optimizer
    state); the others get the folder's path back and write nothing."""
    from loratui.train.process.distributed import is_main

    if not is_main():
        return run.checkpoints_dir / f"step-{step}"
    return write_checkpoint(
        run,
        step,
        lora_state=lora_state,
        training_state=training_state,
        meta=meta,
        config_yaml=config_yaml,
        keep_last_n=keep_last_n,
    )
