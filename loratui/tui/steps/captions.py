"""Step 4: caption images with a local model (progress with ETA), review and edit the captions, and
write them as metadata.csv or .txt files through the core captioning functions."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Button, DataTable, Input, ProgressBar, Select, Static

from loratui.tui import caption_bridge
from loratui.tui.background import Cancelled, call_cancellable
from loratui.tui.messages import CaptionProgress, CaptionsReady, CaptionsWritten, ValueChosen, WorkFailed
from loratui.tui.steps.base import WizardStep

MODEL_OPTIONS = [
    ("BLIP base (local)", "blip-base"),
    ("BLIP large (local)", "blip-large"),
    ("WD tagger folder (booru tags)…", "tagger"),
    ("model folder…", "folder"),
]
FOLDER_CHOICES = ("tagger", "folder")
POLICY_OPTIONS = [
    ("keep existing captions", "keep"),
    ("append tags to existing captions", "append"),
    ("overwrite all captions", "overwrite"),
]
FORMAT_OPTIONS = [("metadata.csv", "csv"), (".txt next to each image", "txt")]
CAPTION_WIDTH = 200


class CaptionStep(WizardStep):
    """Options, Caption / Write buttons, a progress bar, the captions table and an edit line."""

    STEP_TITLE = "Captions"
    BINDINGS = [Binding("ctrl+w", "write", "write captions")]

    def __init__(self, state, **kwargs) -> None:
        super().__init__(state, **kwargs)
        self.rows: list[list[str]] = []  # [relative image path, caption, source]
        self.edited: set[str] = set()  # images whose caption was edited here and not written yet
        self._root: Path | None = None

    def compose(self) -> ComposeResult:
        yield self.heading()
        with Horizontal(classes="field"):
            yield Static("Model", classes="label")
            yield Select(
                MODEL_OPTIONS, value="blip-base", allow_blank=False, id="caption-model", compact=True
            )
            yield Input(placeholder="captioning model folder", id="model-folder", compact=True)
        with Horizontal(classes="field"):
            yield Static("Trigger word", classes="label")
            yield Input(placeholder="e.g. mychar (put first in every caption)", id="trigger", compact=True)
            yield Select(POLICY_OPTIONS, value="keep", allow_blank=False, id="policy", compact=True)
        with Horizontal(classes="field"):
            yield Static("Write as", classes="label")
            yield Select(FORMAT_OPTIONS, value="csv", allow_blank=False, id="format", compact=True)
            yield Button("Caption", id="run-captioning", compact=True, variant="primary")
            yield Button("Write", id="write", compact=True)
        yield ProgressBar(total=1, show_eta=True, id="caption-progress")
        yield self.summary()
        yield DataTable(id="captions", cursor_type="row", zebra_stripes=True)
        with Horizontal(classes="field edit"):
            yield Static("Edit", classes="label")
            yield Input(placeholder="select a row, edit, Enter", id="caption-edit", compact=True)

    def on_mount(self) -> None:
        self.query_one(ProgressBar).display = False
        self.query_one("#model-folder", Input).display = False
        table = self.query_one("#captions", DataTable)
        table.add_column("image", key="image", width=24)
        table.add_column("caption", key="caption")

    def enter(self) -> None:
        trigger = self.state.get("trigger_word") or ""
        field = self.query_one("#trigger", Input)
        if field.value != trigger:
            field.value = trigger
        if self.state.task != "image":
            self.say("Captioning is for image datasets; text datasets need no captions. Ctrl+N goes on.")
            return
        root = Path(str(self.state.get("train_data_dir") or "")).expanduser()
        if not str(self.state.get("train_data_dir") or ""):
            self.say("Choose the dataset folder first (step 3).")
            return
        if root != self._root and not self.edited:
            self._root = root
            self.load_captions(root, self._scan_settings())
        self._explain()

    def _scan_settings(self) -> dict[str, Any]:
        metadata = self.state.get("metadata_path")
        return {
            "caption_extensions": (self.state.get("caption_extension"),),
            "metadata_path": Path(metadata) if metadata else None,
        }

    def _explain(self) -> None:
        if not self.rows:
            return
        missing = sum(1 for row in self.rows if not row[1])
        available = caption_bridge.available()
        lines = [f"{len(self.rows)} images, {missing} without a caption."]
        if not available:
            lines.append(
                "Automatic captioning is not available in this installation; you can still edit below."
            )
        elif missing:
            lines.append(
                "Caption fills the missing ones with the chosen model (keep) or redoes all (overwrite)."
            )
        lines.append("Select a row to edit its caption; Write saves them (Ctrl+W).")
        self.say(" ".join(lines))

    # --- loading the current captions -----------------------------------------------------------
    @work(thread=True, exclusive=True, exit_on_error=False, group="captions")
    def load_captions(self, root: Path, settings: dict[str, Any]) -> None:
        """Read the dataset's current captions with the same scan training uses."""
        try:
            rows = call_cancellable(caption_bridge.current_captions, root, **settings)
        except Cancelled:
            return
        except Exception as exc:
            self.post_message(WorkFailed("Could not read the captions", f"{type(exc).__name__}: {exc}"))
            return
        self.post_message(CaptionsReady(rows))

    @on(CaptionsReady)
    def _rows_ready(self, message: CaptionsReady) -> None:
        self.rows = [[path, caption, ""] for path, caption in message.rows]
        self.query_one(ProgressBar).display = False
        table = self.query_one("#captions", DataTable)
        table.clear()
        for path, caption, _ in self.rows:
            table.add_row(path, _clip(caption) or "(none)", key=path)
        self._explain()

    # --- options --------------------------------------------------------------------------------
    @on(Select.Changed, "#caption-model")
    def _model_changed(self, event: Select.Changed) -> None:
        event.stop()
        folder = self.query_one("#model-folder", Input)
        folder.display = event.value in FOLDER_CHOICES
        folder.placeholder = (
            "WD tagger folder (model.onnx + selected_tags.csv)"
            if event.value == "tagger"
            else "captioning model folder"
        )

    @on(Input.Changed, "#model-folder")
    def _folder_typed(self, event: Input.Changed) -> None:
        event.stop()
        if event.value.strip() and caption_bridge.available():
            self.say(caption_bridge.model_kind(event.value.strip()))

    @on(Input.Changed, "#trigger")
    def _trigger(self, event: Input.Changed) -> None:
        event.stop()
        word = event.value.strip() or None
        if word != (self.state.get("trigger_word") or None):
            self.post_message(ValueChosen("trigger_word", word))

    # --- captioning -----------------------------------------------------------------------------
    @on(Button.Pressed, "#run-captioning")
    def _caption_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if not caption_bridge.available():
            self.notify("Automatic captioning is not available in this installation.", severity="warning")
            return
        if self._root is None or not self.rows:
            self.notify("No images to caption (choose the dataset in step 3).", severity="warning")
            return
        model = str(self.query_one("#caption-model", Select).value)
        if model in FOLDER_CHOICES:
            model = self.query_one("#model-folder", Input).value.strip()
            if not model:
                self.notify("Type the captioning model's folder.", severity="warning")
                return
        mode = str(self.query_one("#policy", Select).value)
        todo = [row[0] for row in self.rows if mode != "keep" or not row[1]]
        if not todo:
            self.notify("Every image has a caption; choose append or overwrite to add to or redo them.")
            return
        bar = self.query_one(ProgressBar)
        bar.update(total=len(todo), progress=0)
        bar.display = True
        self.say(f"Loading {model} and captioning {len(todo)} images…")
        prefix = self.query_one("#trigger", Input).value.strip()
        fmt = str(self.query_one("#format", Select).value)
        self.caption(
            self._root,
            model,
            f"{prefix}, " if prefix else "",
            mode,
            fmt,
            str(self.state.get("caption_extension")),
        )

    @work(thread=True, exclusive=True, exit_on_error=False, group="captioning")
    def caption(self, root: Path, model: str, prefix: str, mode: str, fmt: str, extension: str) -> None:
        """Run the local captioning model in a thread (the core writes the captions as it goes)."""
        start = time.monotonic()

        def progress(done: int, total: int) -> None:
            self.post_message(CaptionProgress(done, total, time.monotonic() - start))

        try:
            result = call_cancellable(
                caption_bridge.caption,
                root,
                model=model,
                prefix=prefix,
                overwrite=False,
                mode=mode,
                fmt=fmt,
                caption_extension=extension,
                progress=progress,
            )
        except Cancelled:
            return
        except Exception as exc:
            self.post_message(WorkFailed("Captioning failed", f"{type(exc).__name__}: {exc}"))
            return
        merged = dict(result.written)
        rows = [(row[0], merged.get(row[0], row[1])) for row in self.rows]
        self.post_message(CaptionsReady(rows))
        target = str(result.output) if result.output else None
        self.post_message(CaptionsWritten(str(root), len(result.written), target))
        for rel, reason in result.failed[:3]:
            self.post_message(WorkFailed("Some images could not be captioned", f"{rel}: {reason}"))

    @on(CaptionProgress)
    def _progress(self, message: CaptionProgress) -> None:
        bar = self.query_one(ProgressBar)
        bar.update(total=message.total, progress=message.done)

    # --- editing and writing ---------------------------------------------------------------------
    @on(DataTable.RowHighlighted, "#captions")
    def _row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        event.stop()
        if 0 <= event.cursor_row < len(self.rows):
            self.query_one("#caption-edit", Input).value = self.rows[event.cursor_row][1]

    @on(DataTable.RowSelected, "#captions")
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.query_one("#caption-edit", Input).focus()

    @on(Input.Submitted, "#caption-edit")
    def _edited(self, event: Input.Submitted) -> None:
        event.stop()
        table = self.query_one("#captions", DataTable)
        row = table.cursor_row
        if 0 <= row < len(self.rows):
            self.rows[row][1] = event.value.strip()
            self.edited.add(self.rows[row][0])
            table.update_cell(self.rows[row][0], "caption", _clip(self.rows[row][1]) or "(none)")
            table.focus()
            if row + 1 < len(self.rows):
                table.move_cursor(row=row + 1)

    @on(Button.Pressed, "#write")
    def _write_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.action_write()

    def action_write(self) -> None:
        if self._root is None or not self.rows:
            return
        if not self.edited:
            self.notify("No edited captions to write.")
            return
        fmt = str(self.query_one("#format", Select).value)
        rows = [(path, caption) for path, caption, _ in self.rows if path in self.edited]
        self.write(self._root, rows, fmt, str(self.state.get("caption_extension")))

    @work(thread=True, exclusive=True, exit_on_error=False, group="write-captions")
    def write(self, root: Path, rows: list[tuple[str, str]], fmt: str, extension: str) -> None:
        """Write the edited captions (atomic writes, in the core)."""
        try:
            written, metadata = call_cancellable(
                caption_bridge.write, root, rows, fmt=fmt, caption_extension=extension
            )
        except Cancelled:
            return
        except Exception as exc:
            self.post_message(WorkFailed("Could not write the captions", f"{type(exc).__name__}: {exc}"))
            return
        self.post_message(CaptionsWritten(str(root), written, str(metadata) if metadata else None))

    @on(CaptionsWritten)
    def _written(self, message: CaptionsWritten) -> None:
        self.edited.clear()
        self.query_one(ProgressBar).display = False
        where = "metadata.csv" if message.metadata_path else ".txt files"
        self.say(f"Wrote {message.count} captions ({where}). Ctrl+P twice re-checks the dataset.")


def _clip(text: str) -> str:
    return text if len(text) <= CAPTION_WIDTH else text[: CAPTION_WIDTH - 1] + "…"
