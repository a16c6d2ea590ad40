"""Locks that keep two runs from writing the same output, or the same run directory, at once.

A lock is an `fcntl.flock` on a small file, so it dies with the processes that hold it: a crashed or killed
run never leaves a stale lock. `loratui train` takes the locks before it creates anything
(`acquire_run_locks`), hands them to the supervisor it starts (the open descriptors are inherited, listed in
`LOCK_FDS_ENV`), and the supervisor passes them on to every worker; the lock is held until the last of them
exits. The file holds who holds it (run directory, pid, pid start time), to name the holder in the refusal.

Lock files:
    runs/<run>/run.lock                      the run directory (a second `--resume` of a running run)
    <output_dir>/.<name>.safetensors.lock    an image LoRA file (inside output_dir)
    <parent>/.<output_dir name>.lock         a text LoRA folder (inside output_dir when its parent is read-only)
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from loratui.runs.liveness import process_start_time

try:
    import fcntl
except ImportError:  # not POSIX: no locking
    fcntl = None  # type: ignore[assignment]

LOCK_FDS_ENV = "LORATUI_LOCK_FDS"
RUN_LOCK_FILE = "run.lock"
NOTE_SIZE = 4096


class LockHeld(RuntimeError):
    """Another run holds the lock; the message names it and what to do."""


@dataclass
class HeldLock:
    """A lock this process holds: the lock file and its open descriptor."""

    path: Path
    fd: int

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def run_lock_path(run_path: Path) -> Path:
    return Path(run_path) / RUN_LOCK_FILE


def output_lock_path(target: Path) -> Path:
    """The lock file of an output (a file or folder): a hidden sibling, or inside the folder when its parent
    cannot be written (a mount point's parent)."""
    target = Path(os.path.realpath(Path(target).expanduser()))
    sibling = target.parent / f".{target.name}.lock"
    if target.is_dir() and not os.access(target.parent, os.W_OK):
        return target / ".loratui.lock"
    return sibling


def holder(path: Path, *, wait_s: float = 2.0) -> dict:
    """What the lock file says about who holds it ({} when unreadable). The holder writes its run a moment
    after it took the lock: wait up to `wait_s` for it."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8").strip() or "{}")
        except (OSError, ValueError):
            data = {}
        data = data if isinstance(data, dict) else {}
        if data.get("run") or time.monotonic() >= deadline:
            return data
        time.sleep(0.05)


def describe_holder(path: Path) -> dict[str, str]:
    """{holder: 'run NAME (PATH, pid N)', name: NAME, pid: N} of the lock file's holder, as far as it tells."""
    info = holder(path)
    run, pid = info.get("run"), info.get("pid")
    name = Path(run).name if run else "RUN"
    who = f"run {name} ({run}" if run else "another run (starting"
    who += f", pid {pid})" if isinstance(pid, int) else ")"
    return {"holder": who, "name": name, "pid": str(pid)}


def acquire(path: Path, *, run: Path | None, refusal: str = "{holder} holds {path}") -> HeldLock | None:
    """Lock `path` (created when missing) without waiting, recording `run` as its holder. Raises `LockHeld`
    when another process has it, with `refusal` formatted with `describe_holder`'s keys and `path`; None where
    locking is not available."""
    if fcntl is None:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockHeld(refusal.format(path=path, **describe_holder(path))) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file its last holder removed while this process waited to open it
            break
        os.close(fd)
    note(fd, run)
    return HeldLock(path, fd)


def note(fd: int, run: Path | None) -> None:
    """Record `run` and this process in the lock file open as `fd` (the holder named to a refused run)."""
    info = {
        "run": str(run) if run else None,
        "pid": os.getpid(),
        "pid_started": process_start_time(os.getpid()),
    }
    text = json.dumps(info).encode("utf-8")
    with contextlib.suppress(OSError):  # one write of a fixed size (JSON padded with spaces): never seen half
        os.pwrite(fd, text.ljust(max(NOTE_SIZE, len(text))), 0)


def inherited() -> dict[int, Path]:
    """The lock descriptors (and their files) a supervisor or worker got from the process that started it."""
    try:
        listed = json.loads(os.environ.get(LOCK_FDS_ENV) or "{}")
    except ValueError:
        return {}
    found = {}
    for fd, path in listed.items() if isinstance(listed, dict) else []:
        with contextlib.suppress(ValueError, OSError):
            os.fstat(int(fd))
            found[int(fd)] = Path(path)
    return found


def child_env(locks: dict[int, Path], env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) naming `locks` (descriptor: lock file) as the locks a child inherits."""
    env = dict(os.environ if env is None else env)
    if locks:
        env[LOCK_FDS_ENV] = json.dumps({str(fd): str(path) for fd, path in locks.items()})
    else:
        env.pop(LOCK_FDS_ENV, None)
    return env


def remove_inherited(locks: dict[int, Path]) -> None:
    """At the end of the run: remove the lock files while still holding them, then let go (a run that opened
    a removed file in the meantime sees that and opens a fresh one: see `acquire`)."""
    for fd, path in locks.items():
        with contextlib.suppress(OSError):
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                path.unlink()
        with contextlib.suppress(OSError):
            os.close(fd)
