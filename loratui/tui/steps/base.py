"""What every wizard step has: a heading, a plain-sentence summary of what it found, and `enter()`."""

from __future__ import annotations

from textual.containers import Vertical
from textual.widgets import Static

from loratui.tui.wizard_state import WizardState


class WizardStep(Vertical):
    """Base of the steps. The wizard screen owns `state`; a step reads it and posts messages to change it."""

    STEP_TITLE = ""

    def __init__(self, state: WizardState, **kwargs) -> None:
        super().__init__(**kwargs)
        self.state = state

    def heading(self) -> Static:
        """The step's title line."""
        return Static(self.STEP_TITLE, markup=False, classes="step-title")

    def summary(self) -> Static:
        """The plain sentences saying what the step found (updated with `say`)."""
        return Static("", markup=False, classes="step-summary")

    def say(self, text: str) -> None:
        """Replace the summary sentences."""
        self.query_one(".step-summary", Static).update(text)

    def enter(self) -> None:
        """Called by the wizard each time the step is shown (read the state here)."""

    def state_changed(self, key: str) -> None:
        """Called by the wizard after it applied a change (`key`: config key, "gpu", "preset", ...)."""

    def focus_first(self) -> None:
        """Focus the step's main control."""
        for widget in self.query("*"):
            if widget.focusable and widget.display:
                widget.focus()
                return
