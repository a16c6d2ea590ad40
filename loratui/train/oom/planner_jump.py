"""The memory planner's part in OOM recovery: which rungs can be skipped, and what to say when none is left.

`PlannerJump.fits()` gives the ladder a verdict per set of settings (False: even the planner's low estimate is
over the budget, so the ladder jumps past that rung; None: it cannot tell, and the ladder climbs one rung at
a time). `LORATUI_OOM_PLANNER=0` turns the jump off.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from loratui.train.job import WorkerJob
from loratui.train.oom.ladder import settings_of
from loratui.train.oom.step_memory import Failure, StepMemory

PLANNER_ENV = "LORATUI_OOM_PLANNER"  # "0": climb one rung at a time without the memory planner
# Parts of the planner's estimate that a simulated card's meter does not see.
_NOT_METERED = ("cuda_context", "workspace", "fragmentation")


class PlannerJump:
    """The planner's verdicts for one run (turned off for good after the estimator fails once)."""

    def __init__(self, job: WorkerJob, memory: StepMemory, kind: str) -> None:
        self.job = job
        self.memory = memory
        self.kind = kind
        self.estimator_ok = True

    def fits(self) -> Callable[[dict[str, Any]], bool | None] | None:
        """The planner's verdict on a set of settings, or None when there is no budget or no planner."""
        budget, device = self.memory.budget_and_device()
        if not budget or not self.estimator_ok or os.environ.get(PLANNER_ENV, "1") == "0":
            return None
        simulated = bool(self.memory.budget)
        cfg = self.job.resolved.config
        from loratui.train.process.distributed import world_size

        processes = world_size() if cfg.fsdp else 1  # FSDP: what one process holds of the sharded model

        def fits(settings: dict[str, Any]) -> bool | None:
            try:
                from loratui.memory.estimate import estimate_peak

                estimate = estimate_peak(
                    cfg.model_copy(update=settings),
                    family=self.job.resolved.family,
                    device=device,
                    processes=processes,
                )
            except Exception:
                self.estimator_ok = False
                return None
            total = estimate.total_bytes
            if simulated:  # the meter does not see the CUDA context, workspaces or fragmentation
                total -= sum(estimate.breakdown.get(k, 0) for k in _NOT_METERED)
            return int(total * (1 - estimate.error_band)) <= budget

        return fits

    def exhausted_message(self, step: int, failure: Failure) -> str:
        """Every rung used: the settings reached, and the planner's smallest option that fits (if it knows)."""
        settings = settings_of(self.job.resolved.config, self.kind)
        shown = ", ".join(f"{k}={v}" for k, v in settings.items())
        text = (
            f"out of memory at step {step} even after every rung of the OOM ladder ({shown}): "
            f"{failure.error}."
        )
        from loratui.train.oom.ladder import eight_bit_skip_reason

        skipped = eight_bit_skip_reason(str(settings["optimizer"]))
        if skipped:
            text = f"{text} Note: {skipped}."
        budget, device = self.memory.budget_and_device()
        if budget:
            try:
                from loratui.memory.recommend import no_fit_message

                return f"{text} Memory planner: {no_fit_message(self.job.resolved, budget, device=device)}"
            except Exception:
                pass
        return (
            f"{text} The smallest option the OOM ladder knows is the one above ({shown}); "
            "use a GPU with more memory, a smaller base model, a lower lora_rank or (LLMs) load_in_4bit."
        )
