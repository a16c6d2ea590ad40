"""Step 3: dataset checks in a thread worker, findings by severity, and the safe fixes."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Button, Input, ProgressBar, Static

from loratui.tui.background import Cancelled, call_cancellable
from loratui.tui.formatting import display_path
from loratui.tui.messages import ChecksFinished, ChecksStarted, FileIgnored, GoToStep, ValueChosen, WorkFailed
from loratui.tui.screens.confirm import ConfirmScreen
from loratui.tui.steps.base import WizardStep
from loratui.tui.widgets.findings_tree import FindingsTree

IGNORED_FOLDER = ".ignored"  # hidden folders are skipped by the dataset scan
CAPTION_CODES = {"missing_caption", "empty_caption", "wrong_caption_extension", "missing_trigger_word"}
CAPTIONS_STEP = 3


def check_settings(state) -> dict[str, Any]:
    """The `run_checks` keyword arguments from the current choices."""
    task = state.task
    settings: dict[str, Any] = {
        "task": task,
        "resolution": int(state.get("resolution")),
        "batch_size": int(state.get("batch_size")),
        "trigger_word": state.get("trigger_word") or None,
        "max_seq_len": int(state.get("max_seq_len")) if task == "text" else None,
    }
    if task == "image":
        metadata = state.get("metadata_path")
        settings["metadata_path"] = Path(metadata) if metadata else None
        settings["caption_extensions"] = (state.get("caption_extension"),)
    base = state.get("base_model")
    if base:
        try:
            from loratui.data.check import tokenizer_path_for

            settings["tokenizer_path"] = tokenizer_path_for(base, task)
        except Exception:
            settings["tokenizer_path"] = None
    return settings


def report_summary(report) -> str:
    """Plain sentences: what was checked, how many findings of each severity, what to do next."""
    counts = report.counts()
    if report.unusable:
        first = report.findings[0].message if report.findings else "unreadable"
        return f"✗ This dataset cannot be used: {first}"
    s = report.summary
    if report.task == "image":
        what = f"{s.get('images', 0)} images ({s.get('captioned', 0)} captioned"
        if s.get("steps_per_epoch"):
            what += f", {s['steps_per_epoch']} steps per epoch at batch {s.get('batch_size', 1)}"
        what += ")"
    else:
        what = (
            f"{s.get('records', 0)} records in {s.get('files', 0)} file{'s' if s.get('files') != 1 else ''}"
        )
    found = ", ".join(
        f"{n} {name}{'s' if n != 1 else ''}"
        for n, name in ((counts["error"], "error"), (counts["warning"], "warning"), (counts["info"], "note"))
    )
    advice = (
        "Fix the errors before training: each finding shows its fix and example files."
        if counts["error"]
        else "No errors: Ctrl+N goes on."
    )
    return f"Checked {what}: {found}. {advice}"


class DatasetStep(WizardStep):
    """Path input, Check button, indeterminate progress while the check runs, findings tree."""

    STEP_TITLE = "Dataset check"
    BINDINGS = [
        Binding("c", "caption", "caption missing"),
        Binding("i", "ignore", "ignore file"),
        Binding("r", "recheck", "check again"),
    ]

    def __init__(self, state, **kwargs) -> None:
        super().__init__(state, **kwargs)
        self._checked: tuple | None = None  # (path, settings) of the shown report
        self.report = None

    def compose(self) -> ComposeResult:
        yield self.heading()
        with Horizontal(classes="field"):
            yield Static("Dataset", classes="label")
            yield Input(placeholder="image folder, or .jsonl file / folder", id="dataset-path", compact=True)
            yield Button("Check", id="check", compact=True)
        yield ProgressBar(total=None, show_eta=False, show_percentage=False, id="check-progress")
        yield self.summary()
        yield FindingsTree(id="findings")
        yield Static("", markup=False, id="finding-detail")
        yield Static(
            "Enter: open · c: caption the missing · i: move a file aside · r: check again",
            markup=False,
            classes="hint",
        )

    def on_mount(self) -> None:
        self.query_one(ProgressBar).display = False

    def focus_first(self) -> None:
        path = self.query_one("#dataset-path", Input)
        (self.query_one(FindingsTree) if path.value else path).focus()

    def enter(self) -> None:
        path = str(self.state.get("train_data_dir") or "")
        field = self.query_one("#dataset-path", Input)
        if path and field.value != path:
            field.value = path
        if not path:
            self.say("Type the dataset folder (images with captions) or a JSONL file, then Enter.")
            return
        self._maybe_check(path)

    def _maybe_check(self, path: str, *, force: bool = False) -> None:
        settings = check_settings(self.state)
        key = (path, tuple(sorted((k, str(v)) for k, v in settings.items())))
        if force or key != self._checked:
            self._checked = key
            self.run_check(path, settings)

    @on(Input.Submitted, "#dataset-path")
    @on(Button.Pressed, "#check")
    def _check_pressed(self, event) -> None:
        event.stop()
        path = self.query_one("#dataset-path", Input).value.strip()
        if not path:
            return
        self.post_message(ValueChosen("train_data_dir", path))
        self._maybe_check(path, force=True)

    @work(thread=True, exclusive=True, exit_on_error=False, group="checks")
    def run_check(self, path: str, settings: dict[str, Any]) -> None:
        """`run_checks` in a thread; posts ChecksStarted then ChecksFinished."""
        self.post_message(ChecksStarted(path))
        try:
            from loratui.data.check import run_checks

            report = call_cancellable(run_checks, Path(path).expanduser(), **settings)
        except Cancelled:
            return
        except Exception as exc:
            self.post_message(WorkFailed("The dataset check failed", f"{type(exc).__name__}: {exc}"))
            return
        self.post_message(ChecksFinished(path, report))

    @on(ChecksStarted)
    def _started(self, message: ChecksStarted) -> None:
        self.query_one(ProgressBar).display = True
        self.say(f"Checking {display_path(message.path)}…")

    @on(ChecksFinished)
    def _finished(self, message: ChecksFinished) -> None:
        self.query_one(ProgressBar).display = False
        self.report = message.report
        self.say(report_summary(message.report))
        tree = self.query_one(FindingsTree)
        tree.show(message.report)
        first = next((node for group in tree.root.children for node in group.children), None)
        detail = self._detail(first.data) if first is not None else ""
        self.query_one("#finding-detail", Static).update(detail)

    @on(FindingsTree.NodeHighlighted)
    def _highlighted(self, event: FindingsTree.NodeHighlighted) -> None:
        event.stop()
        self.query_one("#finding-detail", Static).update(self._detail(event.node.data))

    def _detail(self, data) -> str:
        """The full text of the highlighted finding (the tree clips long lines)."""
        if data is None or self.report is None:
            return ""
        finding = next((f for f in self.report.findings if f.code == data.code), None)
        if finding is None:
            return ""
        text = f"{finding.message}\nFix: {finding.fix}" if finding.fix else finding.message
        if data.example:
            text = f"{data.example}: " + text
        return text

    def state_changed(self, key: str) -> None:
        if key in ("trigger_word", "metadata_path", "caption_extension") and self.display:
            path = self.query_one("#dataset-path", Input).value.strip()
            if path:
                self._maybe_check(path)

    # --- actions where safe ----------------------------------------------------------------------
    def _selected(self):
        node = self.query_one(FindingsTree).cursor_node
        return node.data if node is not None else None

    def action_caption(self) -> None:
        if self.state.task != "image":
            self.notify("Captioning is for image datasets.", severity="warning")
            return
        self.post_message(GoToStep(CAPTIONS_STEP, "caption images without captions"))

    def action_recheck(self) -> None:
        path = self.query_one("#dataset-path", Input).value.strip()
        if path:
            self._maybe_check(path, force=True)

    def action_ignore(self) -> None:
        data = self._selected()
        if data is None or not data.example:
            self.notify("Select an example file in a finding first.", severity="warning")
            return
        if self.state.task != "image":
            self.notify("Records in JSONL files cannot be moved aside; edit the file.", severity="warning")
            return
        root = Path(self.query_one("#dataset-path", Input).value.strip()).expanduser()
        target = Path(data.example)
        source = target if target.is_absolute() else root / target
        if not source.is_file():
            self.notify(f"{data.example} is not a file.", severity="warning")
            return
        question = (
            f"Move {data.example} (and its caption file) to {IGNORED_FOLDER}/ inside the dataset? "
            "Training skips hidden folders; move it back to use it again."
        )

        def answered(yes: bool | None) -> None:
            if yes:
                moved = move_aside(root, source)
                self.post_message(FileIgnored(str(source), str(moved)))
                self.action_recheck()

        self.app.push_screen(ConfirmScreen(question, yes="Move aside", no="Cancel"), answered)


def move_aside(root: Path, image: Path) -> Path:
    """Move `image` and its sidecar captions under `root/.ignored/`, keeping the relative layout."""
    relative = image.resolve().relative_to(root.resolve())
    destination = root / IGNORED_FOLDER / relative
    destination.parent.mkdir(parents=True, exist_ok=True)
    for sidecar in list(image.parent.iterdir()):
        if sidecar.stem == image.stem and sidecar != image and sidecar.suffix.lower() in (".txt", ".caption"):
            shutil.move(str(sidecar), str(destination.parent / sidecar.name))
    shutil.move(str(image), str(destination))
    return destination
