"""Start a training worker process for a resolved config and follow it.

The worker runs under a supervisor (`loratui.train.supervisor`) in its own session
(`start_new_session=True`), so closing the terminal or the SSH connection does not stop it, and a worker that
runs out of memory beyond in-process recovery (or is killed) is restarted from its last checkpoint. This
process only reads the run directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from loratui.config import ResolvedConfig
from loratui.runs.events import EventReader
from loratui.runs.follow import FINAL_EVENTS, format_event
from loratui.runs.rundir import RunDir, create_run_dir
from loratui.runs.status import RunStatus, pid_alive
from loratui.train.launcher import Processes

EXIT_STOPPED = 130


def prepare_run(
    resolved: ResolvedConfig,
    *,
    resume: str | None,
    overwrite: bool,
    skip_checks: bool = False,
    processes: Processes | None = None,
) -> tuple[RunDir, Path | None]:
    """Create (or, when resuming, reuse) the run directory and write its resolved config and launch.json
    (`processes`: several training processes through accelerate's launcher; a resumed run may use another
    number of processes than before)."""
    cfg = resolved.config
    runs_dir = Path(cfg.runs_dir)
    name = cfg.run_name or cfg.name
    checkpoint = None
    if resume:
        from loratui.train.checkpointing import resolve_resume

        run, checkpoint = resolve_resume(resume, runs_dir, name)
    if processes is not None and not processes.main_node:
        # Another machine of a multi-node run: the run itself is written on machine 0 (which may share this
        # filesystem); this machine keeps its own directory for its log and launch files, and resumes from
        # the checkpoint where it is.
        run = create_run_dir(runs_dir, f"{name}-machine{processes.machine_rank}")
    elif not resume:
        run = create_run_dir(runs_dir, name)
    if cfg.model_family == "auto" and resolved.family in ("sd15", "sd2", "sdxl", "llm"):
        cfg.model_family = resolved.family
    run.write_config(resolved.to_yaml())
    launch = {
        "resume_from": str(checkpoint) if checkpoint else None,
        "overwrite": overwrite,
        "skip_checks": skip_checks,
        "processes": processes.to_json() if processes else None,
    }
    (run.path / "launch.json").write_text(json.dumps(launch, indent=1), encoding="utf-8")
    RunStatus(state="starting").write(run.status_path) if not run.status_path.exists() else None
    return run, checkpoint


def start_worker(run: RunDir) -> subprocess.Popen:
    """Spawn the training for `run` detached from this terminal and return that process.

    The process is the supervisor (`python -m loratui.train.supervisor RUN_DIR`, in its own session), which
    starts the worker (`python -m loratui.train.worker RUN_DIR`) and restarts it from the last checkpoint
    after an unrecoverable out-of-memory error or a kill. Signals sent to it (SIGINT/SIGTERM: checkpoint and
    stop; SIGUSR1: checkpoint) are forwarded to the worker; its exit code is the worker's. status.json's
    `pid` is the worker's own pid while one runs."""
    from loratui.train.supervisor import spawn_supervisor

    return spawn_supervisor(run)


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
    if final == "run_finished":
        return 0
    if final == "run_stopped":
        return EXIT_STOPPED
    log = run.path / "worker.log"
    out.print(f"training did not finish; see {log}", markup=False)
    return 1


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
) -> int:
    """Check, prepare the run directory, start the worker(s), and follow the run (or detach)."""
    from loratui.train.preflight import run_preflight

    if not run_preflight(resolved, skip_checks=skip_checks, out=out):
        return 1
    try:
        run, checkpoint = prepare_run(
            resolved, resume=resume, overwrite=overwrite, skip_checks=skip_checks, processes=processes
        )
    except FileNotFoundError as exc:
        out.print(f"error: {exc}", markup=False)
        return 1
    if checkpoint:
        out.print(f"resuming from {checkpoint}", markup=False)
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


def distributed_summary(resolved: ResolvedConfig, processes: Processes) -> str:
    """One line on how the batch is spread over the processes (`batch_size` is per device)."""
    from loratui.train.distributed import global_batch

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
