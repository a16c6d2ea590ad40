"""Graceful stop: SIGINT/SIGTERM set a flag; the loop saves a checkpoint, then stops.

`StopRequest.install` replaces the process's handlers and `restore` puts the replaced ones back, so training
in-process (tests, the demos) leaves the caller's Ctrl-C as it found it (`loratui.train.loop.session` does both).

With several training processes a signal may reach one rank only (or the ranks at different moments); the
ranks then stop at the same step: each step's exchange (`distributed.exchange`) shares the flag and
`requested` reports the agreed value (`agree`).
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Protocol


class StopFlag(Protocol):
    """What a training loop reads between optimizer steps (a `StopRequest`, or a test's stand-in)."""

    signal_name: str | None
    checkpoint_now: threading.Event

    @property
    def requested(self) -> bool: ...


class StopRequest:
    """Set by SIGINT/SIGTERM (or by `request()`), checked by the loop between optimizer steps."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name: str | None = None
        self.checkpoint_now = threading.Event()
        self._agreed: bool | None = None  # set by the step exchange when several processes train
        self._replaced: dict[int, Any] = {}  # signal number -> the handler `install` replaced
        self._previous: StopRequest | None = None  # the stop request current before `install`

    @property
    def raw_requested(self) -> bool:
        """This process received a stop signal (not yet agreed with the others)."""
        return self._event.is_set()

    def agree(self, any_rank: bool) -> None:
        """Record the stop decision all ranks agreed on in this step's exchange."""
        self._agreed = any_rank
        if any_rank and self.signal_name is None:
            self.signal_name = "stop requested on another process"

    def install(self) -> StopRequest:
        """Install handlers (main thread only). SIGUSR1 asks for a checkpoint without stopping; SIGHUP is
        ignored (the terminal closing must not stop training). `restore` undoes this."""
        global _CURRENT
        self._previous, _CURRENT = _CURRENT, self
        if threading.current_thread() is not threading.main_thread():
            return self
        self._replace(signal.SIGTERM, self._on_stop)
        self._replace(signal.SIGINT, self._on_stop)
        if hasattr(signal, "SIGUSR1"):
            self._replace(signal.SIGUSR1, lambda *_: self.checkpoint_now.set())
        if hasattr(signal, "SIGHUP"):
            self._replace(signal.SIGHUP, signal.SIG_IGN)
        return self

    def _replace(self, signum: int, handler: Any) -> None:
        self._replaced.setdefault(signum, signal.getsignal(signum))
        signal.signal(signum, handler)

    def restore(self) -> None:
        """Put back the handlers `install` replaced and the stop request that was current before it.

        A handler Python did not install (`getsignal` gives None) comes back as the default action."""
        global _CURRENT
        if _CURRENT is self:
            _CURRENT = self._previous
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._replaced.items():
                signal.signal(signum, signal.SIG_DFL if handler is None else handler)
            self._replaced.clear()

    def _on_stop(self, signum: int, _frame: object) -> None:
        self.signal_name = signal.Signals(signum).name
        self._event.set()

    def request(self, reason: str = "requested") -> None:
        self.signal_name = reason
        self._event.set()

    @property
    def requested(self) -> bool:
        if self._agreed is not None:
            return self._agreed
        return self._event.is_set()


_CURRENT: StopRequest | None = None


def current() -> StopRequest | None:
    """The stop request installed in this process (the training loop's)."""
    return _CURRENT
