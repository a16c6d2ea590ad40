"""A modal with a title and text (help, errors); any of Escape, Enter, q or ? closes it."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Static


class MessageBox(ModalScreen[None]):
    """Help text or the one error modal; `kind` ("help" or "error") only changes the styling."""

    BINDINGS = [Binding("escape,enter,q,question_mark", "close", "close")]

    def __init__(self, title: str, body: str, *, kind: str = "help") -> None:
        super().__init__(classes=kind)
        self.title_text = title
        self.body = body

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Static(self.title_text, markup=False, id="title")
            with VerticalScroll(id="body"):
                yield Static(self.body, markup=False)
            yield Button("Close (Esc)", id="close", compact=True)

    def on_mount(self) -> None:
        self.query_one("#close", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss(None)

    def action_close(self) -> None:
        self.dismiss(None)
