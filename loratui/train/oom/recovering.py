"""Out-of-memory recovery inside a run: detect, free, lower settings one rung, re-run the same optimizer step.

Both trainers call `RecoveringStep.run(step, indices, micro_loss)` instead of `optimizer_step`. When the step
runs out of memory (a CUDA, cuBLAS/cuDNN or CPU allocator failure, or `MemoryMeter`'s simulated card):

1. the `except` block is left first (its traceback holds the failed micro-batch's tensors and graph);
2. gradients are dropped (`zero_grad(set_to_none=True)`), the fp16 grad scaler's per-step state is reset,
   `gc.collect()` and `torch.cuda.empty_cache()` run;
3. the ladder (`oom_ladder`) picks the next rung, skipping rungs the memory planner says cannot be enough;
   all processes agree on it (`oom_dist`); the trainer's callback applies it to the live objects;
4. the same optimizer step is re-run from its first micro-batch. Each micro-loss is divided by the whole
   step's normaliser, so the update does not depend on the micro-batch size: no sample is skipped or applied
   twice, and the number of optimizer steps and the effective batch stay as planned.

In-process recovery is abandoned for a worker restart (`RestartNeeded`, exit code `EXIT_RESTART`, handled by
the supervisor) when memory is not released, when the update itself was partially applied, or when a sticky
CUDA error follows. When no rung is left, `OomExhausted` names the smallest option the memory planner knows.

Events: `oom` (each failure: step, error, memory, old -> new settings, rung) and `oom_recovered` (after the
retried step succeeded, with `seconds` from the failure); `run_finished` carries `oom_recoveries`. The live
settings are written into the run directory's config.yaml and `oom.json`.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from loratui.train.oom.ladder import OomLadder, Rung, combine, describe_change, kind_of, settings_of

EXIT_RESTART = 75  # the worker asks its supervisor for a restart from the last checkpoint
DEBUG_SAMPLES_ENV = "LORATUI_DEBUG_SAMPLES"
PLANNER_ENV = "LORATUI_OOM_PLANNER"  # "0": climb one rung at a time without the memory planner
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
LEAK_SLACK = 64 * 2**20  # CUDA bytes that may stay allocated after freeing (allocator rounding, workspaces)


# --- detection -------------------------------------------------------------------------------------------


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
def skipped_when_out_of_memory(reporter: Any, what: str, step: int, hint: str) -> Iterator[None]:
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


# --- helpers -----------------------------------------------------------------------------------------------


def _step_counters(optimizer: Any) -> dict[int, float]:
    """Every parameter's optimizer step count (AdamW counts before it changes anything)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return {id(p): float(state.get("step", 0)) for p, state in inner.state.items()}


def _update_started(before: dict[int, float], after: dict[int, float]) -> bool:
    """True when a step count moved: the update was (partly) applied. New zero state is not an update."""
    return any(count != before.get(key, 0.0) for key, count in after.items())


def _state_bytes(optimizer: Any) -> int:
    inner = getattr(optimizer, "optimizer", optimizer)
    total = 0
    for state in inner.state.values():
        for value in state.values():
            if hasattr(value, "untyped_storage"):
                total += value.untyped_storage().nbytes()
    return total


def _on_cuda(accelerator: Any) -> bool:
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
class _Pending:
    """Recoveries of the current step, waiting for its successful retry."""

    first: Failure
    old: dict[str, Any]
    rungs: list[Rung] = field(default_factory=list)


# --- the recovering step ------------------------------------------------------------------------------------


