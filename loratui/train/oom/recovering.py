"""Out-of-memory recovery inside a run: detect, free, lower settings one rung, re-run the same optimizer step.

Both trainers call `RecoveringStep.run(step, indices, micro_loss)` instead of `optimizer_step`. When the step
runs out of memory (a CUDA, cuBLAS/cuDNN or CPU allocator failure, or `MemoryMeter`'s simulated card):

1. the `except` block is left first (its traceback holds the failed micro-batch's tensors and graph);
2. gradients are dropped (`zero_grad(set_to_none=True)`), the fp16 grad scaler's per-step state is reset,
   the trainer's `release` callback frees what it placed for the step (Flux: swapped blocks leave the device),
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
settings are recorded in the run directory's `oom.json` (`loratui.train.oom.record`).

The pieces: `errors` (telling an out-of-memory error from others), `step_memory` (the meter, usage, freeing),
`planner_jump` (the memory planner's verdicts), `rank_exchange` (what several processes agree on), `ladder`
(which setting next).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from loratui.config import TrainConfig
from loratui.train.job import WorkerJob
from loratui.train.loop.divergence import DivergenceWatch
from loratui.train.oom import cache as oom_cache
from loratui.train.oom.errors import (
    EventSink,
    OomExhausted,
    PeerOutOfMemory,
    RestartNeeded,
    is_oom,
    is_sticky,
    short_error,
)
from loratui.train.oom.ladder import OomLadder, Rung, combine, describe_change, kind_of, settings_of
from loratui.train.oom.planner_jump import PlannerJump
from loratui.train.oom.rank_exchange import RankExchange, data_parallel_view
from loratui.train.oom.record import apply_settings, note_settings, read_record
from loratui.train.oom.step_memory import (
    Failure,
    Pending,
    StepMemory,
    state_bytes,
    step_counters,
    update_started,
)

DEBUG_SAMPLES_ENV = "LORATUI_DEBUG_SAMPLES"
FSDP_UNAVAILABLE_RUNGS = ("optimizer_8bit", "offload", "activation_offload")  # not tried with sharding
FSDP_RESTART = (
    "out of memory with fsdp: the other processes wait inside this step's all-gather, so the step cannot be "
    "retried in this process"
)


class RecoveringStep:
    """`optimizer_step` with out-of-memory recovery (see the module docstring).

    `apply(changes) -> bool` is the trainer's callback that applies a rung's settings to its live objects
    (checkpointing on the model, caches, data); batch size/accumulation need no callback (the config is read
    on every attempt) and the 8-bit optimizer swap is done here. `meter_modules()` lists the modules whose
    weights count against a simulated card (`simulate_vram`); `release()` frees what the trainer placed on
    the device for a failed step beyond its tensors. `step_kwargs` are `optimizer_step`'s keywords.
    """

    def __init__(
        self,
        job: WorkerJob,
        reporter: EventSink,
        *,
        apply: Callable[[dict[str, Any]], bool] | None = None,
        meter_modules: Callable[[], list[Any]] | None = None,
        release: Callable[[], None] | None = None,
        can_cache_latents: bool = True,
        can_cache_text: bool = True,
        **step_kwargs: Any,
    ) -> None:
        self.job = job
        self.reporter = reporter
        self.kind = kind_of(job.resolved.family)
        self.apply = apply
        self.step_kwargs = step_kwargs
        self.recoveries: list[dict[str, Any]] = []
        self.debug_samples = os.environ.get(DEBUG_SAMPLES_ENV, "") not in ("", "0")
        self._samples: list[int] = []
        self.ranks = RankExchange()
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
        self.memory = StepMemory(job, step_kwargs, meter_modules, release)
        self.planner = PlannerJump(job, self.memory, self.kind)
        self.divergence = DivergenceWatch(job, reporter, step_kwargs.get("accelerator"))

    # --- public ------------------------------------------------------------------------------------------

    @property
    def cfg(self) -> TrainConfig:
        return self.job.resolved.config

    @property
    def sharded(self) -> bool:
        """FSDP training (`fsdp`, LLM runs): collectives run inside each step (see `_recover`, `_padding`)."""
        return bool(self.cfg.fsdp) and self.kind == "llm"

    @property
    def optimizer(self) -> Any:
        return self.step_kwargs["optimizer"]

    def run(self, step: int, indices: Sequence[int], micro_loss: Callable[[Sequence[int]], Any]):
        """Run optimizer step `step` (1-based) over `indices`; returns `optimizer_step`'s `StepResult`."""
        pending: Pending | None = None
        while True:
            outcome = self._attempt(indices, micro_loss, retrying=pending is not None)
            if not isinstance(outcome, Failure):
                break
            pending = self._recover(step, outcome, pending)
        if pending is not None:
            self._recovered(step, pending)
        self.divergence.observe(step, outcome)
        return outcome

    def step_fields(self) -> dict[str, Any]:
        """Extra fields for the next `step` event: the samples used since the last one (debug), meter peak."""
        fields: dict[str, Any] = {}
        if self.debug_samples:
            fields["sample_indices"], self._samples = self._samples, []
        if self.memory.meter is not None:
            fields["meter_peak"] = int(self.memory.meter.peak_bytes)
            fields["meter_budget"] = int(self.memory.budget or 0)
        if (
            self.ranks.rank_memory
        ):  # several processes: each one's memory ("gpu": CUDA peak reserved, "rss": CPU)
            fields["rank_memory"], fields["rank_memory_kind"] = (
                list(self.ranks.rank_memory),
                self.ranks.memory_kind,
            )
        return fields

    def summary(self) -> dict[str, Any]:
        """Fields for `run_finished`: every recovery of this worker."""
        return {"oom_recoveries": list(self.recoveries)}

    # --- one attempt ---------------------------------------------------------------------------------------

    def _attempt(self, indices: Sequence[int], micro_loss: Callable[[Sequence[int]], Any], *, retrying: bool):
        from loratui.train.loop.plan import split_micro_batches
        from loratui.train.loop.stepping import optimizer_step
        from loratui.train.process.batches import shard
        from loratui.train.process.distributed import PeerLost, describe_loss, is_comm_error

        seen: list[int] = []
        processes, index = data_parallel_view(self.step_kwargs.get("accelerator"))
        local = shard(indices, index, processes)
        weight = float(processes) if local else 0.0  # a rank without samples still joins the all-reduce
        local = local or list(indices[:1])
        batches = split_micro_batches(local, self.cfg.batch_size)
        padding = self._padding(batches, local)
        self.ranks.start_attempt()

        def recording(batch: Sequence[int]) -> Any:
            if batch is padding:  # FSDP: a zero-weighted micro-batch that keeps this rank in the collectives
                return micro_loss(batch) * 0.0
            seen.extend(int(i) for i in batch)
            loss = micro_loss(batch)
            if weight != 1.0:  # the gradients are averaged over ranks (all_reduce_gradients): undo it
                loss = loss * weight
            self.ranks.local_loss += float(loss.detach())
            return loss

        counters, state_before = step_counters(self.optimizer), state_bytes(self.optimizer)
        baseline = self.memory.usage()
        if self.memory.meter is not None:
            self.memory.meter.reset_peak()
        try:
            with self.memory.meter if self.memory.meter is not None else contextlib.nullcontext():
                result = optimizer_step(
                    batches,
                    recording,
                    before_update=self.ranks.before_update,
                    **self.step_kwargs,
                )
        except PeerLost:
            raise
        except PeerOutOfMemory:
            failure = Failure(
                "PeerOutOfMemory: another process ran out of memory",
                self.memory.snapshot(),
                time.perf_counter(),
                peer=True,
            )
        except Exception as exc:
            from loratui.train.process.distributed import world_size

            if world_size() > 1 and is_comm_error(exc) and not is_oom(exc):
                raise PeerLost(describe_loss(exc, "an optimizer step")) from exc
            # a CUDA error after an out-of-memory: a new process is needed
            sticky = is_sticky(exc) and retrying
            if not (self.cfg.oom_recovery and (is_oom(exc) or sticky)):
                raise
            failure = Failure(short_error(exc), self.memory.snapshot(), time.perf_counter(), sticky=sticky)
        else:
            if self.debug_samples:
                self._samples.extend(seen)
            self.ranks.step_loss(result)
            return result
        # Outside the except block: the traceback (and the tensors its frames hold) is gone.
        failure.counters_changed = update_started(counters, step_counters(self.optimizer))
        failure.state_growth = state_bytes(self.optimizer) - state_before
        failure.baseline = baseline
        return failure

    # --- recovery -------------------------------------------------------------------------------------------

    def _recover(self, step: int, failure: Failure, pending: Pending | None) -> Pending:
        from loratui.train.process.distributed import peer_errors, world_size
        from loratui.train.process.oom_dist import agree_max

        if self.sharded:  # the other ranks wait inside an all-gather or reduce-scatter of this step
            self._restart(step, failure, FSDP_RESTART)
        if failure.sticky:  # before freeing: CUDA calls may fail again
            self._restart(step, failure, "a CUDA error that only a new process clears", lower=False)
        if failure.counters_changed:
            self._restart(step, failure, "out of memory while the optimizer update was being applied")
        self.memory.free(full=not failure.baseline)  # with usage to compare, a young-generation pass first
        if self.memory.leaked(failure):
            self.memory.free(full=True)
        if world_size() > 1 and not failure.peer:
            if self.ranks.agreed:  # this rank already told the others all was well
                self._restart(step, failure, "out of memory after the processes agreed on the step")
            self.ranks.exchange(oom=True, stop=False, loss=0.0)
        leaked = self.memory.leaked(failure)
        if leaked:
            self._restart(step, failure, f"memory was not released after the failure ({leaked})")
        pending = pending or Pending(failure, settings_of(self.cfg, self.kind))
        while True:
            rungs = self.ladder.choose(settings_of(self.cfg, self.kind), self.planner.fits())
            with peer_errors("the out-of-memory agreement"):
                agreed = agree_max(len(rungs))
            rungs = self.ladder.remaining(settings_of(self.cfg, self.kind))[:agreed]
            if not rungs:
                raise OomExhausted(self.planner.exhausted_message(step, failure))
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
        if applied and self.memory.meter is not None:
            self.memory.build_meter()
        return applied

    def _apply_live(self, changes: dict[str, Any]) -> bool:
        """Apply changes (already in the config) to the live objects: the optimizer here, the rest through
        the trainer's callback."""
        if "optimizer" in changes:
            from loratui.train.oom.optimizer_swap import swap_to_8bit

            if not swap_to_8bit(self.optimizer, self.step_kwargs.get("scheduler")):
                return False
        return self.apply is None or self.apply(dict(changes)) is not False

    def _recovered(self, step: int, pending: Pending) -> None:
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
        """Record the live settings in oom.json, where a restarted worker starts from them (rank 0 only)."""
        from loratui.train.process.distributed import is_main

        # FSDP: the rank that ran out of memory records the lowered settings for the restarted group
        if self.job.run is None or not (is_main() or self.sharded):
            return {}
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
        old = settings_of(self.cfg, self.kind)
        rung = Rung("none", "the same settings", {})
        if lower:
            rungs = self.ladder.choose(old, self.planner.fits())
            if not rungs:
                raise OomExhausted(self.planner.exhausted_message(step, failure))
            rung = combine(rungs)
            apply_settings(self.job.resolved, rung.changes)
        new = settings_of(self.cfg, self.kind)
        self._oom_event(step, failure, old, new, rung, restart=reason)
        self._save_settings(restarts_requested=[{"step": step, "reason": reason, "time": time.time()}])
        raise RestartNeeded(f"{reason}; restarting from the last checkpoint with {describe_change(old, new)}")

    def _unavailable(self) -> set[str]:
        from loratui.models.checkpointing import offload_available
        from loratui.train.oom.optimizer_swap import can_use_8bit

        out = set()
        accelerator = self.step_kwargs.get("accelerator")
        if not can_use_8bit(getattr(accelerator, "device", None)):
            out.add("optimizer_8bit")
        if not offload_available(getattr(accelerator, "device", "cpu")):
            out.add("activation_offload")
        if self.sharded:
            # FSDP: 8-bit state is not sharded with the weights; the chunked loss calls the LM head outside
            # the model's forward, a different number of times on each rank (FSDP_UNAVAILABLE_RUNGS)
            out.update(FSDP_UNAVAILABLE_RUNGS)
        return out

    def _padding(self, batches: list[Any], local: list[int]) -> list[int] | None:
        """FSDP: every rank runs as many micro-batches as the rank with the most (each forward and backward
        is a collective); the missing ones are one sample with weight 0 (`recording`). None otherwise."""
        from loratui.train.process.distributed import peer_errors
        from loratui.train.process.oom_dist import agree_max

        if not self.sharded:
            return None
        with peer_errors("the micro-batch agreement"):
            most = agree_max(len(batches))
        padding = list(local[:1])
        batches.extend([padding] * (most - len(batches)))
        return padding
