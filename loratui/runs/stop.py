"""Stop a running run from any shell (`loratui stop`), also one started with `--detach` or from another
terminal.

Asked to stop, the run's supervisor gets SIGTERM and forwards it to the worker, which finishes the optimizer
step it is in, saves a checkpoint and ends with state `stopped` (as Ctrl-C or the training view's `c` do).
`now=True` ends it at once instead: SIGKILL to the supervisor's process group (it leads its own session; the
worker and, with several processes, accelerate's launcher and every rank belong to it), then status.json and
events.jsonl record the stop, with no new checkpoint. Processes are recognised by pid and start time
(`loratui.runs.liveness`), never by a bare pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from loratui.runs.events import EventWriter
from loratui.runs.liveness import pid_alive
from loratui.runs.rundir import RunDir, find_run, list_runs
from loratui.runs.status import RunState, RunStatus, effective_state, supervisor_of

ACTIVE_STATES = (RunState.RUNNING.value, RunState.STARTING.value)
NOW_REASON = "loratui stop --now"


class StopOutcome(str, Enum):
    """How a stop request ended."""

    STOPPED = "stopped"  # the run ended (stopped, or it finished meanwhile)
    NOT_STOPPED = "not_stopped"  # still running when the wait ran out, or it ended failed
    NOT_RUNNING = "not_running"  # nothing to stop


@dataclass
class StopResult:
    """What `stop_run` did and the run's state afterwards."""

    run: RunDir
    outcome: StopOutcome
    state: str
    message: str
    checkpoint: Path | None = None


def is_active(run: RunDir) -> bool:
    """The run says it is running (or starting) and its process is alive."""
    state, _ = effective_state(run.status())
    return state in ACTIVE_STATES


def latest_active_run(runs_dir: Path) -> RunDir | None:
    """The newest run that is running now, or None."""
    return next((s.run for s in list_runs(runs_dir) if s.state in ACTIVE_STATES), None)


def find_run_to_stop(runs_dir: Path, name: str | None) -> RunDir | None:
    """`name` (a run name, unique prefix or directory) or, without one, the newest running run."""
    return find_run(runs_dir, name) if name else latest_active_run(runs_dir)


def _live_processes(status: RunStatus) -> tuple[int | None, int | None]:
    """(supervisor pid, worker pid), each only while it is the very process recorded (pid + start time)."""
    supervisor, started = supervisor_of(status)
    supervisor = supervisor if pid_alive(supervisor, started) else None
    worker = status.pid if pid_alive(status.pid, status.pid_started) else None
    return supervisor, worker


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signum)


def _kill_group(supervisor: int | None, worker: int | None) -> None:
    """SIGKILL the supervisor's process group (when it leads one), and the worker by itself."""
    if supervisor is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(supervisor) == supervisor:
                os.killpg(supervisor, signal.SIGKILL)
            else:
                os.kill(supervisor, signal.SIGKILL)
    if worker is not None and worker != supervisor:
        _signal(worker, signal.SIGKILL)


def _wait_until_gone(run: RunDir, timeout_s: float, poll_s: float) -> bool:
    """Wait until neither the supervisor nor the worker is alive; False when `timeout_s` ran out first."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = run.status() or RunStatus()
        if _live_processes(status) == (None, None):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)


def _record_killed(run: RunDir) -> Path | None:
    """status.json and events.jsonl after a stop at once: state `stopped`, no checkpoint written."""
    checkpoint = run.latest_checkpoint()
    status = run.status() or RunStatus()
    where = f"the last checkpoint is {checkpoint}" if checkpoint else "no checkpoint was saved"
    note = f"stopped at once ({NOW_REASON}): no checkpoint written now; {where}"
    with EventWriter(run.events_path) as events:
        events.write(
            "run_stopped",
            status.step,
            reason=NOW_REASON,
            checkpoint=str(checkpoint or ""),
            checkpoint_written=False,
        )
    status.state, status.message = RunState.STOPPED.value, note
    run.write_status(status)
    return checkpoint


def stop_run(run: RunDir, *, now: bool = False, timeout_s: float = 300.0, poll_s: float = 0.2) -> StopResult:
    """Ask `run` to checkpoint and stop (or, `now`, kill it) and wait up to `timeout_s` for it to end."""
    status = run.status()
    state, note = effective_state(status)
    if status is None or state not in ACTIVE_STATES:
        return StopResult(run, StopOutcome.NOT_RUNNING, state, f"run {run.name} is not running ({state})")
    supervisor, worker = _live_processes(status)
    if now:
        _kill_group(supervisor, worker)
        if not _wait_until_gone(run, timeout_s, poll_s):
            return StopResult(
                run, StopOutcome.NOT_STOPPED, state, f"run {run.name} did not end after SIGKILL"
            )
        checkpoint = _record_killed(run)
        message = f"run {run.name} stopped at once; no checkpoint written"
        if checkpoint:
            message += f"; resume from {checkpoint.name} with: loratui train --resume {run.path}"
        return StopResult(run, StopOutcome.STOPPED, RunState.STOPPED.value, message, checkpoint)
    target = supervisor or worker
    if target is not None:
        _signal(target, signal.SIGTERM)
    if not _wait_until_gone(run, timeout_s, poll_s):
        return StopResult(
            run,
            StopOutcome.NOT_STOPPED,
            state,
            f"run {run.name} is still running after {timeout_s:g} s (it may still be saving); wait longer "
            f"with --timeout, or end it at once with: loratui stop {run.name} --now",
        )
    state, note = effective_state(run.status())
    checkpoint = run.latest_checkpoint()
    if state == RunState.STOPPED.value:
        saved = f"; checkpoint {checkpoint}" if checkpoint else ""
        message = f"run {run.name} stopped{saved}; resume with: loratui train --resume {run.path}"
        return StopResult(run, StopOutcome.STOPPED, state, message, checkpoint)
    if state == RunState.FINISHED.value:
        return StopResult(run, StopOutcome.STOPPED, state, f"run {run.name} finished before it could stop")
    return StopResult(
        run, StopOutcome.NOT_STOPPED, state, f"run {run.name} ended {state}{': ' + note if note else ''}"
    )
