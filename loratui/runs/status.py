"""`status.json`: the worker's current state, replaced atomically on every update."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

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
        self.updated_at = time.time()
        atomic_write_text(path, json.dumps(asdict(self), indent=1))

    @classmethod
    def read(cls, path: Path) -> RunStatus | None:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def pid_alive(pid: int | None) -> bool:
    """True when a process with this pid exists (and is not a zombie we can see)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def effective_state(status: RunStatus | None) -> tuple[str, str]:
    """(state, note): a run that says running but whose worker is gone is reported failed."""
    if status is None:
        return RunState.FAILED.value, "no status.json"
    if status.state in (RunState.RUNNING.value, RunState.STARTING.value) and not pid_alive(status.pid):
        return RunState.FAILED.value, "worker exited without finishing"
    return status.state, status.message
