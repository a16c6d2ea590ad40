"""How a run ended: exported files and how to use them, or why it stopped or failed."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static

from loratui.tui.run_model import RunView


def result_text(view: RunView) -> str:
    """Plain text for the result panel ('' while the run goes on without exports)."""
    lines: list[str] = []
    if view.state == "finished":
        lines.append("Training finished.")
    elif view.state == "stopped":
        lines.append(
            f"Stopped{f' ({view.note})' if view.note else ''}; resume with "
            f"`loratui train --resume {view.name}`."
        )
    elif view.state == "failed":
        why = view.error or view.note or "unknown error"
        lines.append(f"Failed: {why}. Details: {view.name}/worker.log")
    for path, usage in view.exports:
        lines.append(f"Exported: {path}")
        if usage:
            lines.append(f"Use it:   {usage}")
    return "\n".join(lines)


class RunResult(Static):
    """Hidden until the run ends or exports something."""

    COMPONENT_CLASSES = {"run-result--heading"}

    view: reactive[RunView | None] = reactive(None)

    def __init__(self, **kwargs) -> None:
        super().__init__(markup=False, **kwargs)

    def watch_view(self, view: RunView | None) -> None:
        text = result_text(view) if view is not None else ""
        self.display = bool(text)
        if view is not None:
            self.set_class(view.state == "failed", "-failed")
        self.update(Text(text))
