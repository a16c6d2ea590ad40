"""Memory around one optimizer step: what a failed attempt leaves behind, the simulated card's meter, and
freeing after a failure.

`Failure` describes a failed attempt without holding its tensors; `StepMemory` measures usage before a step,
snapshots memory at a failure, tells whether freeing gave the memory back (`leaked`), and frees it (`free`).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loratui.train.job import WorkerJob
from loratui.train.oom.errors import OomExhausted, is_oom, short_error
from loratui.train.oom.ladder import Rung

LEAK_SLACK = 64 * 2**20  # CUDA bytes that may stay allocated after freeing (allocator rounding, workspaces)


def step_counters(optimizer: Any) -> dict[int, float]:
    """Every parameter's optimizer step count (AdamW counts before it changes anything)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return {id(p): float(state.get("step", 0)) for p, state in inner.state.items()}


def update_started(before: dict[int, float], after: dict[int, float]) -> bool:
    """True when a step count moved: the update was (partly) applied. New zero state is not an update."""
    return any(count != before.get(key, 0.0) for key, count in after.items())


def state_bytes(optimizer: Any) -> int:
    """Bytes of the optimizer's state tensors."""
    inner = getattr(optimizer, "optimizer", optimizer)
    total = 0
    for state in inner.state.values():
        for value in state.values():
            if hasattr(value, "untyped_storage"):
                total += value.untyped_storage().nbytes()
    return total


def on_cuda(accelerator: Any) -> bool:
    return getattr(getattr(accelerator, "device", None), "type", "cpu") == "cuda"


@dataclass
class Failure:
    """A failed attempt, without references to its tensors."""

    error: str
    memory: dict[str, int]
    at: float
    peer: bool = False
    sticky: bool = False
    counters_changed: bool = False
    state_growth: int = 0
    baseline: dict[str, int] = field(default_factory=dict)


@dataclass
class Pending:
    """Recoveries of the current step, waiting for its successful retry."""

    first: Failure
    old: dict[str, Any]
    rungs: list[Rung] = field(default_factory=list)


class StepMemory:
    """The memory a step uses: the simulated card's meter (`simulate_vram`) and the CUDA allocator.

    `step_kwargs` are `optimizer_step`'s keywords (accelerator, optimizer, model); `meter_modules()` lists the
    modules whose weights count against a simulated card (default: the model); `release()` frees what the
    trainer placed on the device for the failed step beyond its tensors (Flux: the swapped blocks)."""

    def __init__(
        self,
        job: WorkerJob,
        step_kwargs: dict[str, Any],
        meter_modules: Callable[[], list[Any]] | None = None,
        release: Callable[[], None] | None = None,
    ) -> None:
        self.job = job
        self.step_kwargs = step_kwargs
        self.meter_modules = meter_modules
        self.release = release
        self.budget = self._simulated_budget()
        self.meter: Any = None
        if self.budget:
            self.build_meter()

    @property
    def accelerator(self) -> Any:
        return self.step_kwargs.get("accelerator")

    @property
    def on_cuda(self) -> bool:
        return on_cuda(self.accelerator)

    def _simulated_budget(self) -> int | None:
        from loratui.memory.meter import simulated_budget_from_env_or_config

        return simulated_budget_from_env_or_config(self.job.resolved.config)

    def build_meter(self) -> None:
        """A fresh meter with the weights, LoRA and optimizer state on the (simulated) card now."""
        from loratui.memory.meter import MemoryMeter

        if self.meter is not None:
            self.meter.close()
        meter = MemoryMeter(budget_bytes=self.budget)
        modules = self.meter_modules() if self.meter_modules else [self.step_kwargs.get("model")]
        try:
            for module in modules:
                if module is not None:
                    meter.register_model(module)
            meter.register_optimizer(self.step_kwargs["optimizer"])
        except Exception as exc:
            if is_oom(exc):
                meter.close()
                raise OomExhausted(
                    f"the model alone does not fit the simulated card: {short_error(exc)}. "
                    "Use a larger simulate_vram or a smaller model"
                ) from None
            raise
        self.meter = meter

    def usage(self) -> dict[str, int]:
        """Bytes in use now (meter live bytes, CUDA allocated), to compare after a failure."""
        usage = {}
        if self.meter is not None:
            usage["meter_live"] = int(self.meter.live_bytes)
        if self.on_cuda:
            import torch

            usage["cuda_allocated"] = int(torch.cuda.memory_allocated())
        return usage

    def snapshot(self) -> dict[str, int]:
        """Memory at the failure: meter live/peak bytes and budget, CUDA allocated/reserved."""
        memory: dict[str, int] = {}
        if self.meter is not None:
            memory.update(
                meter_live=int(self.meter.live_bytes),
                meter_peak=int(self.meter.peak_bytes),
                meter_budget=int(self.budget or 0),
            )
        if self.on_cuda:
            import torch

            with contextlib.suppress(Exception):
                memory.update(
                    cuda_allocated=int(torch.cuda.memory_allocated()),
                    cuda_reserved=int(torch.cuda.memory_reserved()),
                    cuda_max_allocated=int(torch.cuda.max_memory_allocated()),
                )
        return memory

    def leaked(self, failure: Failure) -> str:
        """What is still allocated beyond the step's start (and new optimizer state), or ''."""
        from loratui.util.sizes import format_bytes

        now = self.usage()
        growth = max(0, failure.state_growth)
        for key, slack in (("meter_live", 0), ("cuda_allocated", LEAK_SLACK)):
            if key in now and key in failure.baseline:
                extra = now[key] - failure.baseline[key] - growth
                if extra > slack:
                    return f"{format_bytes(extra)} more than before the step"
        return ""

    def budget_and_device(self) -> tuple[int | None, str]:
        """(bytes the step may use, "cuda" | "cpu"): the simulated card, else the CUDA device's size."""
        if self.budget:
            return self.budget, "cuda" if self.on_cuda else "cpu"
        if self.on_cuda:
            import torch

            return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory), "cuda"
        return None, "cpu"

    def free(self, *, full: bool = True) -> None:
        """Drop the failed step's gradients and scaler state and what `release` frees, collect garbage,
        return cached CUDA blocks. `full=False` collects only the young generations (a full pass over a large
        heap takes ~0.4 s)."""
        import torch

        self.step_kwargs["optimizer"].zero_grad(set_to_none=True)
        if self.release is not None:
            self.release()
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and hasattr(scaler, "_per_optimizer_states"):
            from torch.amp.grad_scaler import _refresh_per_optimizer_state

            scaler._per_optimizer_states.clear()
            scaler._per_optimizer_states.default_factory = _refresh_per_optimizer_state
        gc.collect() if full else gc.collect(1)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
