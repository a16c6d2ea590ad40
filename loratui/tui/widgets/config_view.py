"""The resolved config as YAML, each value followed by where it came from (defaults dimmed)."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Static

from loratui.tui.wizard_state import annotated_yaml


class ConfigView(VerticalScroll):
    """Scrollable, focusable view of `annotated_yaml(resolved)`."""

    COMPONENT_CLASSES = {"config-view--key", "config-view--source", "config-view--default"}

    def compose(self) -> ComposeResult:
        yield Static(id="yaml")

    def show(self, resolved) -> None:
        """Render the resolved config; lines with a source comment are values the user chose."""
        key_style = self.get_component_rich_style("config-view--key")
        source_style = self.get_component_rich_style("config-view--source")
        default_style = self.get_component_rich_style("config-view--default")
        text = Text(no_wrap=True, overflow="ellipsis")
        for index, line in enumerate(annotated_yaml(resolved).splitlines()):
            if index:
                text.append("\n")
            if line.startswith("#"):
                text.append(line, source_style)
                continue
            body, _, source = line.partition("  # ")
            key, sep, value = body.partition(":")
            if not source:
                text.append(body, default_style)
                continue
            text.append(key + sep, key_style)
            text.append(value)
            text.append(f"  # {source}", source_style)
        self.query_one("#yaml", Static).update(text)