class RecoveringStep:
    """`optimizer_step` with out-of-memory recovery (see the module docstring).

    `apply(changes) -> bool` is the trainer's callback that applies a rung's settings to its live objects
    (checkpointing on the model, caches, data); batch size/accumulation need no callback (the config is read
    on every attempt) and the 8-bit optimizer swap is done here. `meter_modules()` lists the modules whose
    weights count against a simulated card (`simulate_vram`). `step_kwargs` are `optimizer_step`'s keywords.
    """

    def __init__(
        self,
        job: Any,
        reporter: Any,
        *,
        apply: Callable[[dict[str, Any]], bool] | None = None,
        meter_modules: Callable[[], list[Any]] | None = None,
        can_cache_latents: bool = True,
        can_cache_text: bool = True,
        **step_kwargs: Any,
    ) -> None:
        from loratui.train.oom.record import read_record

        self.job = job
        self.reporter = reporter
        self.kind = kind_of(job.resolved.family)
        self.apply = apply
        self.meter_modules = meter_modules
        self.step_kwargs = step_kwargs
        self.recoveries: list[dict[str, Any]] = []
        self.debug_samples = os.environ.get(DEBUG_SAMPLES_ENV, "") not in ("", "0")
        self._samples: list[int] = []
        self._agreed = False
        self._exchanged: Any = None
        self._local_loss = 0.0
        self._rank_memory: list[int] = []
        self._memory_kind = "rss"
        self._estimator_ok = True
        record = read_record(job.run.path) if job.run is not None else {}
        self.started = settings_of(self.cfg, self.kind)
        self.original = dict(record.get("original") or self.started)
        self.ladder = OomLadder(
            self.kind,
            self.original,
            allow_quality=self.cfg.oom_allow_quality_reduction,
            unavailable=self._unavailable(),
            can_cache_latents=can_cache_latents,
            can_cache_text=can_cache_text,
        )
        self.budget = self._simulated_budget()
        self.meter = None
        if self.budget:
            self._build_meter()

    # --- public ------------------------------------------------------------------------------------------

    @property
    def cfg(self) -> Any:
        return self.job.resolved.config

    @property
    def optimizer(self) -> Any:
        return self.step_kwargs["optimizer"]

    def run(self, step: int, indices: Sequence[int], micro_loss: Callable[[Sequence[int]], Any]):
        """Run optimizer step `step` (1-based) over `indices`; returns `optimizer_step`'s `StepResult`."""
        pending: _Pending | None = None
        while True:
            outcome = self._attempt(indices, micro_loss, retrying=pending is not None)
            if not isinstance(outcome, Failure):
                break
            pending = self._recover(step, outcome, pending)
        if pending is not None:
            self._recovered(step, pending)
        return outcome

    def step_fields(self) -> dict[str, Any]:
        """Extra fields for the next `step` event: the samples used since the last one (debug), meter peak."""
        fields: dict[str, Any] = {}
        if self.debug_samples:
            fields["sample_indices"], self._samples = self._samples, []
        if self.meter is not None:
            fields["meter_peak"] = int(self.meter.peak_bytes)
            fields["meter_budget"] = int(self.budget or 0)
        if self._rank_memory:  # several processes: each one's memory ("gpu": CUDA peak reserved, "rss": CPU)
            fields["rank_memory"], fields["rank_memory_kind"] = list(self._rank_memory), self._memory_kind
        return fields

    def summary(self) -> dict[str, Any]:
        """Fields for `run_finished`: every recovery of this worker."""
        return {"oom_recoveries": list(self.recoveries)}

    # --- one attempt ---------------------------------------------------------------------------------------

    def _attempt(self, indices: Sequence[int], micro_loss: Callable[[Sequence[int]], Any], *, retrying: bool):
        from loratui.train.loop.plan import split_micro_batches
        from loratui.train.loop.stepping import optimizer_step
        from loratui.train.process.distributed import PeerLost, describe_loss, is_comm_error, shard

        seen: list[int] = []
        processes, index = self._processes()
        local = shard(indices, index, processes)
        weight = float(processes) if local else 0.0  # a rank without samples still joins the all-reduce
        local = local or list(indices[:1])
        self._local_loss = 0.0

        def recording(batch: Sequence[int]) -> Any:
            seen.extend(int(i) for i in batch)
            loss = micro_loss(batch)
            if weight != 1.0:  # the gradients are averaged over ranks (all_reduce_gradients): undo it
                loss = loss * weight
            self._local_loss += float(loss.detach())
            return loss

        counters, state_before = _step_counters(self.optimizer), _state_bytes(self.optimizer)
        baseline = self._usage()
        self._agreed = False
        self._exchanged = None
        if self.meter is not None:
            self.meter.reset_peak()
        try:
            with self.meter if self.meter is not None else contextlib.nullcontext():
                result = optimizer_step(
                    split_micro_batches(local, self.cfg.batch_size),
                    recording,
                    before_update=self._before_update,
                    **self.step_kwargs,
                )
        except PeerLost:
            raise
        except PeerOutOfMemory:
            failure = Failure(
                "PeerOutOfMemory: another process ran out of memory",
                self._memory(),
                time.perf_counter(),
                peer=True,
            )
        except Exception as exc:
            from loratui.train.process.oom_dist import world_size

            if world_size() > 1 and is_comm_error(exc) and not is_oom(exc):
                raise PeerLost(describe_loss(exc, "an optimizer step")) from exc
            # a CUDA error after an out-of-memory: a new process is needed
            sticky = is_sticky(exc) and retrying
            if not (self.cfg.oom_recovery and (is_oom(exc) or sticky)):
                raise
            failure = Failure(short_error(exc), self._memory(), time.perf_counter(), sticky=sticky)
        else:
            if self.debug_samples:
                self._samples.extend(seen)
            if self._exchanged is not None:  # the step's loss over all ranks, each rank's memory
                result.loss = sum(self._exchanged.losses) / len(self._exchanged.losses)
                self._rank_memory = list(self._exchanged.memory)
            return result
        # Outside the except block: the traceback (and the tensors its frames hold) is gone.
        failure.counters_changed = _update_started(counters, _step_counters(self.optimizer))
        failure.state_growth = _state_bytes(self.optimizer) - state_before
        failure.baseline = baseline
        return failure

    def _before_update(self) -> None:
        from loratui.train.loop.signals import current
        from loratui.train.process.oom_dist import world_size

        if world_size() > 1:
            self._agreed = True
            stop = current()
            self._exchanged = self._exchange(
                oom=False, stop=bool(stop and stop.raw_requested), loss=self._local_loss
            )
            if self._exchanged.any_oom:
                raise PeerOutOfMemory("another process ran out of memory")
            if stop is not None:
                stop.agree(self._exchanged.any_stop)

    def _exchange(self, *, oom: bool, stop: bool, loss: float) -> Any:
        from loratui.train.process.distributed import exchange, memory_now, peer_errors

        memory, self._memory_kind = memory_now()
        with peer_errors("an optimizer step"):
            return exchange(oom=oom, stop=stop, loss=loss, memory=memory)

    def _processes(self) -> tuple[int, int]:
        """(processes sharing each step's samples, this one's index): the accelerator's data-parallel view."""
        accelerator = self.step_kwargs.get("accelerator")
        processes = int(getattr(accelerator, "num_processes", 1) or 1)
        return processes, int(getattr(accelerator, "process_index", 0) or 0) if processes > 1 else 0

    # --- recovery -------------------------------------------------------------------------------------------

    def _recover(self, step: int, failure: Failure, pending: _Pending | None) -> _Pending:
        from loratui.train.process.distributed import peer_errors
        from loratui.train.process.oom_dist import agree_max, world_size

        if failure.sticky:  # before freeing: CUDA calls may fail again
            self._restart(step, failure, "a CUDA error that only a new process clears", lower=False)
        if failure.counters_changed:
            self._restart(step, failure, "out of memory while the optimizer update was being applied")
        self._free(full=not failure.baseline)  # with usage to compare, a young-generation pass first
        if self._leaked(failure):
            self._free(full=True)
        if world_size() > 1 and not failure.peer:
            if self._agreed:  # this rank already told the others all was well
                self._restart(step, failure, "out of memory after the processes agreed on the step")
            self._exchange(oom=True, stop=False, loss=0.0)
        leaked = self._leaked(failure)
        if leaked:
            self._restart(step, failure, f"memory was not released after the failure ({leaked})")
        pending = pending or _Pending(failure, settings_of(self.cfg, self.kind))
        while True:
            rungs = self.ladder.choose(settings_of(self.cfg, self.kind), self._fits())
            with peer_errors("the out-of-memory agreement"):
                agreed = agree_max(len(rungs))
            rungs = self.ladder.remaining(settings_of(self.cfg, self.kind))[:agreed]
            if not rungs:
                raise OomExhausted(self._exhausted_message(step, failure))
            old = settings_of(self.cfg, self.kind)
            applied = self._apply_in_order(rungs)
            if applied:
                break
        rung = combine(applied)
        pending.rungs.append(rung)
        new = settings_of(self.cfg, self.kind)
        self._oom_event(step, failure, old, new, rung)
        if rung.quality:
            self.reporter.event(
                "warning",
                step,
                message=f"OUT OF MEMORY: lowering quality to fit: {rung.label}; "
                "set oom_allow_quality_reduction: false to stop instead",
            )
        self._save_settings()
        return pending

    def _apply_in_order(self, rungs: list[Rung]) -> list[Rung]:
        """Apply rungs one by one; a rung that cannot be applied here is marked unavailable (and stops)."""
        from loratui.train.oom.record import apply_settings

        applied = []
        for rung in rungs:
            previous = {key: getattr(self.cfg, key) for key in rung.changes}
            apply_settings(self.job.resolved, rung.changes)
            try:
                ok = self._apply_live(rung.changes)
            except Exception as exc:  # a rung that cannot be applied here is skipped, not fatal
                ok = False
                self.reporter.event(
                    "warning", message=f"OOM ladder: {rung.label} is not possible here: {short_error(exc)}"
                )
            if not ok:
                apply_settings(self.job.resolved, previous)
                self.ladder.unavailable.add(rung.name)
                break
            applied.append(rung)
        if applied and self.meter is not None:
            self._build_meter()
        return applied

    def _apply_live(self, changes: dict[str, Any]) -> bool:
        """Apply changes (already in the config) to the live objects: the optimizer here, the rest through
        the trainer's callback."""
        if "optimizer" in changes:
            from loratui.train.oom.optimizer_swap import swap_to_8bit

            if not swap_to_8bit(self.optimizer, self.step_kwargs.get("scheduler")):
                return False
        return self.apply is None or self.apply(dict(changes)) is not False

    def _recovered(self, step: int, pending: _Pending) -> None:
        from loratui.train.oom import cache as oom_cache

        rung = combine(pending.rungs)
        new = settings_of(self.cfg, self.kind)
        seconds = time.perf_counter() - pending.first.at
        summary = {
            "step": step,
            "rung": rung.name,
            "old": pending.old,
            "new": new,
            "seconds": round(seconds, 4),
            "error": pending.first.error,
        }
        self.recoveries.append(summary)
        self.reporter.event(
            "oom_recovered",
            step,
            error=pending.first.error,
            memory=pending.first.memory,
            old=pending.old,
            new=new,
            rung=rung.name,
            label=rung.label,
            seconds=seconds,
        )
        record = self._save_settings(recoveries=[summary])
        if self.cfg.oom_cache and record:
            oom_cache.remember(
                record.get("cache_key") or "",
                new,
                model=str(self.cfg.base_model),
                device=oom_cache.device_key(self.cfg),
            )

    def _oom_event(
        self, step: int, failure: Failure, old: dict[str, Any], new: dict[str, Any], rung: Rung, **extra: Any
    ) -> None:
        """The `oom` event: what failed, the settings before and after, and the rung that changed them."""
        self.reporter.event(
            "oom",
            step,
            error=failure.error,
            memory=failure.memory,
            old=old,
            new=new,
            rung=rung.name,
            label=rung.label,
            quality_reduced=rung.quality,
            **extra,
        )

    def _save_settings(self, **extra: Any) -> dict[str, Any]:
        """Rewrite config.yaml with the live settings and update oom.json (rank 0 only)."""
        from loratui.train.oom import cache as oom_cache
        from loratui.train.oom.record import note_settings, save_live_config
        from loratui.train.process.distributed import is_main

        if self.job.run is None or not is_main():
            return {}
        save_live_config(self.job.run, self.job.resolved)
        original_cfg = self.cfg.model_copy(update=self.original)
        return note_settings(
            self.job.run.path,
            original=self.original,
            current=settings_of(self.cfg, self.kind),
            started=self.started,
            cache_key=oom_cache.cache_key(original_cfg, self.kind),
            **extra,
        )

    def _restart(self, step: int, failure: Failure, reason: str, *, lower: bool = True) -> None:
        """Ask the supervisor for a restart from the last checkpoint, first lowering the settings one rung for
        the next worker (`lower`: the current settings ran out of memory)."""
        from loratui.train.oom.record import apply_settings

        old = settings_of(self.cfg, self.kind)
        rung = Rung("none", "the same settings", {})
        if lower:
            rungs = self.ladder.choose(old, self._fits())
            if not rungs:
                raise OomExhausted(self._exhausted_message(step, failure))
            rung = combine(rungs)
            apply_settings(self.job.resolved, rung.changes)
        new = settings_of(self.cfg, self.kind)
        self._oom_event(step, failure, old, new, rung, restart=reason)
        self._save_settings(restarts_requested=[{"step": step, "reason": reason, "time": time.time()}])
        raise RestartNeeded(f"{reason}; restarting from the last checkpoint with {describe_change(old, new)}")

    def _free(self, *, full: bool = True) -> None:
        """Drop the failed step's gradients and scaler state, collect garbage, return cached CUDA blocks.
        `full=False` collects only the young generations (a full pass over a large heap takes ~0.4 s)."""
        import torch

        optimizer = self.optimizer
        optimizer.zero_grad(set_to_none=True)
        scaler = getattr(self.step_kwargs.get("accelerator"), "scaler", None)
        if scaler is not None and hasattr(scaler, "_per_optimizer_states"):
            from torch.amp.grad_scaler import _refresh_per_optimizer_state

            scaler._per_optimizer_states.clear()
            scaler._per_optimizer_states.default_factory = _refresh_per_optimizer_state
        gc.collect() if full else gc.collect(1)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    # --- memory ------------------------------------------------------------------------------------------

    def _simulated_budget(self) -> int | None:
        try:
            from loratui.memory.meter import simulated_budget_from_env_or_config
        except ImportError:
            return None
        return simulated_budget_from_env_or_config(self.cfg)

    def _build_meter(self) -> None:
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
            meter.register_optimizer(self.optimizer)
        except Exception as exc:
            if is_oom(exc):
                meter.close()
                raise OomExhausted(
                    f"the model alone does not fit the simulated card: {short_error(exc)}. "
                    "Use a larger simulate_vram or a smaller model"
                ) from None
            raise
        self.meter = meter

    def _usage(self) -> dict[str, int]:
        usage = {}
        if self.meter is not None:
            usage["meter_live"] = int(self.meter.live_bytes)
        if _on_cuda(self.step_kwargs.get("accelerator")):
            import torch

            usage["cuda_allocated"] = int(torch.cuda.memory_allocated())
        return usage

    def _memory(self) -> dict[str, int]:
        """Memory at the failure: meter live/peak bytes and budget, CUDA allocated/reserved."""
        memory: dict[str, int] = {}
        if self.meter is not None:
            memory.update(
                meter_live=int(self.meter.live_bytes),
                meter_peak=int(self.meter.peak_bytes),
                meter_budget=int(self.budget or 0),
            )
        if _on_cuda(self.step_kwargs.get("accelerator")):
            import torch

            with contextlib.suppress(Exception):
                memory.update(
                    cuda_allocated=int(torch.cuda.memory_allocated()),
                    cuda_reserved=int(torch.cuda.memory_reserved()),
                    cuda_max_allocated=int(torch.cuda.max_memory_allocated()),
                )
        return memory

    def _leaked(self, failure: Failure) -> str:
        """What is still allocated beyond the step's start (and new optimizer state), or ''."""
        from loratui.memory.sizes import format_bytes

        now = self._usage()
        growth = max(0, failure.state_growth)
        for key, slack in (("meter_live", 0), ("cuda_allocated", LEAK_SLACK)):
            if key in now and key in failure.baseline:
                extra = now[key] - failure.baseline[key] - growth
                if extra > slack:
                    return f"{format_bytes(extra)} more than before the step"
        return ""

    def _budget_and_device(self) -> tuple[int | None, str]:
        on_cuda = _on_cuda(self.step_kwargs.get("accelerator"))
        if self.budget:
            return self.budget, "cuda" if on_cuda else "cpu"
        if on_cuda:
            import torch

            return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory), "cuda"
        return None, "cpu"

    def _fits(self) -> Callable[[dict[str, Any]], bool | None] | None:
        """The memory planner's verdict on a set of settings: False when even its low estimate is over the
        budget; None when it cannot tell (then the ladder goes one rung at a time)."""
        budget, device = self._budget_and_device()
        if not budget or not self._estimator_ok or os.environ.get(PLANNER_ENV, "1") == "0":
            return None
        simulated = bool(self.budget)

        def fits(settings: dict[str, Any]) -> bool | None:
            try:
                from loratui.memory.estimate import estimate_peak

                estimate = estimate_peak(
                    self.cfg.model_copy(update=settings), family=self.job.resolved.family, device=device
                )
            except Exception:
                self._estimator_ok = False
                return None
            total = estimate.total_bytes
            if simulated:  # the meter does not see the CUDA context, workspaces or fragmentation
                total -= sum(
                    estimate.breakdown.get(k, 0) for k in ("cuda_context", "workspace", "fragmentation")
                )
            return int(total * (1 - estimate.error_band)) <= budget

        return fits

    def _exhausted_message(self, step: int, failure: Failure) -> str:
        settings = settings_of(self.cfg, self.kind)
        shown = ", ".join(f"{k}={v}" for k, v in settings.items())
        text = (
            f"out of memory at step {step} even after every rung of the OOM ladder ({shown}): "
            f"{failure.error}."
        )
        budget, device = self._budget_and_device()
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

    def _unavailable(self) -> set[str]:
        from loratui.train.oom.optimizer_swap import can_use_8bit

        out = set()
        accelerator = self.step_kwargs.get("accelerator")
        if not can_use_8bit(getattr(accelerator, "device", None)):
            out.add("optimizer_8bit")
        return out
