"""Progress reporting for a run: events.jsonl, status.json, TensorBoard scalars and plain console lines.

With several training processes only rank 0 reports; the other ranks get a silent `Reporter` (events are
built and dropped, nothing in the run directory is touched).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from loratui.runs.rundir import RunDir
from loratui.runs.status import RunState, RunStatus
from loratui.train.loop.loggers import LoggerSettings, ScalarLoggers, open_loggers

STATUS_INTERVAL_S = 1.0


def memory_stats() -> dict[str, int]:
    """Current/peak CUDA memory of this process in bytes ({} on CPU)."""
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return {
                "memory_allocated": int(torch.cuda.memory_allocated()),
                "memory_reserved": int(torch.cuda.memory_reserved()),
                "memory_peak": int(torch.cuda.max_memory_reserved()),
            }
    except Exception:
        pass
    return {}


class _NoEvents:
    """The event writer of a rank other than 0: events are returned, not written."""

    def write(self, type: str, step: int | None = None, **fields: Any) -> dict[str, Any]:
        return {"type": type, "time": time.time(), "step": step, **fields}

    def close(self) -> None:
        return None


class Reporter:
    """Writes every progress signal of a run. One instance per worker process (silent off rank 0)."""

    def __init__(
        self,
        run: RunDir,
        total_steps: int,
        *,
        console: bool = True,
        tensorboard: bool = True,
        loggers: LoggerSettings | None = None,
    ):
        """`loggers`: the scalar loggers (`log_with`); None: TensorBoard alone unless `tensorboard` is False."""
        from loratui.train.process.distributed import is_main

        self.run = run
        self.writes = is_main()
        self.events = run.event_writer() if self.writes else _NoEvents()
        self.status = (run.status() if self.writes else None) or RunStatus()
        self.status.pid = os.getpid()
        self.status.total_steps = total_steps
        self.console = console and self.writes
        self._tb: ScalarLoggers | None = None
        self._tb_enabled = tensorboard and self.writes
        self._logger_settings = loggers or LoggerSettings()
        self._last_time: float | None = None
        self._start = time.time()
        self._status_written = 0.0
        self._closed = False

    @property
    def tensorboard(self) -> ScalarLoggers | None:
        """The scalar loggers of `log_with` (TensorBoard, W&B), opened on first use; None when there are
        none. `add_scalar(tag, value, step)` writes to each."""
        if self._tb is None and self._tb_enabled:
            self._tb_enabled = False  # opened once; a logger that fails is reported and left out

            def report(kind: str, message: str) -> None:
                self.event(kind, message=message)

            opened = open_loggers(self._logger_settings, self.run.logs_dir, self.run.name, report)
            self._tb = opened if opened.loggers else None
        return self._tb

    scalars = tensorboard

    def event(self, type: str, step: int | None = None, **fields: Any) -> dict[str, Any]:
        return self.events.write(type, step, **fields)

    def _set_status(self, state: str | None = None, **fields: Any) -> None:
        if state:
            self.status.state = state
        for key, value in fields.items():
            setattr(self.status, key, value)
        if self.writes:
            self.run.write_status(self.status)
        self._status_written = time.time()

    def started(self, **info: Any) -> None:
        from loratui.train.process.distributed import PEERS, world_size

        self._start = self._last_time = time.time()
        if world_size() > 1:  # one run, several processes: their pids let `attach`/tests find every rank
            info.setdefault("processes", world_size())
            info["rank_pids"] = self.status.extra["rank_pids"] = PEERS.pids
        self.event("run_started", self.status.step, total_steps=self.status.total_steps, **info)
        self._set_status(RunState.RUNNING.value, message="training")
        self._say(f"started: {self.status.total_steps} steps; run dir {self.run.path}")

    def step(self, step: int, epoch: int, loss: float, lr: float, samples: int, **extra: Any) -> None:
        """Record optimizer step `step` (1-based count of completed steps) that used `samples` samples."""
        now = time.time()
        elapsed = max(1e-9, now - (self._last_time or now))
        self._last_time = now
        rate = samples / elapsed
        fields = {"epoch": epoch, "loss": loss, "lr": lr, "samples_per_s": rate, **memory_stats(), **extra}
        self.event("step", step, **fields)
        self.status.step, self.status.epoch = step, epoch
        # status.json (an fsync'd atomic replace) at most every STATUS_INTERVAL_S; events carry every step.
        if now - self._status_written >= STATUS_INTERVAL_S or step >= (self.status.total_steps or 0):
            self._set_status()
        tb = self.tensorboard
        if tb is not None:
            tb.add_scalar("loss", loss, step)
            tb.add_scalar("lr", lr, step)
            tb.add_scalar("samples_per_s", rate, step)
            for key in ("tokens_per_s", "grad_norm", "memory_peak"):
                if isinstance(extra.get(key), int | float):
                    tb.add_scalar(key, extra[key], step)
        total = self.status.total_steps or 0
        remaining = (now - self._start) / max(1, step - self._first_step()) * max(0, total - step)
        self._say(
            f"step {step}/{total} epoch {epoch + 1} loss {loss:.4f} lr {lr:.2e} "
            f"{rate:.2f} samples/s eta {_fmt_eta(remaining)}"
        )

    def _first_step(self) -> int:
        return int(self.status.extra.get("first_step", 0))

    def resumed_from(self, step: int) -> None:
        self.status.extra["first_step"] = step
        self.status.step = step

    def checkpoint(self, step: int, path: os.PathLike) -> None:
        self.event("checkpoint", step, path=str(path))
        self._say(f"checkpoint saved: {path}")

    def finished(self, **info: Any) -> None:
        self.event("run_finished", self.status.step, elapsed_s=time.time() - self._start, **info)
        self._set_status(RunState.FINISHED.value, message="finished")
        self._say("finished")

    def stopped(self, reason: str, **info: Any) -> None:
        self.event("run_stopped", self.status.step, reason=reason, **info)
        self._set_status(RunState.STOPPED.value, message=f"stopped ({reason})")
        self._say(f"stopped ({reason})")

    def failed(self, error: str, **info: Any) -> None:
        self.event("run_failed", self.status.step, error=error, **info)
        self._set_status(RunState.FAILED.value, message=error[:500])
        self._say(f"failed: {error}")

    def _say(self, text: str) -> None:
        if self.console:
            print(f"[loratui] {text}", file=sys.stdout, flush=True)

    @property
    def closed(self) -> bool:
        """True once `close` has flushed and closed TensorBoard and the event log."""
        return self._closed

    def close(self) -> None:
        """Flush and close TensorBoard and the event log (once; later calls do nothing)."""
        if self._closed:
            return
        self._closed, self._tb_enabled = True, False
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self.events.close()


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
