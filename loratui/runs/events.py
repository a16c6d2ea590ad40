"""`events.jsonl`: an append-only event log written by the worker and tailed by readers.

Writer: one JSON object per line, flushed per event. Reader: returns complete lines only (a partial last
line is kept until its newline arrives), and starts over when the file is replaced or truncated (rotation).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Event types written by the trainers; readers ignore types they do not know.
EVENT_TYPES = (
    "run_started",
    "step",
    "eval",
    "checkpoint",
    "sample",
    "oom",
    "oom_recovered",
    "warning",
    "error",
    "export",
    "run_finished",
    "run_failed",
    "run_stopped",
)


def _clean(value: Any) -> Any:
    """JSON-safe values: NaN/inf become strings, Paths become str, tuples lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


class EventWriter:
    """Append events to `events.jsonl`, one flushed line each."""

    def __init__(self, path: Path, *, fsync: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = self.path.open("a", encoding="utf-8")
        self._fsync = fsync

    def write(self, type: str, step: int | None = None, **fields: Any) -> dict[str, Any]:
        """Append one event and flush it; returns the event written."""
        event = {"type": type, "time": time.time(), "step": step, **_clean(fields)}
        self._handle.write(json.dumps(event, ensure_ascii=False) + "\n")
        self._handle.flush()
        if self._fsync:
            os.fsync(self._handle.fileno())
        return event

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventReader:
    """Tail `events.jsonl` safely while it is being written."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._offset = 0
        self._partial = b""
        self._inode: int | None = None
        self.bad_lines = 0

    def _reopened(self, stat: os.stat_result) -> bool:
        rotated = self._inode is not None and stat.st_ino != self._inode
        truncated = stat.st_size < self._offset
        return rotated or truncated

    def poll(self) -> list[dict[str, Any]]:
        """Events appended since the last call (complete lines only)."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return []
        if self._reopened(stat):
            self._offset, self._partial = 0, b""
        self._inode = stat.st_ino
        if stat.st_size == self._offset:
            return []
        with self.path.open("rb") as handle:
            handle.seek(self._offset)
            chunk = handle.read()
        self._offset += len(chunk)
        data = self._partial + chunk
        *lines, self._partial = data.split(b"\n")
        events = []
        for line in lines:
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                self.bad_lines += 1
                continue
            if isinstance(event, dict):
                events.append(event)
        return events

    def follow(self, *, interval: float = 0.25, stop: callable | None = None) -> Iterator[dict[str, Any]]:
        """Yield events as they arrive until `stop()` returns True (checked between polls)."""
        while True:
            yield from self.poll()
            if stop is not None and stop():
                yield from self.poll()
                return
            time.sleep(interval)


def read_events(path: Path) -> list[dict[str, Any]]:
    """All complete events currently in the file."""
    return EventReader(path).poll()
