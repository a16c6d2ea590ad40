"""The scrollable event log of a run (checkpoints, samples, OOM recoveries, warnings, steps)."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import RichLog

from loratui.tui.run_model import RunView

_KINDS = (
    (("out of memory", "recovered"), "run-log--oom"),
    (("failed", "error"), "run-log--error"),
    (("warning",), "run-log--warning"),
    (("exported", "finished", "  use it"), "run-log--result"),
)


class RunLog(RichLog):
    """Appends the lines of each new `RunView` it has not shown yet."""

    COMPONENT_CLASSES = {"run-log--oom", "run-log--error", "run-log--warning", "run-log--result"}

    def __init__(self, **kwargs) -> None:
        super().__init__(max_lines=2000, min_width=20, wrap=True, markup=False, highlight=False, **kwargs)
        self.shown = 0

    def on_mount(self) -> None:
        self.border_title = "log"

    def show(self, view: RunView) -> None:
        """Write the lines of `view` beyond those already shown."""
        new = view.log_total - self.shown
        if new <= 0:
            return
        for line in view.log[-min(new, len(view.log)) :]:
            self.write(Text(line, style=self._style(line)))
        self.shown = view.log_total

    def _style(self, line: str):
        for prefixes, component in _KINDS:
            if line.startswith(prefixes):
                return self.get_component_rich_style(component)
        return ""
