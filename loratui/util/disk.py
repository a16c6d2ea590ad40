"""Disk space: which device a path lives on, how much is free, and a clear error when a write runs out of it.

A write that fills the disk fails deep inside torch or safetensors (`OSError: [Errno 28]`, or torch's
`RuntimeError: [enforce fail at inline_container.cc:...]`); `no_space_guard` turns either into `NoSpaceLeft`,
whose message names the device, the path and how much the write needed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loratui.util.sizes import format_bytes

_MOUNTS = Path("/proc/self/mounts")


class NoSpaceLeft(OSError):
    """A write failed because its filesystem is full; the message says where and how much was needed."""

    def __init__(self, message: str, *, path: Path, needed: int | None = None) -> None:
        super().__init__(errno.ENOSPC, message)
        self.message = message
        self.path = Path(path)
        self.needed = needed

    def __str__(self) -> str:
        return self.message


def _existing(path: Path) -> Path:
    """`path` or its nearest existing ancestor (free space is asked of a folder that exists)."""
    path = Path(path).absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def device_of(path: Path) -> str:
    """The device (as /proc/self/mounts names it, e.g. /dev/sda1) holding `path`, else its mount point."""
    target = os.path.realpath(_existing(path))
    best, device = "", ""
    with contextlib.suppress(OSError):
        for line in _MOUNTS.read_text(encoding="utf-8", errors="replace").splitlines():
            fields = line.split()
            if len(fields) < 2:
                continue
            mount = fields[1].replace("\\040", " ")
            inside = target == mount or target.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) > len(best):
                best, device = mount, fields[0]
    if device.startswith("/"):
        return device
    return f"{device} at {best}" if device and best else best or "device"


def free_bytes(path: Path) -> int | None:
    """Free bytes on the filesystem of `path` (or of its nearest existing ancestor); None when unknown."""
    try:
        return int(shutil.disk_usage(_existing(path)).free)
    except OSError:
        return None


def tensor_bytes(value: Any) -> int:
    """Bytes of every tensor in a nested dict/list/tuple (what a checkpoint of it holds, about)."""
    if hasattr(value, "element_size") and hasattr(value, "numel"):
        return int(value.element_size() * value.numel())
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def is_no_space(exc: BaseException, folder: Path, needed: int | None = None) -> bool:
    """Whether `exc` is a write that ran out of space: ENOSPC/EDQUOT, or torch's own write failure (which
    carries no errno) while the filesystem has less than `needed` bytes free."""
    if isinstance(exc, NoSpaceLeft):
        return False  # already explained
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    if "No space left on device" in text:
        return True
    if isinstance(exc, RuntimeError) and ("inline_container" in text or "file write failed" in text):
        free = free_bytes(folder)
        return free is not None and (needed is None or free < needed)
    return False


def no_space_message(path: Path, what: str, needed: int | None, parts: str = "") -> str:
    """ "no space left on DEVICE (PATH): WHAT needs about N (...), M free; ..."."""
    free = free_bytes(path)
    need = f"; {what} needs about {format_bytes(needed)}{f' ({parts})' if parts else ''}" if needed else ""
    have = f", {format_bytes(free)} free" if free is not None else ""
    return (
        f"no space left on {device_of(path)} ({path}){need}{have}; free some space there (or use another "
        "runs_dir/output_dir, or a smaller keep_last_n)"
    )


@contextlib.contextmanager
def no_space_guard(path: Path, *, what: str, needed: int | None = None, parts: str = "") -> Iterator[None]:
    """Re-raise a write inside the block that ran out of space as `NoSpaceLeft` naming the device and `path`."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        if not is_no_space(exc, Path(path), needed):
            raise
        message = no_space_message(Path(path), what, needed, parts)
        raise NoSpaceLeft(message, path=Path(path), needed=needed) from exc
