"""The supervisor: `python -m loratui.train.process.supervisor RUN_DIR` starts the training worker and restarts it.

`loratui train` (and the TUI) start this process in its own session; it starts the worker
(`python -m loratui.train.process.worker RUN_DIR`) and waits for it. When the worker could not recover from an
out-of-memory error in-process (exit code `EXIT_RESTART`: memory not released, a sticky CUDA error, an update
that was partly applied) or was killed (SIGKILL - also what the kernel's OOM killer sends - SIGSEGV, SIGBUS,
SIGABRT), the worker is started again from the run's last checkpoint (`--resume-from`) with the live settings
recorded in the run directory's oom.json (the worker records the lowered settings there), at most
`oom_max_restarts` times. A worker killed twice at the same step without progress gets the next rung of the
OOM ladder first. launch.json's `gpu` (the GPU picked in the TUI) becomes the worker's CUDA_VISIBLE_DEVICES.

With several training processes (launch.json's `processes`, from `loratui train --gpus/--cpu-processes/
--accelerate-config`) the child is accelerate's launcher, which starts one worker per device and stops them
all when one dies. Rank 0 records the run's end (a lost peer: `run_failed` naming the dead rank, with a
checkpoint of the last completed step); when no worker could, the launcher's report in worker.log names the
rank that failed first. Only a worker asking for a restart after running out of memory is restarted then.

A deliberate stop is never restarted: SIGINT/SIGTERM/SIGUSR1 sent to the supervisor are forwarded to the
worker (which checkpoints and exits with 130); a worker that finished, stopped or failed with an ordinary
error is not restarted either. The exit code is the worker's (0 finished, 130 stopped, 1 failed, 2 not
available).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from loratui.config import ResolvedConfig
from loratui.runs.config_file import read_run_config
from loratui.runs.events import EventReader, EventWriter
from loratui.runs.launch_file import read_launch_or_default
from loratui.runs.lock import child_env, inherited, note, remove_inherited
from loratui.runs.rundir import RunDir
from loratui.runs.status import EXIT_STOPPED, RunState, RunStatus, mark_supervised, pid_alive
from loratui.train.oom.errors import EXIT_RESTART
from loratui.train.process.launcher import (
    Processes,
    describe_exit,
    launcher_command,
    launcher_root_cause,
    restart_request,
)

RESTART_SIGNALS = {signal.SIGKILL, signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT}
FINAL = {"run_finished": 0, "run_stopped": EXIT_STOPPED, "run_failed": 1}


def spawn_supervisor(run: RunDir, locks: dict[int, Path] | None = None) -> subprocess.Popen:
    """Start `python -m loratui.train.process.supervisor RUN_DIR` in its own session (survives the terminal);
    output goes to the run's worker.log. `locks` (descriptor: lock file, `loratui.runs.lock`) are inherited:
    the supervisor and its workers hold them for the run's life."""
    log = (run.path / "worker.log").open("ab")
    env = child_env(locks or {})
    env.setdefault("PYTHONUNBUFFERED", "1")
    return subprocess.Popen(
        [sys.executable, "-m", "loratui.train.process.supervisor", str(run.path)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=env,
        pass_fds=tuple(locks or ()),
    )


class Supervisor:
    """Runs workers for one run directory until one finishes, stops, fails for good, or restarts run out."""

    def __init__(self, run: RunDir, *, poll_s: float = 0.2) -> None:
        self.run = run
        self.poll_s = poll_s
        self.child: subprocess.Popen | None = None
        self.stop_signal: str | None = None
        self.restarts = 0
        self._last_death_step: int | None = None
        self.launch = read_launch_or_default(run.path)
        self.spec = Processes.from_json(self.launch.processes)
        # Set by a restart: the checkpoint the next worker continues from (launch.json's when None).
        self.resume_from: Path | None = None
        self._log_start = 0  # where the current attempt's output begins in worker.log
        self._peer_lost: list[dict[str, Any]] = []  # rank 0's lost-peer warnings of the current attempt

    @property
    def _log_path(self) -> Path:
        return self.run.path / "worker.log"

    def _log_size(self) -> int:
        try:
            return self._log_path.stat().st_size
        except OSError:
            return 0

    # --- signals ---------------------------------------------------------------------------------------

    def install(self) -> Supervisor:
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGUSR1, self._forward)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        return self

    def _on_stop(self, signum: int, _frame: object) -> None:
        self.stop_signal = signal.Signals(signum).name
        self._forward(signum, _frame)

    def _forward(self, signum: int, _frame: object) -> None:
        child = self.child
        if child is None or child.returncode is not None:
            return
        target = child.pid
        if self.spec.launcher:
            # Rank 0 alone: it shares the stop with the others in the next step's exchange, so every rank
            # stops after the same step and rank 0 saves. Signalled, the launcher would stop the workers itself
            # (and kill them 30 s later, mid-save); SIGUSR1 would kill it. Before rank 0 has started, a stop
            # goes to the launcher.
            status = self.run.status() or RunStatus()
            rank0 = status.pid
            if rank0 and rank0 != os.getpid() and pid_alive(rank0, status.pid_started):
                target = rank0
            elif signum == signal.SIGUSR1:
                return
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signum)

    # --- the loop ------------------------------------------------------------------------------------------

    def start_worker(self) -> subprocess.Popen:
        """The worker (or accelerate's launcher with one worker per device), in this process's session (its
        output goes where ours goes)."""
        argv, env = launcher_command(
            self.run.path, self.spec, gpu=self.launch.gpu, resume_from=self.resume_from
        )
        if self.spec.launcher:
            print(f"[loratui] starting {self.spec.describe()}: {' '.join(argv)}", flush=True)
        locks = inherited()  # a worker outliving a killed supervisor still holds the run's locks
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, env=child_env(locks, env), pass_fds=tuple(locks)
        )

    def supervise(self) -> int:
        """Run the worker (again) until the run ends; returns the exit code."""
        status = self.run.status() or RunStatus()
        mark_supervised(status)
        status.pid = os.getpid()  # until the worker writes its own
        self.run.write_status(status)
        while True:
            reader = EventReader(self.run.events_path)
            reader.poll()  # events of earlier workers are history
            if self.stop_signal:
                return self._stopped_between_workers()
            self._log_start = self._log_size()
            self.child = self.start_worker()
            code = self.child.wait()
            attempt = reader.poll()
            self._peer_lost = [e for e in attempt if e.get("type") == "warning" and e.get("peer_lost")]
            final = [e["type"] for e in attempt if e.get("type") in FINAL]
            if final:  # the launcher's own exit code says only that some worker failed
                return code if code >= 0 and not self.spec.launcher else FINAL[final[-1]]
            if self.spec.launcher and not self.spec.main_node:
                return self._node_ended(code)
            if code in (0, EXIT_STOPPED, 2) or self.stop_signal:
                return self._ended_without_event(code)
            reason = self._restart_reason(code)
            if reason is None and self.spec.launcher:
                return self._fail_ranks(code)
            if reason is None:
                return self._ended_without_event(code)
            limit = self._max_restarts()
            if self.restarts >= limit:
                self._fail(
                    f"the worker ended ({reason}) and {limit} restart(s) are used up; "
                    f"resume later with: loratui train --resume {self.run.path}"
                )
                return 1
            self.restarts += 1
            self._prepare_restart(code, reason)

    def _restart_reason(self, code: int) -> str | None:
        if self.spec.launcher:  # the exit code is the launcher's; what the workers said is in the log
            if self.spec.num_machines > 1:
                return (
                    None  # the other machines' launchers have ended too: the group cannot be restarted here
                )
            asked = restart_request(self._log_path, self._log_start)
            if asked:
                return f"rank {asked[0]}: in-process out-of-memory recovery was not possible"
            cause = launcher_root_cause(self._log_path, self._log_start)
            if cause and cause[1] == EXIT_RESTART:
                return f"rank {cause[0]}: in-process out-of-memory recovery was not possible"
            return None
        if code == EXIT_RESTART:
            return "in-process out-of-memory recovery was not possible"
        if code < 0 and -code in {int(s) for s in RESTART_SIGNALS}:
            return f"killed by {describe_exit(code)}"
        return None

    def _config(self) -> ResolvedConfig:
        """The run's config with the live settings of oom.json: what the next worker trains with."""
        return read_run_config(self.run.path)

    def _max_restarts(self) -> int:
        try:
            cfg = self._config().config
        except Exception:
            return 0
        return cfg.oom_max_restarts if cfg.oom_recovery else 0

    def _prepare_restart(self, code: int, reason: str) -> None:
        """Continue from the last checkpoint (or launch.json's start when there is none yet); lower the
        settings when the worker keeps dying."""
        from loratui.runs.checkpoints import newest_intact

        checkpoint = newest_intact(self.run) or self.run.latest_checkpoint()  # damaged: the worker says so
        self.resume_from = checkpoint or self.launch.resume_from
        status = self.run.status() or RunStatus()
        lowered = ""
        if code < 0:
            if self._last_death_step == status.step:
                lowered = self._lower_one_rung(status.step)
            self._last_death_step = status.step
        where = f"checkpoint {checkpoint.name}" if checkpoint else "the start (no checkpoint yet)"
        message = (
            f"worker {reason} at step {status.step}; restarting from {where}{lowered} "
            f"(restart {self.restarts}/{self._max_restarts()})"
        )
        with EventWriter(self.run.events_path) as events:
            events.write(
                "warning",
                status.step,
                message=message,
                restart=self.restarts,
                reason=reason,
                resume_from=str(checkpoint) if checkpoint else None,
            )
        status.state, status.pid, status.message = (
            RunState.RUNNING.value,
            os.getpid(),
            "restarting the worker",
        )
        self.run.write_status(status)
        print(f"[loratui] {message}", flush=True)

    def _trained_off_gpu(self) -> bool:
        """Whether the run's worker reported a device other than CUDA (activation offload does nothing there)."""
        from loratui.runs.events import read_events

        try:
            started = [e for e in read_events(self.run.events_path) if e.get("type") == "run_started"]
        except (OSError, ValueError):
            return False
        return bool(started) and not str(started[-1].get("device", "cuda")).startswith("cuda")

    def _lower_one_rung(self, step: int) -> str:
        """The next OOM-ladder rung recorded in oom.json for the next worker (this one died twice at the same
        step)."""
        from loratui.train.oom.ladder import OomLadder, describe_change, kind_of, settings_of
        from loratui.train.oom.record import apply_settings, note_settings, read_record

        try:
            resolved = self._config()
        except Exception:
            return ""
        kind = kind_of(resolved.family)
        old = settings_of(resolved.config, kind)
        record = read_record(self.run.path)
        ladder = OomLadder(
            kind,
            record.get("original") or old,
            allow_quality=resolved.config.oom_allow_quality_reduction,
            unavailable={"optimizer_8bit"} | ({"activation_offload"} if self._trained_off_gpu() else set()),
        )
        rung = ladder.next_rung(old)
        if rung is None:
            return ""
        apply_settings(resolved, rung.changes)
        new = settings_of(resolved.config, kind)
        note_settings(
            self.run.path,
            original=record.get("original") or old,
            current=new,
            restarts_lowered=[{"step": step, "rung": rung.name, "old": old, "new": new}],
        )
        with EventWriter(self.run.events_path) as events:
            events.write(
                "oom",
                step,
                error="worker killed twice at the same step",
                memory={},
                old=old,
                new=new,
                rung=rung.name,
                label=rung.label,
                quality_reduced=rung.quality,
                restart="supervisor",
            )
        return f" with {describe_change(old, new)}"

    # --- endings -----------------------------------------------------------------------------------------

    def _fail_ranks(self, code: int) -> int:
        """Several processes ended without a final event: name the rank that failed first."""
        if self._peer_lost:  # rank 0 saw a peer stop and said what it saved
            self._fail(str(self._peer_lost[-1].get("message")))
            return 1
        cause = launcher_root_cause(self._log_path, self._log_start)
        launcher_exit = describe_exit(code)
        checkpoint = self.run.latest_checkpoint()
        who = (
            f"training process rank {cause[0]} ended first ({describe_exit(cause[1])})"
            if cause
            else f"the training processes ended (launcher {launcher_exit})"
        )
        where = f"the last checkpoint is {checkpoint}" if checkpoint else "no checkpoint was saved yet"
        self._fail(
            f"{who}; the other processes were stopped. {where}; see {self.run.path / 'worker.log'}; "
            f"resume with: loratui train --resume {self.run.path}"
        )
        return 1

    def _node_ended(self, code: int) -> int:
        """A machine other than the main one: its processes ended; the run itself is written on machine 0."""
        with EventWriter(self.run.events_path) as events:
            if code == 0:
                events.write(
                    "run_finished",
                    None,
                    note="this machine's training processes finished; the run "
                    "(events, checkpoints, export) is written on the main machine (machine_rank 0)",
                )
            else:
                events.write(
                    "run_failed",
                    None,
                    error=f"this machine's training processes ended with exit code "
                    f"{code}; see {self.run.path / 'worker.log'} and the run on the main machine",
                )
        status = self.run.status() or RunStatus()
        status.state = RunState.FINISHED.value if code == 0 else RunState.FAILED.value
        self.run.write_status(status)
        return 0 if code == 0 else 1

    def _ended_without_event(self, code: int) -> int:
        """The worker ended without writing a final event (killed by a stop signal, crashed early)."""
        if self.stop_signal:
            return self._stopped_between_workers()
        if code == 0:
            return 0
        what = describe_exit(code)
        self._fail(f"the worker ended ({what}) without recording why; see {self.run.path / 'worker.log'}")
        return 1 if code < 0 else code

    def _stopped_between_workers(self) -> int:
        with EventWriter(self.run.events_path) as events:
            events.write(
                "run_stopped",
                (self.run.status() or RunStatus()).step,
                reason=self.stop_signal,
                checkpoint=str(self.run.latest_checkpoint() or ""),
            )
        status = self.run.status() or RunStatus()
        status.state, status.message = RunState.STOPPED.value, f"stopped ({self.stop_signal})"
        self.run.write_status(status)
        return EXIT_STOPPED

    def _fail(self, message: str) -> None:
        with EventWriter(self.run.events_path) as events:
            events.write("run_failed", (self.run.status() or RunStatus()).step, error=message)
        status = self.run.status() or RunStatus()
        status.state, status.message, status.pid = RunState.FAILED.value, message[:500], os.getpid()
        self.run.write_status(status)
        print(f"[loratui] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m loratui.train.process.supervisor RUN_DIR", file=sys.stderr)
        return 2
    run = RunDir(Path(args[0]))
    locks = inherited()
    for fd in locks:
        note(fd, run.path)  # the holder named to a refused run is this process now
    try:
        return Supervisor(run).install().supervise()
    finally:
        remove_inherited(locks)


if __name__ == "__main__":
    sys.exit(main())
