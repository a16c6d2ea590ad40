"""Step 2: image or text task, and the base model (path input or file browser) with its family detected."""

from __future__ import annotations

from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import DirectoryTree, Input, Select, Static

from loratui.tui.background import Cancelled, call_cancellable
from loratui.tui.formatting import display_path
from loratui.tui.messages import ModelInspected, ValueChosen, WorkFailed
from loratui.tui.steps.base import WizardStep
from loratui.tui.widgets.model_folders import ModelFolders

FAMILY_NAMES = {
    "sd15": "Stable Diffusion 1.x",
    "sd2": "Stable Diffusion 2.x",
    "sdxl": "Stable Diffusion XL",
    "flux": "FLUX.1",
    "chroma": "Chroma",
}
KIND_NAMES = {
    "diffusers-folder": "diffusers folder",
    "sd-checkpoint": "single-file checkpoint",
    "flux-checkpoint": "single-file transformer",
    "hf-folder": "Hugging Face model folder",
    "gguf": "GGUF file",
    "llm-weights": "weights file",
}
TASK_OPTIONS = [("Image: Stable Diffusion LoRA", "image"), ("Text: LLM LoRA", "text")]
TRAINABLE_KINDS = {"diffusers-folder", "sd-checkpoint", "flux-checkpoint", "hf-folder", "gguf", "hub-id"}


def fmt_params(count: int | None) -> str:
    """1234567 -> '1.2 M'."""
    if not count:
        return "unknown size"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return str(count)


def describe_model(info) -> tuple[bool, str]:
    """(usable, sentence) for a `ModelInfo`."""
    kind = info.kind
    where = display_path(info.path)
    if kind == "missing":
        return False, f"Nothing found at {where}. Type a path or pick a file or folder below."
    if kind == "lora":
        return False, "This is a LoRA file, not a base model. Choose the model the LoRA was trained for."
    if kind == "vae":
        return False, "This is a VAE only, not a full Stable Diffusion model."
    if kind == "ggml":
        return False, (
            "This is a legacy GGML file; GGML v3 files cannot be trained. Use the Hugging Face "
            "weights (config.json + *.safetensors) or a GGUF conversion."
        )
    if kind == "pickle":
        return False, (
            "This is a pickle checkpoint (.ckpt/.bin): loading it runs code. Prefer a .safetensors "
            "file; to use it anyway set allow_pickle in your config."
        )
    if kind == "hub-id":
        return True, (
            "This looks like a Hugging Face model id. It must already be in the local cache: "
            "nothing is downloaded."
        )
    if kind not in TRAINABLE_KINDS or info.family is None:
        notes = "; ".join(info.notes) if info.notes else "no model_index.json or config.json"
        return False, f"Not a base model loratui can train ({notes})."
    what = KIND_NAMES.get(kind, kind)
    if info.family == "llm":
        arch = info.architecture or "causal language model"
        text = f"Found an LLM: {arch}, about {fmt_params(info.params)} parameters ({what})."
    else:
        extra = " (v-prediction)" if "v-prediction" in info.notes else ""
        if getattr(info, "zero_terminal_snr", False):
            extra = extra[:-1] + ", zero terminal SNR)" if extra else " (zero terminal SNR)"
        text = f"Found a {FAMILY_NAMES.get(info.family, info.family)} model{extra} ({what})."
    warnings = [n for n in info.notes if n != "v-prediction"]
    if warnings:
        text += " Note: " + "; ".join(warnings) + "."
    return True, text


def task_of(info) -> str | None:
    """ "image" or "text" from a model's family."""
    if info is None or info.family is None:
        return None
    return "text" if info.family == "llm" else "image"


class ModelStep(WizardStep):
    """Task radio buttons, a path input and a directory tree; a thread worker inspects the path."""

    STEP_TITLE = "Task and base model"

    def __init__(self, state, *, browse_root: Path | str = ".", **kwargs) -> None:
        super().__init__(state, **kwargs)
        self.browse_root = browse_root
        self._inspected: str | None = None

    def compose(self) -> ComposeResult:
        yield self.heading()
        with Horizontal(classes="field"):
            yield Static("Task", classes="label")
            yield Select(TASK_OPTIONS, value="image", allow_blank=False, id="task", compact=True)
        with Horizontal(classes="field"):
            yield Static("Base model", classes="label")
            yield Input(
                placeholder="folder or file, e.g. models/sd15 or model.safetensors",
                id="base-model",
                compact=True,
            )
        yield self.summary()
        yield ModelFolders(self.browse_root, id="browser")

    def enter(self) -> None:
        value = str(self.state.get("base_model") or "")
        field = self.query_one("#base-model", Input)
        if value and field.value != value:
            field.value = value
        self._set_task_buttons(self.state.task)
        if not value:
            self.say(
                "Type the base model's path, or browse to it below (Enter opens folders and picks files)."
            )

    def focus_first(self) -> None:
        self.query_one("#base-model", Input).focus()

    def _set_task_buttons(self, task: str) -> None:
        select = self.query_one("#task", Select)
        if select.value != task:
            with self.prevent(Select.Changed):
                select.value = task

    @on(Select.Changed, "#task")
    def _task_changed(self, event: Select.Changed) -> None:
        event.stop()
        task = "text" if event.value == "text" else "image"
        if task == self.state.task:
            return  # the select showing the current value (mount, prefill), not a choice
        self.post_message(
            ValueChosen("task_type", "text-generation" if task == "text" else "image-generation")
        )

    @on(Input.Changed, "#base-model")
    def _path_typed(self, event: Input.Changed) -> None:
        event.stop()
        self.inspect(event.value.strip())

    @on(DirectoryTree.FileSelected)
    def _file_picked(self, event: DirectoryTree.FileSelected) -> None:
        event.stop()
        self.query_one("#base-model", Input).value = display_path(event.path)

    @on(DirectoryTree.DirectorySelected)
    def _folder_picked(self, event: DirectoryTree.DirectorySelected) -> None:
        event.stop()
        if (event.path / "model_index.json").exists() or (event.path / "config.json").exists():
            self.query_one("#base-model", Input).value = display_path(event.path)

    @work(thread=True, exclusive=True, exit_on_error=False, group="inspect")
    def inspect(self, path: str) -> None:
        """Read the model's headers (never its weights) in a thread."""
        if not path:
            return
        try:
            from loratui.config.base_model import inspect_base_model

            info = call_cancellable(inspect_base_model, path)
        except Cancelled:
            return
        except Exception as exc:  # inspect never raises for bad files; this is a bug guard
            self.post_message(WorkFailed("Inspecting the base model failed", f"{type(exc).__name__}: {exc}"))
            return
        self.post_message(ModelInspected(path, info))

    @on(ModelInspected)
    def _inspected_result(self, message: ModelInspected) -> None:
        if message.path != self.query_one("#base-model", Input).value.strip():
            message.stop()
            return  # an older path; the newer one is being inspected
        usable, text = describe_model(message.info)
        task = task_of(message.info)
        if usable and task and task != self.state.task:
            text += f" Task set to {task} to match."
            self._set_task_buttons(task)
            self.post_message(
                ValueChosen("task_type", "text-generation" if task == "text" else "image-generation")
            )
        self.say(("✓ " if usable else "✗ ") + text)
        self.set_class(not usable, "-problem")
        self.post_message(ValueChosen("base_model", message.path))
