"""Whether the process a run directory names is still that process: a pid plus its start time.

A bare pid is not enough: after a crash or a reboot the number is handed to another process, and a dead run
would read as running forever. `status.json` therefore records the pid's start time next to it; a pid whose
process started at another time is someone else.

The start time comes from `/proc/PID/stat` (field 22, clock ticks since boot, qualified by the boot id), else
from psutil when it is installed, else from `ps -o lstart=`. Where none of these answers, the pid alone
decides, as before.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def _proc_stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (the name may hold spaces and parentheses)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return text.rsplit(")", 1)[-1].split()


def _boot_id() -> str:
    try:
        return _BOOT_ID.read_text(encoding="utf-8").strip()
    except OSError:
        return "boot"


def _from_proc(pid: int) -> str | None:
    fields = _proc_stat_fields(pid)
    if not fields or len(fields) < 20:
        return None
    return f"{_boot_id()}:{fields[19]}"  # field 22 of the whole line: starttime in clock ticks since boot


def _from_psutil(pid: int) -> str | None:
    try:
        import psutil  # optional: not a dependency of loratui
    except ImportError:
        return None
    try:
        return f"psutil:{psutil.Process(pid).create_time():.3f}"
    except Exception:
        return None


def _from_ps(pid: int) -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["ps", "-o", "lstart=", "-p", str(pid)], capture_output=True, text=True, timeout=5, check=False
        )
        text = done.stdout.strip()
        if done.returncode == 0 and text:
            return f"ps:{text}"
    return None


def process_start_time(pid: int | None) -> str | None:
    """An opaque token for when process `pid` started (None when the process is gone or it cannot be told).
    Two tokens are equal exactly when they name the same process."""
    if not pid or pid < 0:
        return None
    if Path("/proc/self/stat").exists():
        return _from_proc(pid)
    return _from_psutil(pid) or _from_ps(pid)


def _is_zombie(pid: int) -> bool:
    fields = _proc_stat_fields(pid)
    return bool(fields) and fields[0] == "Z"


def pid_alive(pid: int | None, started: str | None = None) -> bool:
    """True when process `pid` exists, is not a zombie, and (when `started` is given and the start time can
    be read) is the process that started at `started`."""
    if not pid or pid < 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    except OSError:
        return False
    if _is_zombie(pid):
        return False
    if started is None:
        return True
    now = process_start_time(pid)
    return now is None or now == started
