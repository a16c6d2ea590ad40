"""The training worker: `python -m loratui.train.process.worker RUN_DIR [--resume-from CHECKPOINT]`.

Reads the run directory's `launch.json` and its config (`config.yaml` with the live settings of `oom.json`
laid over it: `loratui.runs.config_file.read_run_config`), runs the trainer for the task type, and
records the outcome in `events.jsonl` / `status.json` (with several processes, started by accelerate's
launcher, every rank runs this and only rank 0 writes; see `loratui.train.process.distributed`).

Exit codes: 0 finished (also a rank other than 0 after an agreed stop), 130 stopped, 1 failed (with several
processes, rank 0 after losing a peer leaves a `peer_lost` warning and the supervisor records the end),
2 wrong command-line arguments, 75 (`oom.EXIT_RESTART`) out of memory that only a restart from
the last checkpoint can fix (the supervisor does it, passing `--resume-from`; the lowered settings are already
in oom.json).
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from pathlib import Path

from loratui.runs.config_file import read_run_config
from loratui.runs.events import EventWriter, read_events
from loratui.runs.launch_file import read_launch
from loratui.runs.rundir import RunDir
from loratui.runs.status import RunState, RunStatus
from loratui.train.job import WorkerJob
from loratui.train.loop.signals import StopRequest
from loratui.train.process.launcher import RESUME_FLAG
from loratui.util.disk import NoSpaceLeft


def _record_failure(run: RunDir, message: str, details: str = "") -> None:
    from loratui.train.process.distributed import is_main, rank

    if not is_main():
        print(f"[loratui] rank {rank()}: {message}", file=sys.stderr, flush=True)
        return
    status = run.status() or RunStatus()
    # status.json is written at most once a second: the step events record is the one really reached
    steps = [e["step"] for e in read_events(run.events_path) if e.get("type") == "step"]
    status.step = max([status.step, *(step for step in steps if isinstance(step, int))])
    with contextlib.suppress(OSError), EventWriter(run.events_path) as events:  # a full disk: status still
        events.write("run_failed", status.step or None, error=message, traceback=details)
    status.state, status.message, status.pid = RunState.FAILED.value, message[:500], os.getpid()
    run.write_status(status)


def run_job(job: WorkerJob) -> int:
    """Dispatch to the trainer of the task type; returns the process exit code."""
    from loratui.train.oom.cache import apply_cached_settings
    from loratui.train.oom.errors import EXIT_RESTART, RestartNeeded
    from loratui.train.process.distributed import PeerLost, finish, is_main, rank, world_size
    from loratui.train.process.launcher import RESTART_TAG

    task = job.resolved.config.task_type
    cached = apply_cached_settings(job)
    if cached and is_main():
        with EventWriter(job.run.events_path) as events:
            events.write(
                "warning",
                None,
                message=f"starting from settings that fitted this model on this GPU "
                f"before (OOM cache; --no-oom-cache to turn off): {cached}",
            )
    # Only the family's trainer is imported: an image run never loads the LLM stack, and the other way round.
    if task == "image-generation" and job.resolved.family in ("flux", "chroma"):
        from loratui.train.flux.trainer import train as trainer
    elif task == "image-generation":
        from loratui.train.sd.trainer import train as trainer
    else:
        from loratui.train.llm.trainer import train as trainer
    try:
        state = trainer(job)
    except RestartNeeded as exc:
        print(f"out of memory: {exc}", file=sys.stderr, flush=True)
        if world_size() > 1:  # under the launcher: the supervisor restarts the whole group on this line
            print(f"{RESTART_TAG} {rank()}: {exc}", file=sys.stderr, flush=True)
        return EXIT_RESTART
    except PeerLost as exc:
        # Not final: the peer may have stopped to ask for a restart (then the supervisor restarts the group);
        # otherwise the supervisor records the run's failure with this message.
        if is_main():
            with EventWriter(job.run.events_path) as events:
                events.write(
                    "warning",
                    None,
                    message=_peer_lost_message(job.run, exc),
                    peer_lost=True,
                    traceback=traceback.format_exc(),
                )
        return 1
    finish()  # every rank waits here for rank 0's last save, then the process groups close
    if state == "stopped" and not is_main():
        return 0  # this rank's part ended as agreed; rank 0 records the stop (a non-zero exit would make
        # the launcher tear down rank 0 while it saves)
    return {"finished": 0, "stopped": 130}.get(state, 1)


def _peer_lost_message(run: RunDir, exc: Exception) -> str:
    """The dead-peer failure with what the user can do next."""
    checkpoint = getattr(exc, "checkpoint", None) or run.latest_checkpoint()
    where = f"the last checkpoint is {checkpoint}" if checkpoint else "no checkpoint was saved yet"
    return f"{exc}. The run was stopped; {where}; resume with: loratui train --resume {run.path}"


def _arguments(args: list[str]) -> tuple[Path, Path | None] | None:
    """(run directory, checkpoint to continue from) of `RUN_DIR [--resume-from CHECKPOINT]`, or None."""
    if len(args) == 1:
        return Path(args[0]), None
    if len(args) == 3 and args[1] == RESUME_FLAG:
        return Path(args[0]), Path(args[2])
    return None


def main(argv: list[str] | None = None) -> int:
    parsed = _arguments(list(sys.argv[1:] if argv is None else argv))
    if parsed is None:
        print(
            "usage: python -m loratui.train.process.worker RUN_DIR [--resume-from CHECKPOINT]",
            file=sys.stderr,
        )
        return 2
    run = RunDir(parsed[0])
    # Before anything slow (imports, model load): a SIGTERM/SIGINT from now on is a stop request that the
    # trainer honours at its first step (checkpoint, "stopped"), not the end of the process ("failed").
    early_stop = StopRequest().install()
    from loratui.train.process.distributed import is_main

    if is_main():
        status = run.status() or RunStatus()
        status.pid, status.state = os.getpid(), RunState.RUNNING.value
        run.write_status(status)
    try:
        launch = read_launch(run.path)
        job = WorkerJob(
            run=run,
            resolved=read_run_config(run.path),
            resume_from=parsed[1] or launch.resume_from,
            overwrite=launch.overwrite,
            skip_checks=launch.skip_checks,
        )
        return run_job(job)
    except NoSpaceLeft as exc:  # the message names the device, the path and the space needed
        _record_failure(
            run, f"{exc}; then resume with: loratui train --resume {run.path}", traceback.format_exc()
        )
        print(f"[loratui] {exc}", file=sys.stderr, flush=True)
        return 1
    except Exception as exc:
        _record_failure(run, f"{type(exc).__name__}: {exc}", traceback.format_exc())
        traceback.print_exc()
        return 1
    finally:
        early_stop.restore()


if __name__ == "__main__":
    sys.exit(main())
