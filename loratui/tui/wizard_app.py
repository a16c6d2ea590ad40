"""`loratui wizard`: the step-by-step assistant; after Start it shows the training view."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from textual import on, work

from loratui.tui.base_app import STYLES, LoratuiApp
from loratui.tui.messages import DemoRequested, TrainingStarted, WorkFailed
from loratui.tui.screens.training import TrainingScreen
from loratui.tui.screens.wizard import WizardScreen
from loratui.tui.wizard_state import GpuChoice, WizardState


class WizardApp(LoratuiApp):
    """The wizard. `launcher(resolved, gpu) -> (run_dir, pid)` starts training (tests may replace it); the demo
    ("try the demo" on the first step) prepares its model, data and config in `demo_dir` and starts the same
    way, so its run opens in the training view."""

    CSS_PATH = [*LoratuiApp.CSS_PATH, STYLES / "wizard.tcss", STYLES / "training.tcss"]

    def __init__(
        self,
        state: WizardState | None = None,
        *,
        browse_root: str = ".",
        launcher: Callable | None = None,
        poll_interval: float = 0.25,
        demo_dir: Path | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.state = state or WizardState()
        self.browse_root = browse_root
        self.launcher = launcher
        self.poll_interval = poll_interval
        self.run_dir: Path | None = None
        self.demo_dir = demo_dir or Path(browse_root) / "loratui-demo"

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

    @on(DemoRequested)
    def _demo_requested(self, message: DemoRequested) -> None:
        message.stop()
        self.start_demo(message.task)

    @work(thread=True, exclusive=True, exit_on_error=False, group="launch")
    def start_demo(self, task: str = "text") -> None:
        """Write the demo's data and config (`text` or `image`), then start its run like the Train step does."""
        from loratui.config import load_config
        from loratui.tui.steps.train import start_run

        if task == "image":
            from loratui.demo.image_demo import prepare_demo
        else:
            from loratui.demo.text_demo import prepare_demo

        launcher = self.launcher or start_run
        try:
            folder = self.demo_dir / "image" if task == "image" else self.demo_dir  # its own data folder
            resolved = load_config(prepare_demo(folder))
            run_dir, pid = launcher(resolved, GpuChoice(None, "CPU", None, None))  # sized for a CPU
        except Exception as exc:
            self.post_message(WorkFailed("Could not start the demo", f"{type(exc).__name__}: {exc}"))
            return
        self.post_message(TrainingStarted(Path(run_dir), pid))
