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
from loratui.runs.lock import HeldLock, acquire, note, output_lock_path, run_lock_path
from loratui.runs.rundir import RunDir, create_run_dir
from loratui.runs.status import (
    EXIT_STOPPED,  # noqa: F401  (exit code of a stopped run)
    RunStatus,
)
from loratui.train.process.launcher import Processes
from loratui.train.process.preflight import check_outputs

# Locks taken by `prepare_run` in this process, until `start_worker` hands them to the run's supervisor.
_HELD: dict[Path, list[HeldLock]] = {}


def _output_target(cfg) -> Path:
    """What the run exports: an image LoRA file inside output_dir, or a text LoRA's output_dir folder."""
    out = Path(cfg.output_dir).expanduser()
    return out / f"{cfg.name}.safetensors" if cfg.task_type == "image-generation" else out


def _take(path: Path, run: Path | None, refusal: str) -> HeldLock | None:
    for key, locks in list(_HELD.items()):  # this process's own earlier run that never started: let go
        for lock in [lock for lock in locks if lock.path == path]:
            lock.release()
            locks.remove(lock)
        if not locks:
            _HELD.pop(key)
    return acquire(path, run=run, refusal=refusal)


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
    is written, unless `allow_changed_data` (then `notes` gets a warning line for each change).
    Before anything is written: the run directory and the output must be writable (`OutputProblem`), and
    neither may be in use by another run (`LockHeld`, naming it); the locks taken here pass to the run's
    supervisor in `start_worker`.
    """
    cfg = resolved.config
    runs_dir = Path(cfg.runs_dir)
    name = cfg.run_name or cfg.name
    checkpoint = None
    exports = processes is None or processes.main_node
    if resume:
        from loratui.runs.checkpoints import resolve_resume

        like = {"base_model": cfg.base_model, "train_data_dir": cfg.train_data_dir}
        run, checkpoint = resolve_resume(resume, runs_dir, name, like=like)
        from loratui.train.loop.resume_inputs import check_resume_inputs

        allowed = check_resume_inputs(cfg, checkpoint, allow_changed_data=allow_changed_data)
        if notes is not None:
            notes.extend(allowed)
    locks: list[HeldLock | None] = []
    try:
        if resume and exports:
            locks.append(
                _take(
                    run_lock_path(run.path),
                    run.path,
                    f"run {run.name} is still running (pid {{pid}}); follow it with `loratui attach {run.name}` "
                    f"or stop it with `loratui stop {run.name}` before resuming it",
                )
            )
        check_outputs(resolved, run_path=run.path if resume and exports else None, output=exports)
        target = _output_target(cfg)
        if exports:
            shown = target.parent if cfg.task_type == "image-generation" else target
            locks.append(
                _take(
                    output_lock_path(target),
                    run.path if resume else None,
                    f"output_dir {shown} is in use by {{holder}}: two runs would replace each other's LoRA "
                    "there. Wait for that run to end (or stop it with `loratui stop {name}`), or choose another "
                    "output_dir",
                )
            )
        if processes is not None and not processes.main_node:
            # Another machine of a multi-node run: the run itself is written on machine 0 (which may share this
            # filesystem); this machine keeps its own directory for its log and launch files, and resumes from
            # the checkpoint where it is.
            run = create_run_dir(runs_dir, f"{name}-machine{processes.machine_rank}")
        elif not resume:
            run = create_run_dir(runs_dir, name)
            locks.append(acquire(run_lock_path(run.path), run=run.path))
        for lock in locks:
            if lock is not None:
                note(lock.fd, run.path)
    except BaseException:
        for lock in locks:
            if lock is not None:
                lock.release()
        raise
    _HELD.setdefault(run.path, []).extend(lock for lock in locks if lock is not None)
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


def release_locks(run: RunDir) -> None:
    """Let go of the locks `prepare_run` took for `run` when no supervisor will take them over (the run is
    trained in this process, or not at all)."""
    for lock in _HELD.pop(run.path, []):
        lock.release()


def start_worker(run: RunDir) -> subprocess.Popen:
    """Spawn the training for `run` detached from this terminal and return that process.

    The process is the supervisor (`python -m loratui.train.process.supervisor RUN_DIR`, in its own session), which
    starts the worker (`python -m loratui.train.process.worker RUN_DIR`) and restarts it from the last checkpoint
    after an unrecoverable out-of-memory error or a kill. Signals sent to it (SIGINT/SIGTERM: checkpoint and
    stop; SIGUSR1: checkpoint) are forwarded to the worker; its exit code is the worker's. status.json's
    `pid` is the worker's own pid while one runs."""
    from loratui.train.process.supervisor import spawn_supervisor

    locks = _HELD.pop(run.path, [])
    try:
        return spawn_supervisor(run, locks={lock.fd: lock.path for lock in locks})
    finally:  # the supervisor holds them now (or, when it could not start, nobody)
        for lock in locks:
            lock.release()
