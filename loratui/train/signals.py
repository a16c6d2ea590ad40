"""Graceful stop: SIGINT/SIGTERM set a flag; the loop saves a checkpoint, then stops."""

from __future__ import annotations

import signal
import threading


class StopRequest:
    """Set by SIGINT/SIGTERM (or by `request()`), checked by the loop between optimizer steps."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name: str | None = None
        self.checkpoint_now = threading.Event()

    def install(self) -> StopRequest:
        """Install handlers (main thread only). SIGUSR1 asks for a checkpoint without stopping."""
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
        return self._event.is_set()
