"""The wizard's step indicator: `1 GPU › 2 Model › …`, the current step highlighted."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget


class StepBar(Widget):
    """One line naming every step; `current` is highlighted, `visited` steps read as done."""

    COMPONENT_CLASSES = {"step-bar--current", "step-bar--visited", "step-bar--todo", "step-bar--sep"}

    current: reactive[int] = reactive(0)
    visited: reactive[frozenset[int]] = reactive(frozenset())

    def __init__(self, names: tuple[str, ...], **kwargs) -> None:
        super().__init__(**kwargs)
        self.names = names

    def render(self) -> Text:
        text = Text(no_wrap=True, overflow="ellipsis")
        for index, name in enumerate(self.names):
            if index:
                text.append(" › ", self.get_component_rich_style("step-bar--sep"))
            if index == self.current:
                kind = "current"
            elif index in self.visited:
                kind = "visited"
            else:
                kind = "todo"
            text.append(f"{index + 1} {name}", self.get_component_rich_style(f"step-bar--{kind}"))
        return text
