"""What the wizard and the training view share: theme, the GPU telemetry worker, the error modal."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from textual import on, work
from textual.app import App
from textual.binding import Binding
from textual.reactive import reactive
from textual.worker import get_current_worker

from loratui.gpu.nvml import SystemSnapshot
from loratui.tui.messages import GpuTelemetry, WorkFailed
from loratui.tui.screens.message_box import MessageBox

STYLES = Path(__file__).parent / "styles"
LIGHT, DARK = "textual-light", "textual-dark"
UI_SWITCH_INTERVAL = 0.0005  # seconds


def default_snapshot() -> SystemSnapshot:
    """NVML snapshot (imported lazily)."""
    from loratui.gpu.nvml import snapshot

    return snapshot()


class LoratuiApp(App[int]):
    """Base app: one timed telemetry worker posts `GpuTelemetry`; handlers keep `gpu` current.

    Widgets that show GPU figures watch `app.gpu` (attributes down); nothing but the worker calls NVML.
    """

    CSS_PATH = [STYLES / "common.tcss"]
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [
        Binding("ctrl+q", "quit", "quit", show=False),
        Binding("ctrl+t", "toggle_theme", "light/dark", show=False),
    ]

    gpu: reactive[SystemSnapshot | None] = reactive(None)

    def __init__(
        self,
        *,
        telemetry_interval: float = 1.0,
        snapshot: Callable[[], SystemSnapshot] = default_snapshot,
        theme: str | None = None,
    ) -> None:
        super().__init__()
        self.telemetry_interval = telemetry_interval
        self._snapshot = snapshot
        self._stop = threading.Event()
        self.theme = theme or os.environ.get("LORATUI_THEME") or DARK
        self._error_shown = False

    def on_mount(self) -> None:
        self.title = "loratui"
        # Workers (dataset checks, captioning) run Python in threads: hand the GIL back to the UI thread
        # sooner than the default 5 ms so keys and redraws stay quick while they run.
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch_interval, UI_SWITCH_INTERVAL))
        self.telemetry()

    def on_unmount(self) -> None:
        self._stop.set()
        sys.setswitchinterval(getattr(self, "_switch_interval", sys.getswitchinterval()))

    @work(thread=True, exclusive=True, exit_on_error=False, group="telemetry", name="telemetry")
    def telemetry(self) -> None:
        """The one NVML reader: a snapshot now, then one per `telemetry_interval` seconds."""
        worker = get_current_worker()
        while not worker.is_cancelled and not self._stop.is_set():
            self.post_message(GpuTelemetry(self._snapshot()))
            if self.telemetry_interval <= 0:
                return
            self._stop.wait(self.telemetry_interval)

    @on(GpuTelemetry)
    def _on_telemetry(self, message: GpuTelemetry) -> None:
        self.gpu = message.snapshot

    @on(WorkFailed)
    def _on_work_failed(self, message: WorkFailed) -> None:
        """One error modal at a time; later errors go to notifications."""
        if self._error_shown:
            self.notify(f"{message.what}: {message.error}", severity="error", timeout=8)
            return
        self._error_shown = True

        def closed(_: None) -> None:
            self._error_shown = False

        self.push_screen(MessageBox(message.what, message.error, kind="error"), closed)

    def action_toggle_theme(self) -> None:
        self.theme = LIGHT if self.theme != LIGHT else DARK
