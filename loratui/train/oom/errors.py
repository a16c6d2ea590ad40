"""Telling an out-of-memory error from other failures, and the errors OOM recovery raises.

`is_oom` recognises the device (or the simulated card, or the CPU allocator) running out of memory, also
through `raise ... from`; `is_sticky` the CUDA errors that only a new process clears. `RestartNeeded` makes the
worker exit with `EXIT_RESTART`, which its supervisor answers with a restart from the last checkpoint.
`skipped_when_out_of_memory` guards side outputs (samples, evaluation) that are not worth the run.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator
from typing import Any, Protocol

EXIT_RESTART = 75  # the worker asks its supervisor for a restart from the last checkpoint
OOM_MESSAGES = (
    "CUDA out of memory",
    "CUDA error: out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "DefaultCPUAllocator: can't allocate memory",
    "MPS backend out of memory",
    "HIP out of memory",
)
PRESSURE_MESSAGES = (
    "CUDNN_STATUS_NOT_SUPPORTED",
    "CUDNN_STATUS_INTERNAL_ERROR",
    "CUBLAS_STATUS_NOT_INITIALIZED",
)
STICKY_MESSAGES = (
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "CUDA error: misaligned address",
    "uncorrectable ECC error",
)
PRESSURE_SHARE = 0.85  # share of the card in use above which cuDNN/cuBLAS failures count as out of memory


class EventSink(Protocol):
    """Where OOM recovery reports: `loratui.train.loop.reporting.Reporter` (or a test's stand-in)."""

    def event(self, type: str, step: int | None = None, **fields: Any) -> object: ...


class OomExhausted(RuntimeError):
    """Out of memory with every rung of the ladder used; the message names the smallest option."""


class RestartNeeded(RuntimeError):
    """In-process recovery is not possible; the supervisor restarts the worker with the lowered settings."""


class PeerOutOfMemory(RuntimeError):
    """Another process ran out of memory in this step (all ranks retry together)."""


def memory_pressure() -> bool:
    """True when the current CUDA device is nearly full (cuDNN/cuBLAS errors then mean out of memory)."""
    try:
        import torch

        if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
            return False
        free, total = torch.cuda.mem_get_info()
        return total > 0 and (total - free) / total >= PRESSURE_SHARE
    except Exception:
        return False


def is_oom(exc: BaseException, pressure: Callable[[], bool] | None = None) -> bool:
    """Whether an exception (or the one it was raised from) means the device ran out of memory.

    `torch.OutOfMemoryError` (= `torch.cuda.OutOfMemoryError`, also raised by `MemoryMeter`'s simulated card),
    `MemoryError`, CPU/cuBLAS/cuDNN allocation failures; `CUDNN_STATUS_NOT_SUPPORTED` and similar only under
    memory pressure (`pressure()`, default: the CUDA device is nearly full). Anything else is not."""
    import torch

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, torch.OutOfMemoryError | MemoryError):
            return True
        if isinstance(current, RuntimeError):
            text = str(current)
            if any(marker in text for marker in OOM_MESSAGES):
                return True
            if any(marker in text for marker in PRESSURE_MESSAGES) and (pressure or memory_pressure)():
                return True
        current = current.__cause__
    return False


def is_sticky(exc: BaseException) -> bool:
    """CUDA errors that poison the context: only a new process can continue."""
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in STICKY_MESSAGES)


def short_error(exc: BaseException, limit: int = 300) -> str:
    """'OutOfMemoryError: first line of the message' (trimmed)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def skipped_when_out_of_memory(reporter: EventSink, what: str, step: int, hint: str) -> Iterator[None]:
    """Side outputs (samples, evaluation) are not worth the run: running out of memory in one skips it with a
    `warning` event (`skipped: what`) and training goes on; any other error propagates."""
    failure = None
    try:
        yield
    except Exception as exc:
        if not is_oom(exc):
            raise
        failure = short_error(exc)
    if failure is None:
        return
    # here, past the `except` block: its traceback (and the tensors it holds) is gone
    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    reporter.event(
        "warning",
        step,
        message=f"{what} at step {step} skipped: out of memory ({failure}); training goes on. {hint}",
        skipped=what,
    )
