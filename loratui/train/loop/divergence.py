"""Diverging training: optimizer steps in a row with a nan/inf loss (or gradient) stop the run.

The shared step (`loratui.train.loop.stepping.optimizer_step`) skips an update whose loss or gradients are not
finite; this watch counts such steps in a row, warns on each, and raises `TrainingDiverged` at
`max_nonfinite_steps` with the likely cause and the last good checkpoint.
"""

from __future__ import annotations

import math
from typing import Any

from loratui.runs.checkpoints import last_good_checkpoint
from loratui.train.job import WorkerJob
from loratui.train.oom.errors import EventSink


class TrainingDiverged(RuntimeError):
    """Too many optimizer steps in a row had a nan/inf loss or gradient; the message says what to do."""


class DivergenceWatch:
    """Counts the current run of optimizer steps with a nan/inf loss (or gradient)."""

    def __init__(self, job: WorkerJob, reporter: EventSink, accelerator: Any = None) -> None:
        self.job = job
        self.reporter = reporter
        self.accelerator = accelerator
        self.nonfinite_steps: list[int] = []

    def observe(self, step: int, result: Any) -> None:
        """Count optimizer steps in a row with a nan/inf loss (or, without fp16's grad scaler, gradient);
        warn on each, raise `TrainingDiverged` at `max_nonfinite_steps`. The loss is the all-ranks one, so
        every process decides alike. With fp16 an overflowing gradient is the scaler's business (it skips
        the step and lowers its scale), but a nan/inf loss still counts."""
        scaler = getattr(self.accelerator, "scaler", None)
        loss_bad = not math.isfinite(result.loss)
        if not (loss_bad or (scaler is None and result.nonfinite)):
            self.nonfinite_steps = []
            return
        self.nonfinite_steps.append(step)
        limit = self.job.resolved.config.max_nonfinite_steps
        what = "loss" if loss_bad else "gradients"
        self.reporter.event(
            "warning",
            step,
            message=f"non-finite {what} (nan/inf) at step {step}: the update was skipped "
            f"({len(self.nonfinite_steps)} in a row; the run stops at max_nonfinite_steps {limit})",
            nonfinite=True,
        )
        if len(self.nonfinite_steps) >= limit:
            raise TrainingDiverged(self._diverged_message(what))

    def _diverged_message(self, what: str) -> str:
        first, last = self.nonfinite_steps[0], self.nonfinite_steps[-1]
        precision = str(getattr(self.accelerator, "mixed_precision", "no") or "no")
        cause = f"learning_rate {self.job.resolved.config.learning_rate:g} too high"
        if precision in ("fp16", "bf16"):
            cause += f", or mixed_precision {precision} overflowing (try bf16 or no)"
        good = last_good_checkpoint(self.job.run, before_step=first) if self.job.run is not None else None
        if good is not None:
            where = (
                f"The last good checkpoint is {good}; resume from it with a lower learning rate: "
                f"loratui train --resume {good} --set learning_rate=..."
            )
        else:
            where = "No checkpoint was saved before it; start again with a lower learning_rate"
        return (
            f"training diverged: the {what} was nan/inf for {len(self.nonfinite_steps)} optimizer steps in a "
            f"row (steps {first}-{last}, the updates were skipped). Likely cause: {cause}. {where}"
        )
