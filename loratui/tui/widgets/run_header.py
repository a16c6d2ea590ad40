"""The training view's top line: run name, state, progress bar and percentage."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from loratui.tui.formatting import fmt_duration
from loratui.tui.run_model import RunView


class RunHeader(Widget):
    """`run NAME · running · ████░░░░ 24%`."""

    COMPONENT_CLASSES = {"run-header--name", "run-header--state", "run-header--bar", "run-header--rest"}

    view: reactive[RunView | None] = reactive(None)

    def render(self) -> Text:
        view = self.view
        text = Text(no_wrap=True, overflow="ellipsis")
        if view is None:
            return text
        text.append(f"run {view.name}", self.get_component_rich_style("run-header--name"))
        text.append(" · ")
        text.append(view.state, self.get_component_rich_style("run-header--state"))
        eta = "" if view.ended else f" · ETA {fmt_duration(view.eta_s)}"
        if view.progress is not None:
            room = max(10, self.size.width - len(text.plain) - 8 - len(eta))
            width = min(30, room)
            done = round(view.progress * width)
            text.append("  ")
            text.append("█" * done, self.get_component_rich_style("run-header--bar"))
            text.append("░" * (width - done), self.get_component_rich_style("run-header--rest"))
            text.append(f" {view.progress:.0%}")
        text.append(eta)
        return text

    def watch_view(self, view: RunView | None) -> None:
        if view is not None:
            for state in ("starting", "running", "finished", "failed", "stopped"):
                self.set_class(view.state == state, f"-{state}")
