"""Start a training worker process for a resolved config and follow it.

The worker runs under a supervisor (`loratui.train.process.supervisor`) in its own session
(`start_new_session=True`), so closing the terminal or the SSH connection does not stop it, and a worker that
runs out of memory beyond in-process recovery (or is killed) is restarted from its last checkpoint. This
process only reads the run directory.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from loratui.config import ResolvedConfig
from loratui.runs.config_file import write_run_config
from loratui.runs.launch_file import LaunchSpec, write_launch
from loratui.runs.rundir import RunDir, create_run_dir
from loratui.runs.status import (
    EXIT_STOPPED,  # noqa: F401  (exit code of a stopped run)
    RunStatus,
)
from loratui.train.process.launcher import Processes


def prepare_run(
    resolved: ResolvedConfig,
    *,
    resume: str | None,
    overwrite: bool,
    skip_checks: bool = False,
    processes: Processes | None = None,
    gpu: str | None = None,
    allow_changed_data: bool = False,
    notes: list[str] | None = None,
) -> tuple[RunDir, Path | None]:
    """Create (or, when resuming, reuse) the run directory and write its resolved config and launch.json
    (`processes`: several training processes through accelerate's launcher; a resumed run may use another
    number of processes than before; `gpu`: the CUDA_VISIBLE_DEVICES value for the worker, None to inherit
    this process's). The only writer of config.yaml and launch.json.

    A resume whose base model or dataset differs from the checkpoint's raises `ChangedInputs` before anything
    is written, unless `allow_changed_data` (then `notes` gets a warning line for each change)."""
    cfg = resolved.config
    runs_dir = Path(cfg.runs_dir)
    name = cfg.run_name or cfg.name
    checkpoint = None
    if resume:
        from loratui.runs.checkpoints import resolve_resume

        run, checkpoint = resolve_resume(resume, runs_dir, name)
        from loratui.train.loop.resume_inputs import check_resume_inputs

        allowed = check_resume_inputs(cfg, checkpoint, allow_changed_data=allow_changed_data)
        if notes is not None:
            notes.extend(allowed)
    if processes is not None and not processes.main_node:
        # Another machine of a multi-node run: the run itself is written on machine 0 (which may share this
        # filesystem); this machine keeps its own directory for its log and launch files, and resumes from
        # the checkpoint where it is.
        run = create_run_dir(runs_dir, f"{name}-machine{processes.machine_rank}")
    elif not resume:
        run = create_run_dir(runs_dir, name)
    if cfg.model_family == "auto" and resolved.family in ("sd15", "sd2", "sdxl", "llm"):
        cfg.model_family = resolved.family
    write_run_config(run.path, resolved)
    launch = LaunchSpec(
        resume_from=checkpoint,
        overwrite=overwrite,
        skip_checks=skip_checks,
        processes=processes.to_json() if processes else None,
        gpu=gpu,
        allow_changed_data=allow_changed_data,
    )
    write_launch(run.path, launch)
    RunStatus(state="starting").write(run.status_path) if not run.status_path.exists() else None
    return run, checkpoint


def start_worker(run: RunDir) -> subprocess.Popen:
    """Spawn the training for `run` detached from this terminal and return that process.

    The process is the supervisor (`python -m loratui.train.process.supervisor RUN_DIR`, in its own session), which
    starts the worker (`python -m loratui.train.process.worker RUN_DIR`) and restarts it from the last checkpoint
    after an unrecoverable out-of-memory error or a kill. Signals sent to it (SIGINT/SIGTERM: checkpoint and
    stop; SIGUSR1: checkpoint) are forwarded to the worker; its exit code is the worker's. status.json's
    `pid` is the worker's own pid while one runs."""
    from loratui.train.process.supervisor import spawn_supervisor

    return spawn_supervisor(run)
