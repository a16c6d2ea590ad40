"""`status.json`: the worker's current state, replaced atomically on every update.

`pid` is the process that wrote it last (the worker while one runs, else the supervisor) and `pid_started`
that process's start time (see `loratui.runs.liveness`), so a pid reused by another process reads as not
running. The supervisor adds `supervisor_pid` and `supervisor_started` to `extra`.
"""

from __future__ import annotations

import errno
import json
import os
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from loratui.runs.liveness import pid_alive, process_start_time
from loratui.util.atomic import atomic_write_text

EXIT_STOPPED = 130  # exit code of a run stopped on request (checkpoint written), as for SIGINT


class RunState(str, Enum):
    """Lifecycle of a run."""

    STARTING = "starting"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass
class RunStatus:
    """What `status.json` holds."""

    state: str = RunState.STARTING.value
    pid: int | None = None
    pid_started: str | None = None
    step: int = 0
    total_steps: int | None = None
    epoch: int = 0
    message: str = ""
    started_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def progress(self) -> float | None:
        """Fraction done (0..1), or None when the total is unknown."""
        if not self.total_steps:
            return None
        return min(1.0, self.step / self.total_steps)

    def write(self, path: Path) -> None:
        """Replace `path` atomically. A `pid` of this very process gets its start time recorded with it."""
        self.updated_at = time.time()
        if self.pid == os.getpid():
            self.pid_started = process_start_time(self.pid)
        text = json.dumps(asdict(self), indent=1)
        try:
            atomic_write_text(path, text)
        except OSError as exc:
            # A full disk has no room for the second copy an atomic replace needs: rewrite the file in place,
            # so that status.json still tells the step reached and why the run ended.
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or not Path(path).is_file():
                raise
            with open(path, "r+", encoding="utf-8") as handle:
                handle.truncate(0)
                handle.write(text)

    @classmethod
    def read(cls, path: Path) -> RunStatus | None:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def worker_alive(status: RunStatus) -> bool:
    """The process `status` names is alive and is the one that wrote it (same start time)."""
    return pid_alive(status.pid, status.pid_started)


def supervisor_of(status: RunStatus) -> tuple[int | None, str | None]:
    """(pid, start time) of the run's supervisor, as recorded in `extra` (None, None without one)."""
    extra = status.extra if isinstance(status.extra, dict) else {}
    pid = extra.get("supervisor_pid")
    started = extra.get("supervisor_started")
    return (pid if isinstance(pid, int) else None), (started if isinstance(started, str) else None)


def mark_supervised(status: RunStatus) -> None:
    """Record this process as the run's supervisor (pid and start time)."""
    status.extra["supervisor_pid"] = os.getpid()
    status.extra["supervisor_started"] = process_start_time(os.getpid())


def effective_state(status: RunStatus | None) -> tuple[str, str]:
    """(state, note): a run that says running but whose worker is gone is reported failed."""
    if status is None:
        return RunState.FAILED.value, "no status.json"
    if status.state in (RunState.RUNNING.value, RunState.STARTING.value) and not worker_alive(status):
        return RunState.FAILED.value, "worker exited without finishing"
    return status.state, status.message
