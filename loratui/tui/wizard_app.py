"""`loratui wizard`: the step-by-step assistant; after Start it shows the training view."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from textual import on

from loratui.tui.base_app import STYLES, LoratuiApp
from loratui.tui.messages import TrainingStarted
from loratui.tui.screens.training import TrainingScreen
from loratui.tui.screens.wizard import WizardScreen
from loratui.tui.wizard_state import WizardState


class WizardApp(LoratuiApp):
    """The wizard. `launcher(resolved, gpu) -> (run_dir, pid)` starts training (tests may replace it)."""

    CSS_PATH = [*LoratuiApp.CSS_PATH, STYLES / "wizard.tcss", STYLES / "training.tcss"]

    def __init__(
        self,
        state: WizardState | None = None,
        *,
        browse_root: str = ".",
        launcher: Callable | None = None,
        poll_interval: float = 0.25,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.state = state or WizardState()
        self.browse_root = browse_root
        self.launcher = launcher
        self.poll_interval = poll_interval
        self.run_dir: Path | None = None

    def on_mount(self) -> None:
        super().on_mount()
        self.title = "loratui wizard"
        self.push_screen(WizardScreen(self.state, browse_root=self.browse_root))

    @on(TrainingStarted)
    def _training_started(self, message: TrainingStarted) -> None:
        self.run_dir = message.run_dir
        gpu = self.state.gpu
        index = gpu.index if gpu is not None else None
        self.switch_screen(
            TrainingScreen(
                message.run_dir,
                poll_interval=self.poll_interval,
                gpu_index=index,
                predicted_bytes=self.state.predicted_bytes,
            )
        )
