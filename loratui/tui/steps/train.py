"""Step 7: what will run, then start the worker process and switch to the training view."""

from __future__ import annotations

from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.widgets import Button, Static

from loratui.tui.flux_choices import VARIANT_NAMES, flux_model, is_flux_family
from loratui.tui.formatting import display_path
from loratui.tui.messages import TrainingStarted, WorkFailed
from loratui.tui.screens.confirm import ConfirmScreen
from loratui.tui.steps.base import WizardStep
from loratui.tui.wizard_state import GpuChoice


def start_run(resolved, gpu: GpuChoice | None) -> tuple[Path, int]:
    """Create the run directory and start the worker in its own session, as `loratui train` does. The chosen
    GPU is recorded in the run's launch.json (the worker gets it as CUDA_VISIBLE_DEVICES); this process's
    environment is left as it is."""
    from loratui.train.process.launch import prepare_run, start_worker

    chosen = str(gpu.index) if gpu is not None and gpu.index is not None else None
    run, _ = prepare_run(resolved, resume=None, overwrite=False, gpu=chosen)
    process = start_worker(run)
    return run.path, process.pid


def plan_sentences(state) -> str:
    """What pressing Start will do, in plain sentences."""
    resolved = state.try_resolve()
    if resolved is None:
        return "The config does not resolve yet."
    cfg = resolved.config
    kind = "Stable Diffusion" if cfg.task_type == "image-generation" else "LLM"
    family = {"sd15": "1.x", "sd2": "2.x", "sdxl": "XL"}.get(resolved.family, "")
    if is_flux_family(resolved.family):
        model = flux_model(cfg.base_model)
        kind, family = (model.name if model else VARIANT_NAMES.get(resolved.family, "FLUX.1")), ""
    where = "the CPU"
    if state.gpu is not None and state.gpu.index is not None:
        where = f"GPU {state.gpu.index} ({state.gpu.name})"
    length = (
        f"{cfg.max_steps} steps" if cfg.max_steps else f"{cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''}"
    )
    lines = [
        f"Train a {kind} {family} LoRA".replace("  ", " ").rstrip()
        + f", rank {cfg.lora_rank}, batch {cfg.batch_size} × {cfg.gradient_accumulation_steps}, {length}, "
        f"on {where}.",
        f"Data: {display_path(cfg.train_data_dir)}. Output: {display_path(cfg.output_dir)}.",
        f"The run gets its own folder under {display_path(cfg.runs_dir)}/ and keeps going if this terminal "
        "closes; `loratui attach` re-opens it.",
    ]
    if state.saved_path and not state.unsaved_changes:
        lines.append(f"Config saved as {display_path(state.saved_path)}.")
    elif state.saved_path:
        lines.append(f"Changes since saving {display_path(state.saved_path)} are not saved (Review, Ctrl+P).")
    else:
        lines.append("The config is not saved yet (Review, Ctrl+P); the run folder keeps a copy anyway.")
    if state.dataset_errors:
        lines.append(f"The dataset check found {state.dataset_errors} error(s).")
    return "\n".join(lines)


class TrainStep(WizardStep):
    """Summary, problems, and the Start button."""

    STEP_TITLE = "Train"

    def compose(self) -> ComposeResult:
        yield self.heading()
        yield self.summary()
        yield Static("", markup=False, id="train-problems")
        yield Button("Start training", id="start", variant="success", compact=True)

    def enter(self) -> None:
        self.say(plan_sentences(self.state))
        problems = self.state.problems()
        start = self.query_one("#start", Button)
        start.disabled = bool(problems)
        text = ""
        if problems:
            text = "Fix these first (earlier steps or Review):\n" + "\n".join(
                f"  - {p}" for p in problems[:5]
            )
        self.query_one("#train-problems", Static).update(text)

    @on(Button.Pressed, "#start")
    def _start_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if self.state.dataset_errors:

            def answered(yes: bool | None) -> None:
                if yes:
                    self._start()

            question = f"The dataset check found {self.state.dataset_errors} error(s). Train anyway?"
            self.app.push_screen(ConfirmScreen(question, yes="Train anyway", no="Go back"), answered)
            return
        self._start()

    def _start(self) -> None:
        resolved = self.state.try_resolve()
        if resolved is None:
            return
        self.query_one("#start", Button).disabled = True
        self.say("Starting the worker…")
        self.launch(resolved, self.state.gpu)

    @work(thread=True, exclusive=True, exit_on_error=False, group="launch")
    def launch(self, resolved, gpu: GpuChoice | None) -> None:
        """prepare_run + start_worker in a thread (creating folders must not block keys)."""
        launcher = getattr(self.app, "launcher", None) or start_run
        try:
            run_dir, pid = launcher(resolved, gpu)
        except Exception as exc:
            self.post_message(WorkFailed("Could not start training", f"{type(exc).__name__}: {exc}"))
            return
        self.post_message(TrainingStarted(Path(run_dir), pid))
