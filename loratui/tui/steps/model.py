"""Step 2: image or text task, and the base model (path input or file browser) with its family detected; a
FLUX.1 / Chroma transformer file also gets the separate autoencoder, CLIP-L and T5-XXL files it needs."""

from __future__ import annotations

from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import DirectoryTree, Input, Select, Static

from loratui.tui.background import Cancelled, call_cancellable
from loratui.tui.flux_choices import (
    PART_KEYS,
    PART_LABELS,
    VARIANT_NAMES,
    FluxModel,
    flux_model,
    is_flux_family,
    part_status,
)
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
TASK_OPTIONS = [("Image: SD, SDXL, FLUX.1, Chroma LoRA", "image"), ("Text: LLM LoRA", "text")]
PART_PLACEHOLDERS = {
    "vae": "ae.safetensors (ComfyUI/models/vae)",
    "clip_l": "clip_l.safetensors (ComfyUI/models/text_encoders)",
    "t5xxl": "t5xxl_fp16.safetensors (ComfyUI/models/text_encoders)",
}
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
    elif is_flux_family(info.family):
        name = VARIANT_NAMES.get(info.variant or "", FAMILY_NAMES.get(info.family, info.family))
        size = f", transformer about {fmt_params(info.params)} parameters" if info.params else ""
        text = f"Found a {name} model{size} ({what})."
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
        self._flux: FluxModel | None = None  # the chosen base model, when it is a Flux transformer file
        self._model_text = ""  # the sentence about the base model (the Flux file lines follow it)

    def compose(self) -> ComposeResult:
        yield self.heading()
        with Horizontal(classes="field"):
            yield Static("Task", classes="label")
            yield Select(TASK_OPTIONS, value="image", allow_blank=False, id="task", compact=True)
        with Horizontal(classes="field"):
            yield Static("Base model", classes="label")
            yield Input(
                placeholder="folder or file, e.g. models/sd15 or flux1-dev.safetensors",
                id="base-model",
                compact=True,
            )
        with Vertical(id="flux-files"):
            for part in PART_KEYS:
                with Horizontal(classes="field part-field", id=f"part-field-{part}"):
                    yield Static(PART_LABELS[part], classes="label")
                    yield Input(
                        placeholder=PART_PLACEHOLDERS[part], id=f"part-{part}", compact=True, classes="part"
                    )
        yield self.summary()
        yield ModelFolders(self.browse_root, id="browser")

    def enter(self) -> None:
        value = str(self.state.get("base_model") or "")
        field = self.query_one("#base-model", Input)
        if value and field.value != value:
            field.value = value
        self._set_task_buttons(self.state.task)
        for part in PART_KEYS:
            text = str(self.state.values.get(part) or "")
            part_field = self.query_one(f"#part-{part}", Input)
            if part_field.value != text:
                part_field.value = text
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
        part = self._part_of(event.path)
        target = f"#part-{part}" if part else "#base-model"
        self.query_one(target, Input).value = display_path(event.path)

    def _part_of(self, path: Path) -> str | None:
        """The separate Flux file a picked file is, when the chosen transformer still needs that file."""
        if self._flux is None or not self._flux.needed or path.suffix.lower() != ".safetensors":
            return None
        from loratui.models.flux.detect import FluxFileError, inspect_flux_file

        try:
            kind = inspect_flux_file(path).kind
        except FluxFileError:
            return None
        return kind if kind in self._flux.needed else None

    @on(Input.Changed, ".part")
    def _part_typed(self, event: Input.Changed) -> None:
        event.stop()
        part = (event.input.id or "").removeprefix("part-")
        value = event.value.strip() or None
        if value != self.state.values.get(part):
            self.post_message(ValueChosen(part, value))
        if self._flux is not None:
            self._show_flux()

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
            if is_flux_family(info.family):
                call_cancellable(flux_model, path)  # reads the file's parts once (cached)
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
        self._flux = flux_model(message.path) if usable and is_flux_family(message.info.family) else None
        self._model_text = ("✓ " if usable else "✗ ") + text
        self._show_flux()
        self.post_message(ValueChosen("base_model", message.path))

    def _show_flux(self) -> None:
        """Show the fields for the separate files the Flux transformer needs, each with what the file is."""
        needed = self._flux.needed if self._flux else ()
        self.query_one("#flux-files").display = bool(needed)
        lines = [self._model_text]
        for part in PART_KEYS:
            self.query_one(f"#part-field-{part}").display = part in needed
            if part not in needed:
                continue
            value = self.query_one(f"#part-{part}", Input).value.strip()
            if not value:
                lines.append(f"✗ {PART_LABELS[part]} (`{part}`): not set; {self._flux.name} needs it.")
                continue
            ok, sentence = part_status(part, value)
            lines.append(("✓ " if ok else "✗ ") + sentence.split("; use ")[0])
        self.say("\n".join(lines))
        self.set_class(any(line.startswith("✗") for line in lines), "-problem")
