"""Graceful stop: SIGINT/SIGTERM set a flag; the loop saves a checkpoint, then stops.

With several training processes a signal may reach one rank only (or the ranks at different moments); the
ranks then stop at the same step: each step's exchange (`distributed.exchange`) shares the flag and
`requested` reports the agreed value (`agree`).
"""

from __future__ import annotations

import signal
import threading


class StopRequest:
    """Set by SIGINT/SIGTERM (or by `request()`), checked by the loop between optimizer steps."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name: str | None = None
        self.checkpoint_now = threading.Event()
        self._agreed: bool | None = None  # set by the step exchange when several processes train

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
        """Install handlers (main thread only). SIGUSR1 asks for a checkpoint without stopping."""
        global _CURRENT
        _CURRENT = self
        if threading.current_thread() is not threading.main_thread():
            return self
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        if hasattr(signal, "SIGUSR1"):
            signal.signal(signal.SIGUSR1, lambda *_: self.checkpoint_now.set())
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the terminal closing must not stop training
        return self

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
