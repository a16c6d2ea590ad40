"""What the processes of a multi-process run tell each other once per optimizer-step attempt.

Before the update (or after freeing, when this process ran out of memory) every rank exchanges: whether it
ran out of memory, whether a stop was asked, its loss and its memory. One rank out of memory makes every rank
abandon the step (`PeerOutOfMemory`) and retry with the same rung; a stop is agreed so all stop together.
With one process nothing is exchanged.
"""

from __future__ import annotations

from typing import Any

from loratui.train.oom.errors import PeerOutOfMemory


def data_parallel_view(accelerator: Any) -> tuple[int, int]:
    """(processes sharing each step's samples, this one's index), from the accelerator."""
    processes = int(getattr(accelerator, "num_processes", 1) or 1)
    return processes, int(getattr(accelerator, "process_index", 0) or 0) if processes > 1 else 0


class RankExchange:
    """This rank's side of the per-attempt exchange."""

    def __init__(self) -> None:
        self.agreed = False  # this rank told the others all was well in the current attempt
        self.exchanged: Any = None  # what the ranks said (`loratui.train.process.distributed.exchange`)
        self.local_loss = 0.0
        self.rank_memory: list[int] = []
        self.memory_kind = "rss"

    def start_attempt(self) -> None:
        self.agreed, self.exchanged, self.local_loss = False, None, 0.0

    def before_update(self) -> None:
        """`optimizer_step`'s hook before the update: with several processes, agree on OOM and stop."""
        from loratui.train.loop.signals import current
        from loratui.train.process.distributed import world_size

        if world_size() > 1:
            self.agreed = True
            stop = current()
            self.exchanged = self.exchange(
                oom=False, stop=bool(stop and stop.raw_requested), loss=self.local_loss
            )
            if self.exchanged.any_oom:
                raise PeerOutOfMemory("another process ran out of memory")
            if stop is not None:
                stop.agree(self.exchanged.any_stop)

    def exchange(self, *, oom: bool, stop: bool, loss: float) -> Any:
        from loratui.train.process.distributed import exchange, memory_now, peer_errors

        memory, self.memory_kind = memory_now()
        with peer_errors("an optimizer step"):
            return exchange(oom=oom, stop=stop, loss=loss, memory=memory)

    def step_loss(self, result: Any) -> None:
        """After a successful step: the loss over all ranks and each rank's memory, when they exchanged."""
        if self.exchanged is not None:
            result.loss = sum(self.exchanged.losses) / len(self.exchanged.losses)
            self.rank_memory = list(self.exchanged.memory)
