"""Long calls from thread workers that can be abandoned when the app exits.

Textual runs thread workers in asyncio's default executor, which `asyncio.run` joins on exit: a planner
trace or a captioning job would keep `loratui wizard` from quitting. `call_cancellable` runs the call in a
daemon thread and returns as soon as the worker is cancelled (the call's writes are atomic, and an
abandoned daemon thread ends with the process).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

from textual.worker import get_current_worker

T = TypeVar("T")
POLL_S = 0.05


class Cancelled(Exception):
    """The worker was cancelled (app exiting, or a newer exclusive worker replaced it)."""


def call_cancellable(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` in a daemon thread; raises `Cancelled` if the current worker is cancelled first."""
    worker = get_current_worker()
    box: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # re-raised in the worker below
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=target, name=f"loratui-{getattr(fn, '__name__', 'call')}", daemon=True).start()
    while not done.wait(POLL_S):
        if worker.is_cancelled:
            raise Cancelled()
    if "error" in box:
        raise box["error"]
    return box["result"]
