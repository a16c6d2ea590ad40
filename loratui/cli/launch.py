"""`loratui train` after the config is resolved: checks, the run directory, the worker, then following it.

The core (`loratui.train.process.launch`) prepares the run and starts the worker; this module prints, handles
Ctrl-C and opens the training view.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

from loratui.config import ResolvedConfig
from loratui.runs.events import EventReader
from loratui.runs.follow import FINAL_EVENTS, format_event
from loratui.runs.lock import LockHeld
from loratui.runs.rundir import RunDir
from loratui.runs.status import RunState, RunStatus, pid_alive
from loratui.train.process.launch import EXIT_STOPPED, prepare_run, start_worker
from loratui.train.process.launcher import Processes
from loratui.train.process.preflight import OutputProblem, PreflightResult, disk_space_warning, run_preflight


def follow_plain(
    run: RunDir, process: subprocess.Popen | None, out, reader: EventReader | None = None
) -> int:
    """Print events as plain lines until the run ends. Ctrl-C asks the worker to checkpoint and stop;
    a second Ctrl-C detaches (training goes on). `reader` starts where it stands (a resumed run's earlier
    events are skipped); by default the whole log is shown."""
    reader = reader or EventReader(run.events_path)
    interrupts = 0
    final: str | None = None
    while True:
        try:
            for event in reader.poll():
                line = format_event(event)
                if line:
                    out.print(line, markup=False, highlight=False)
                if event.get("type") in FINAL_EVENTS:
                    final = event["type"]
            exited = (
                process.poll() is not None if process else not pid_alive((run.status() or RunStatus()).pid)
            )
            if final or exited:
                for event in reader.poll():
                    line = format_event(event)
                    if line:
                        out.print(line, markup=False, highlight=False)
                    final = event["type"] if event.get("type") in FINAL_EVENTS else final
                break
            time.sleep(0.2)
        except KeyboardInterrupt:
            interrupts += 1
            pid = process.pid if process else (run.status() or RunStatus()).pid
            if interrupts == 1 and pid:
                out.print("stopping: saving a checkpoint first (Ctrl-C again to detach and leave it running)")
                os.kill(pid, signal.SIGINT)
            else:
                out.print(f"detached; training continues. Follow it with: loratui attach {run.name}")
                return 0
    if process is not None:
        code = process.wait()
        if code == 2 and final is None:
            return 2
    if final is None:  # the event log was moved or cut short: status.json still has the outcome
        final = _outcome_from_status(run, out)
    if final == "run_finished":
        return 0
    if final == "run_stopped":
        return EXIT_STOPPED
    log = run.path / "worker.log"
    out.print(f"training did not finish; see {log}", markup=False)
    return 1


def _outcome_from_status(run: RunDir, out) -> str | None:
    """The final event type status.json stands for (finished/stopped), said in one line; None otherwise."""
    status = run.status()
    state = status.state if status else None
    final = {RunState.FINISHED.value: "run_finished", RunState.STOPPED.value: "run_stopped"}.get(state or "")
    if final:
        out.print(
            f"{state} (from {run.status_path}; the event log {run.events_path.name} was moved or cut short)",
            markup=False,
        )
    return final


def launch_training(
    resolved: ResolvedConfig,
    *,
    resume: str | None,
    skip_checks: bool,
    overwrite: bool,
    detach: bool,
    tui: bool,
    out,
    processes: Processes | None = None,
    allow_changed_data: bool = False,
) -> int:
    """Check, prepare the run directory, start the worker(s), and follow the run (or detach)."""
    preflight = run_preflight(resolved)
    print_preflight(preflight, skip_checks=skip_checks, out=out)
    if preflight.blocked(skip_checks=skip_checks):
        return 1
    from loratui.train.loop.resume_inputs import ChangedInputs

    notes: list[str] = []
    try:
        run, checkpoint = prepare_run(
            resolved,
            resume=resume,
            overwrite=overwrite,
            skip_checks=skip_checks,
            processes=processes,
            allow_changed_data=allow_changed_data,
            notes=notes,
        )
    except (FileNotFoundError, ChangedInputs, OutputProblem, LockHeld) as exc:
        out.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return 1
    from loratui.train.loop.loggers import missing_logger_message

    for warning in (disk_space_warning(resolved), missing_logger_message(resolved.config.log_with)):
        if warning:
            out.print(f"warning: {warning}", markup=False, highlight=False, soft_wrap=True)
    if checkpoint:
        from loratui.runs.checkpoints import damaged_newer

        for line in [*damaged_newer(checkpoint), *notes]:
            out.print(f"warning: {line}", markup=False, highlight=False, soft_wrap=True)
        out.print(f"resuming from {checkpoint}", markup=False, highlight=False, soft_wrap=True)
    if processes is not None and processes.launcher:
        out.print(distributed_summary(resolved, processes), markup=False)
    reader = EventReader(run.events_path)
    reader.poll()  # a resumed run's earlier events (its run_stopped too) are history, not this session's progress
    process = start_worker(run)
    out.print(f"run directory: {run.path} (supervisor pid {process.pid})", markup=False)
    if detach:
        out.print(f"training in the background; follow it with: loratui attach {run.name}", markup=False)
        return 0
    from loratui.cli.common import plain_output

    if tui and not plain_output():
        from loratui.tui.launch import open_training_view

        return open_training_view(run.path)
    return follow_plain(run, process, out, reader)


def print_preflight(result: PreflightResult, *, skip_checks: bool, out) -> None:
    """The dataset check's errors (nothing when there are none), and how to go on."""
    if result.ok:
        return
    verb = "continuing anyway (--skip-checks)" if skip_checks else "not training"
    out.print(f"dataset check found {len(result.errors)} error(s); {verb}:", markup=False)
    for finding in result.errors:
        out.print(f"  - {finding.message} (fix: {finding.fix})", markup=False)
        for example in finding.examples[:3]:
            where = f"{example.path}:{example.line}" if example.line else example.path
            out.print(f"      {where}", markup=False)
    if not skip_checks:
        out.print("run `loratui check PATH` for the full report, or pass --skip-checks", markup=False)


def distributed_summary(resolved: ResolvedConfig, processes: Processes) -> str:
    """One line on how the batch is spread over the processes (`batch_size` is per device)."""
    from loratui.train.process.batches import global_batch

    cfg = resolved.config
    total = global_batch(cfg.batch_size, cfg.gradient_accumulation_steps, processes.processes)
    text = (
        f"{processes.describe()}: batch_size {cfg.batch_size} per GPU x {cfg.gradient_accumulation_steps} "
        f"accumulation x {processes.processes} processes = {total} samples per optimizer step; "
        "memory figures are per GPU"
    )
    if processes.num_machines > 1:
        role = "writes the run" if processes.main_node else "only trains; the run is written on machine 0"
        text += f"; this machine {role}"
    return text
