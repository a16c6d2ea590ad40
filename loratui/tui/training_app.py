"""`loratui attach` / `loratui train` on a terminal: the training view of one run as an app."""

from __future__ import annotations

from pathlib import Path

from loratui.tui.base_app import STYLES, LoratuiApp
from loratui.tui.screens.training import TrainingScreen


class TrainingApp(LoratuiApp):
    """Shows one run; exits 0 on detach, or the run's exit code when quitting after it ended."""

    CSS_PATH = [*LoratuiApp.CSS_PATH, STYLES / "training.tcss"]

    def __init__(self, run_dir: Path, *, poll_interval: float = 0.25, gpu_index: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.run_dir = Path(run_dir)
        self.poll_interval = poll_interval
        self.gpu_index = gpu_index

    def on_mount(self) -> None:
        super().on_mount()
        self.title = f"loratui · {self.run_dir.name}"
        self.push_screen(
            TrainingScreen(self.run_dir, poll_interval=self.poll_interval, gpu_index=self.gpu_index)
        )
