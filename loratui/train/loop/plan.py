"""How many optimizer steps a run has and which samples each step uses.

A step's samples are a contiguous chunk of its epoch's permutation of size `effective_batch`
(batch_size x gradient_accumulation_steps); the last chunk of an epoch may be smaller. The data position is
the global step number alone, so a resumed run continues with exactly the samples it would have seen.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from loratui.util.seeding import epoch_permutation


@dataclass(frozen=True)
class StepPlan:
    """The schedule of optimizer steps."""

    num_samples: int
    effective_batch: int
    epochs: int
    max_steps: int | None = None
    seed: int = 0

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.num_samples / self.effective_batch))

    @property
    def total_steps(self) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return self.steps_per_epoch * self.epochs

    def epoch_of(self, step: int) -> int:
        """0-based epoch of 0-based global step `step`."""
        return step // self.steps_per_epoch

    def samples_for_step(self, step: int) -> list[int]:
        """Dataset indices used by 0-based global step `step`."""
        epoch = self.epoch_of(step)
        offset = (step % self.steps_per_epoch) * self.effective_batch
        order = epoch_permutation(self.seed, epoch, self.num_samples)
        return order[offset : offset + self.effective_batch]

    def iter_steps(self, start_step: int = 0) -> Iterator[tuple[int, int, list[int]]]:
        """(global step, epoch, sample indices) from `start_step` to the end."""
        cached_epoch, order = -1, []
        for step in range(start_step, self.total_steps):
            epoch = self.epoch_of(step)
            if epoch != cached_epoch:
                cached_epoch, order = epoch, epoch_permutation(self.seed, epoch, self.num_samples)
            offset = (step % self.steps_per_epoch) * self.effective_batch
            yield step, epoch, order[offset : offset + self.effective_batch]


def split_micro_batches(indices: list[int], micro_batch_size: int) -> list[list[int]]:
    """Consecutive micro-batches of at most `micro_batch_size` samples."""
    size = max(1, int(micro_batch_size))
    return [indices[i : i + size] for i in range(0, len(indices), size)]
