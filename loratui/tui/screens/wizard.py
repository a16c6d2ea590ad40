"""The wizard: a step bar, the current step, Back/Next, and the state every step's messages change."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import Button, ContentSwitcher, Footer, Static

from loratui.tui.messages import (
    CaptionsWritten,
    ChecksFinished,
    ConfigSaved,
    EstimateReady,
    FileIgnored,
    GoToStep,
    GpuChosen,
    ModelInspected,
    PresetChosen,
    StepShown,
    ValueChosen,
)
from loratui.tui.screens.message_box import MessageBox
from loratui.tui.steps.base import WizardStep
from loratui.tui.steps.captions import CaptionStep
from loratui.tui.steps.dataset import DatasetStep
from loratui.tui.steps.hardware import HardwareStep
from loratui.tui.steps.model import ModelStep
from loratui.tui.steps.review import ReviewStep
from loratui.tui.steps.settings import SettingsStep
from loratui.tui.steps.train import TrainStep
from loratui.tui.widgets.step_bar import StepBar
from loratui.tui.wizard_state import STEP_NAMES, WizardState

HELP = """\
Ctrl+N / Ctrl+P   next / previous step (also the Next and Back buttons)
Tab / Shift+Tab   move between fields and lists;  ↑/↓ Enter   choose in a list
F1                this help;  Ctrl+T  light/dark theme;  Ctrl+Q  quit

Each step says what it found and what you can do. Nothing is written until you save the config
(Review) or start training (Train); dataset fixes ask first. Everything chosen here becomes a config
file: rerun it any time with `loratui train --config FILE`."""


class WizardScreen(Screen):
    """Owns `state`: steps post messages, the screen applies them and tells the current step."""

    BINDINGS = [
        Binding("ctrl+n", "next", "next", priority=True),
        Binding("ctrl+p", "back", "back", priority=True),
        Binding("f1", "help", "help"),
    ]

    def __init__(self, state: WizardState, *, browse_root: str = ".") -> None:
        super().__init__()
        self.state = state
        self.browse_root = browse_root
        self.index = 0
        self.visited: set[int] = set()

    def compose(self) -> ComposeResult:
        yield StepBar(STEP_NAMES)
        with ContentSwitcher(initial="step-0"):
            yield HardwareStep(self.state, id="step-0")
            yield ModelStep(self.state, browse_root=self.browse_root, id="step-1")
            yield DatasetStep(self.state, id="step-2")
            yield CaptionStep(self.state, id="step-3")
            yield SettingsStep(self.state, id="step-4")
            yield ReviewStep(self.state, id="step-5")
            yield TrainStep(self.state, id="step-6")
        with Horizontal(id="nav"):
            yield Button("◀ Back", id="back", compact=True)
            yield Static("", id="nav-hint", markup=False)
            yield Button("Next ▶", id="next", compact=True, variant="primary")
        yield Footer()

    def on_mount(self) -> None:
        self.show_step(0)

    @property
    def step(self) -> WizardStep:
        return self.query_one(f"#step-{self.index}", WizardStep)

    def show_step(self, index: int) -> None:
        """Switch to step `index`, let it read the state, focus it, and announce it."""
        self.index = max(0, min(len(STEP_NAMES) - 1, index))
        self.visited.add(self.index)
        self.query_one(ContentSwitcher).current = f"step-{self.index}"
        bar = self.query_one(StepBar)
        bar.current, bar.visited = self.index, frozenset(self.visited)
        self.query_one("#back", Button).disabled = self.index == 0
        self.query_one("#next", Button).disabled = self.index == len(STEP_NAMES) - 1
        self.query_one("#nav-hint", Static).update(f"step {self.index + 1} of {len(STEP_NAMES)}")
        step = self.step
        step.enter()
        step.focus_first()
        self.post_message(StepShown(self.index, STEP_NAMES[self.index]))

    # --- navigation ---------------------------------------------------------------------------------
    def action_next(self) -> None:
        if self.index < len(STEP_NAMES) - 1:
            self.show_step(self.index + 1)

    def action_back(self) -> None:
        if self.index > 0:
            self.show_step(self.index - 1)

    def action_help(self) -> None:
        self.app.push_screen(MessageBox("Wizard keys", HELP))

    @on(Button.Pressed, "#next")
    def _next_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.action_next()

    @on(Button.Pressed, "#back")
    def _back_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.action_back()

    @on(GoToStep)
    def _go_to(self, message: GoToStep) -> None:
        self.show_step(message.index)

    # --- state changes (messages up, attributes down) ------------------------------------------
    def _changed(self, key: str) -> None:
        self.step.state_changed(key)

    @on(GpuChosen)
    def _gpu(self, message: GpuChosen) -> None:
        self.state.gpu = message.choice
        self._changed("gpu")

    @on(ValueChosen)
    def _value(self, message: ValueChosen) -> None:
        if self.state.set(message.key, message.value):
            self.state.unsaved_changes = True
            self._changed(message.key)

    @on(PresetChosen)
    def _preset(self, message: PresetChosen) -> None:
        if self.state.set_preset(message.name):
            self.state.unsaved_changes = True
            self._changed("preset")

    @on(EstimateReady)
    def _estimate(self, message: EstimateReady) -> None:
        estimate = message.estimate
        self.state.predicted_bytes = estimate.total_bytes if estimate is not None else None

    @on(ModelInspected)
    def _model(self, message: ModelInspected) -> None:
        self.state.model_kind = message.info.kind

    @on(ChecksFinished)
    def _checked(self, message: ChecksFinished) -> None:
        self.state.dataset_errors = sum(1 for f in message.report.findings if f.severity == "error")
        if message.report.unusable:
            self.state.dataset_errors = max(1, self.state.dataset_errors)

    @on(CaptionsWritten)
    def _captions(self, message: CaptionsWritten) -> None:
        if message.metadata_path:
            self.state.set("metadata_path", message.metadata_path)
        self.state.dataset_errors = None  # captions changed: the last check is stale
        self._changed("captions")

    @on(FileIgnored)
    def _ignored(self, message: FileIgnored) -> None:
        self.notify(f"Moved aside: {message.moved_to}", timeout=4)

    @on(ConfigSaved)
    def _saved(self, message: ConfigSaved) -> None:
        self.state.saved_path = message.path
        self.state.unsaved_changes = False
