"""Step 5: memory-aware settings: the planner's ranked options for the chosen card, each with a predicted
VRAM bar, and the main knobs, whose prediction updates as they are edited. FLUX.1 / Chroma runs also get
their own fields (base weight storage, block swap, T5 length, timestep sampling, guidance for dev)."""

from __future__ import annotations

from typing import Any

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.widgets import Checkbox, DataTable, Input, Select, Static

from loratui.memory.facade import EstimateView, MemoryPlanner, PlannerFacade, Suggestion
from loratui.tui.background import Cancelled, call_cancellable
from loratui.tui.flux_choices import FLUX_KEYS, VARIANT_NAMES, flux_model, is_flux_estimate, is_flux_family
from loratui.tui.formatting import SHORT_KEYS, bar_text, fmt_number
from loratui.tui.messages import EstimateReady, OptionsReady, PresetChosen, ValueChosen
from loratui.tui.steps.advanced import (
    ADVANCED_FIELDS,
    FIELDS_BY_KEY,
    FLUX_FIELDS,
    FieldSpec,
    changes_for,
    parse,
    section_title,
    shown_value,
)
from loratui.tui.steps.base import WizardStep
from loratui.tui.widgets.memory_bar import MemoryBar
from loratui.tui.wizard_state import WizardState
from loratui.util.sizes import format_bytes

# (config key, label) of the knobs edited here; resolution or max_seq_len follows the task.
INT_KNOBS = (("lora_rank", "rank"), ("batch_size", "batch"), ("gradient_accumulation_steps", "accum"))
TASK_KNOB = {"image": ("resolution", "res"), "text": ("max_seq_len", "seq")}


def planner() -> PlannerFacade:
    """The memory planner the step asks (tests put a `PlannerFacade` fake in its place)."""
    return MemoryPlanner()


def copy_state(state: WizardState) -> WizardState:
    """A detached copy for worker threads (they resolve it themselves)."""
    return WizardState(
        config_path=state.config_path, values=dict(state.values), preset=state.preset, gpu=state.gpu
    )


def fmt_band(estimate: EstimateView) -> str:
    """The estimate's relative error band as text: ' ± 10%' (empty without one)."""
    return f" ± {estimate.error_band:.0%}" if estimate.error_band else ""


def fmt_changes(changes: dict[str, object]) -> str:
    """An option's changes: {'lora_rank': 8, 'batch_size': 2} -> 'rank 8, batch 2'."""
    if not changes:
        return "as configured"
    return ", ".join(f"{SHORT_KEYS.get(k, k)} {fmt_number(v)}" for k, v in changes.items())


def estimate_sentence(estimate: EstimateView, usable: int | None) -> str:
    """'Predicted peak 5.3 GiB ± 10% (analytic): fits with 12.2 GiB to spare.'"""
    total = estimate.total_bytes
    method = estimate.method.split(",")[0].split(" (")[0]
    method = f" ({method})" if method else ""
    text = f"Predicted peak {format_bytes(total, short=True)}{fmt_band(estimate)}{method}"
    if usable is None:
        return text + ": no GPU chosen to compare with."
    if total <= usable:
        return (
            text
            + f": fits, {format_bytes(usable - total, short=True)} to spare. Bars: █ in use ▒ this run ░ free."
        )
    return (
        text
        + f": does NOT fit ({format_bytes(total - usable, short=True)} over). Pick an option below or lower the knobs."
    )


def field_text(value: Any) -> str:
    """A value as an advanced input shows it (empty for None)."""
    if value is None:
        return ""
    return format(value, ".12g") if isinstance(value, float) else str(value)


class SettingsStep(WizardStep):
    """Preset, knobs, the planner's options table, the advanced fields, and the predicted-VRAM bar (kept
    in view at the bottom while the step scrolls)."""

    STEP_TITLE = "Settings that fit"
    BINDINGS = [Binding("ctrl+r", "replan", "re-plan")]

    def __init__(self, state, **kwargs) -> None:
        super().__init__(state, **kwargs)
        self._options: list[Suggestion] = []
        self._filling = False
        self._filled = (
            False  # the fields hold the state's values (until then a select shows its first choice)
        )

    def compose(self) -> ComposeResult:
        yield self.heading()
        with Horizontal(classes="field"):
            yield Static("Preset", classes="label")
            yield Select([], prompt="no preset (config and defaults)", id="preset", compact=True)
        with Horizontal(classes="knobs"):
            for key, label in INT_KNOBS:
                yield Static(label, classes="knob-label")
                yield Input(type="integer", id=key, compact=True, classes="knob")
            yield Static("res", classes="knob-label", id="task-knob-label")
            yield Input(type="integer", id="task-knob", compact=True, classes="knob")
            yield Checkbox("checkpointing", id="gradient_checkpointing", compact=True)
        with Horizontal(classes="knobs"):
            yield Static("epochs", classes="knob-label")
            yield Input(type="integer", id="epochs", compact=True, classes="knob")
            yield Static("lr", classes="knob-label")
            yield Input(id="learning_rate", compact=True, classes="knob wide")
            yield Static("output", classes="knob-label")
            yield Input(id="output_dir", compact=True, classes="knob path")
        yield Static("", markup=False, id="flux-title")
        with Grid(id="flux-grid"):
            for spec in FLUX_FIELDS:
                with Horizontal(classes="adv-field", id=f"adv-field-{spec.key}"):
                    yield Static(spec.label, markup=False, classes="adv-label")
                    yield self._advanced_widget(spec)
        yield Static("", markup=False, id="flux-problem")
        with Vertical(id="prediction-box"):
            yield self.summary()
            yield MemoryBar(id="prediction")
        yield Static("", markup=False, id="options-title")
        yield DataTable(id="options", cursor_type="row", zebra_stripes=True)
        yield Static("", markup=False, id="option-note")
        yield Static("Advanced (image)", markup=False, id="advanced-title")
        with Grid(id="advanced"):
            for spec in ADVANCED_FIELDS:
                with Horizontal(classes="adv-field", id=f"adv-field-{spec.key}"):
                    yield Static(spec.label, markup=False, classes="adv-label")
                    yield self._advanced_widget(spec)
        yield Static("", markup=False, id="advanced-problem")

    @staticmethod
    def _advanced_widget(spec: FieldSpec) -> Select | Input:
        widget_id = f"adv-{spec.key}"
        if spec.kind == "select":
            options = [(choice, choice) for choice in spec.choices]
            return Select(options, allow_blank=False, id=widget_id, compact=True, classes="adv-select")
        placeholder = spec.placeholder or ("folder" if spec.kind == "path" else "number")
        return Input(placeholder=placeholder, id=widget_id, compact=True, classes="adv-input")

    def on_mount(self) -> None:
        from loratui.config.presets import load_preset, preset_names

        options = []
        for name in preset_names():
            try:
                options.append((f"{name}: {load_preset(name).vram}", name))
            except Exception:
                options.append((name, name))
        self.query_one("#preset", Select).set_options(options)
        table = self.query_one("#options", DataTable)
        table.add_columns("#", "changes", "peak", "vs card", "speed")

    def focus_first(self) -> None:
        self.query_one("#lora_rank", Input).focus()

    # --- showing the state ---------------------------------------------------------------------
    def enter(self) -> None:
        self.say(
            f"{gpu_title(self.state)}\nPredicting peak memory… (the first prediction for a model "
            "traces a small reference step; later edits update in a moment)"
        )
        self._fill()
        self.estimate(copy_state(self.state))
        self.plan(copy_state(self.state))

    def _fill(self) -> None:
        """Put the current values in the inputs without echoing them back as changes."""
        self._filling = True
        try:
            for key, _ in INT_KNOBS:
                self._set_input(key, str(self.state.get(key)))
            task_key, label = TASK_KNOB[self.state.task]
            self.query_one("#task-knob-label", Static).update(label)
            self._set_input("task-knob", str(self.state.get(task_key)))
            self._set_input("epochs", str(self.state.get("epochs")))
            self._set_input("learning_rate", fmt_number(float(self.state.get("learning_rate"))))
            self._set_input("output_dir", str(self.state.get("output_dir")))
            box = self.query_one("#gradient_checkpointing", Checkbox)
            box.value = bool(self.state.get("gradient_checkpointing"))
            select = self.query_one("#preset", Select)
            wanted = self.state.preset if self.state.preset else Select.NULL
            if select.value != wanted:
                select.value = wanted
            self._fill_advanced()
            self._fill_flux()
        finally:
            self.call_after_refresh(self._done_filling)

    def _fill_advanced(self) -> None:
        """Show the fields that apply to the task, holding the current values."""
        task = self.state.task
        self.query_one("#advanced-title", Static).update(section_title(task))
        for spec in ADVANCED_FIELDS:
            self.query_one(f"#adv-field-{spec.key}").display = spec.applies_to(task)
            value = shown_value(spec, self.state.get)
            if spec.kind == "select":
                select = self.query_one(f"#adv-{spec.key}", Select)
                if select.value != value:
                    select.value = value
            else:
                self._set_input(f"adv-{spec.key}", field_text(value))
                self.query_one(f"#adv-{spec.key}", Input).remove_class("-invalid")
        self.query_one("#advanced-problem", Static).update("")

    def _fill_flux(self) -> None:
        """Show the Flux fields for a FLUX.1 / Chroma run (guidance only for dev), holding the current values."""
        resolved = self.state.try_resolve()
        family = resolved.family if resolved else None
        model = flux_model(self.state.get("base_model")) if is_flux_family(family) else None
        variant = model.variant if model else ("chroma" if family == "chroma" else "dev")
        shown = is_flux_family(family)
        for widget_id in ("#flux-title", "#flux-grid", "#flux-problem"):
            self.query_one(widget_id).display = shown
        if not shown:
            return
        self.query_one("#flux-title", Static).update(
            f"{VARIANT_NAMES.get(variant, 'FLUX.1')}: base storage, block swap, text and timesteps"
        )
        for spec in FLUX_FIELDS:
            self.query_one(f"#adv-field-{spec.key}").display = variant in spec.variants
            value = shown_value(spec, self.state.get)
            if spec.kind == "select":
                select = self.query_one(f"#adv-{spec.key}", Select)
                if select.value != value:
                    select.value = value
            else:
                self._set_input(f"adv-{spec.key}", field_text(value))
                self.query_one(f"#adv-{spec.key}", Input).remove_class("-invalid")
        self.query_one("#flux-problem", Static).update("")

    def _done_filling(self) -> None:
        self._filling = False
        self._filled = True

    def _set_input(self, widget_id: str, value: str) -> None:
        field = self.query_one(f"#{widget_id}", Input)
        if field.value != value:
            field.value = value

    def state_changed(self, key: str) -> None:
        self.estimate(copy_state(self.state))
        if key in ("gpu", "preset", "base_model", "task_type"):
            self.plan(copy_state(self.state))
        if key in ("preset", "option", "task_type"):
            self._fill()
        elif key in FLUX_KEYS:  # an applied option (base storage, block swap) shows in its field
            self._filling = True
            try:
                self._fill_flux()
            finally:
                self.call_after_refresh(self._done_filling)

    # --- edits -------------------------------------------------------------------------------------
    @on(Input.Changed, ".knob")
    def _knob_changed(self, event: Input.Changed) -> None:
        event.stop()
        if self._filling or not event.input.id:
            return
        key = event.input.id
        if key == "task-knob":
            key = TASK_KNOB[self.state.task][0]
        text = event.value.strip()
        value: Any
        try:
            if key == "learning_rate":
                value = float(text)
            elif key == "output_dir":
                value = text or None
            else:
                value = int(text)
        except ValueError:
            return
        if value is not None and key != "output_dir" and value <= 0:
            return
        if value == self.state.get(key):
            return  # the value shown came from the state (filled in), not from an edit
        self.post_message(ValueChosen(key, value))

    @on(Checkbox.Changed, "#gradient_checkpointing")
    def _checkpointing(self, event: Checkbox.Changed) -> None:
        event.stop()
        if not self._filling and event.value != bool(self.state.get("gradient_checkpointing")):
            self.post_message(ValueChosen("gradient_checkpointing", event.value))

    @on(Select.Changed, ".adv-select")
    @on(Input.Changed, ".adv-input")
    def _advanced_changed(self, event: Select.Changed | Input.Changed) -> None:
        event.stop()
        widget = event.select if isinstance(event, Select.Changed) else event.input
        if self._filling or not self._filled or not widget.id:
            return
        spec = FIELDS_BY_KEY[widget.id.removeprefix("adv-")]
        problem_id = "#flux-problem" if spec in FLUX_FIELDS else "#advanced-problem"
        problem = self.query_one(problem_id, Static)
        if isinstance(event, Select.Changed):
            if event.value is Select.NULL:
                return
            value: Any = event.value
        else:
            try:
                value = parse(spec, event.value)
            except ValueError as exc:
                widget.add_class("-invalid")
                problem.update(f"✗ {exc}")
                self.call_after_refresh(problem.scroll_visible, animate=False)
                return
            widget.remove_class("-invalid")
            problem.update("")
        for key, new in changes_for(spec, value).items():
            if new != self.state.get(key) or (new is None and key in self.state.values):
                self.post_message(ValueChosen(key, new))

    @on(Select.Changed, "#preset")
    def _preset(self, event: Select.Changed) -> None:
        event.stop()
        name = None if event.value is Select.NULL else str(event.value)
        if not self._filling and name != self.state.preset:
            self.post_message(PresetChosen(name))

    @on(DataTable.RowSelected, "#options")
    def _apply_option(self, event: DataTable.RowSelected) -> None:
        event.stop()
        index = event.cursor_row
        if 0 <= index < len(self._options):
            changes = self._options[index].changes
            for key, value in changes.items():
                self.post_message(ValueChosen(key, value))
            self.notify(f"Applied option {index + 1}: {fmt_changes(changes)}", timeout=4)

    def action_replan(self) -> None:
        self.plan(copy_state(self.state))

    # --- planner workers ---------------------------------------------------------------------------
    @work(thread=True, exclusive=True, exit_on_error=False, group="estimate")
    def estimate(self, state: WizardState) -> None:
        """Predict the peak for the current settings."""
        resolved = state.try_resolve()
        if resolved is None:
            self.post_message(EstimateReady(None, "No prediction: " + "; ".join(state.problems()[:2])))
            return
        try:
            view = call_cancellable(planner().estimate, resolved)
        except Cancelled:
            return
        except Exception as exc:
            self.post_message(EstimateReady(None, f"No prediction ({type(exc).__name__}: {exc})."))
            return
        if is_flux_family(resolved.family) and not is_flux_estimate(view):
            self.post_message(EstimateReady(None, flux_unavailable(resolved, "prediction")))
            return
        self.post_message(EstimateReady(view))

    @work(thread=True, exclusive=True, exit_on_error=False, group="plan")
    def plan(self, state: WizardState) -> None:
        """Ask the planner for the top options that fit the chosen card."""
        usable = state_gpu_usable(state)
        resolved = state.try_resolve()
        if resolved is None or usable is None:
            why = "choose a GPU or a card size in step 1" if usable is None else "fix the config first"
            self.post_message(OptionsReady([], f"No options: {why}."))
            return
        try:
            tools = planner()
            options = call_cancellable(tools.recommend, resolved, usable, top=5)
            if is_flux_family(resolved.family) and not all(is_flux_estimate(o.estimate) for o in options):
                self.post_message(OptionsReady([], flux_unavailable(resolved, "options")))
                return
            note = ""
            if not options:
                message = call_cancellable(tools.no_fit_message, resolved, usable)
                note = "No option fits: " + " ".join(message.split())
        except Cancelled:
            return
        except Exception as exc:
            self.post_message(OptionsReady([], f"No options ({type(exc).__name__}: {exc})."))
            return
        self.post_message(OptionsReady(list(options), note))

    @on(EstimateReady)
    def _estimate_ready(self, message: EstimateReady) -> None:
        gpu = self.state.gpu
        usable = gpu.usable_bytes if gpu else None
        title = gpu_title(self.state)
        bar = self.query_one("#prediction", MemoryBar)
        if message.estimate is None:
            self.say(f"{title}\n{message.note}")
            bar.total, bar.segments = (gpu.total_bytes if gpu else None), ()
            return
        self.say(f"{title}\n{estimate_sentence(message.estimate, usable)}")
        total = gpu.total_bytes if gpu and gpu.total_bytes else None
        taken = (total - usable) if total and usable is not None else 0
        bar.total = total or int(message.estimate.total_bytes * 1.25)
        bar.segments = ((taken, "others"), (message.estimate.total_bytes, "predicted"))

    @on(OptionsReady)
    def _options_ready(self, message: OptionsReady) -> None:
        message.stop()
        self._options = list(message.options)
        table = self.query_one("#options", DataTable)
        table.clear()
        gpu = self.state.gpu
        if not self._options:
            self.query_one("#options-title", Static).update(message.note or "No options.")
            return
        where = gpu.name if gpu else "this card"
        self.query_one("#options-title", Static).update(f"Options that fit {where} (Enter applies one):")
        total = gpu.total_bytes if gpu and gpu.total_bytes else None
        taken = total - gpu.usable_bytes if total and gpu.usable_bytes is not None else 0
        for rank, option in enumerate(self._options, 1):
            peak_bytes = option.estimate.total_bytes
            speed_text = f"{option.relative_speed:.0%}"
            bar = bar_text(taken, peak_bytes, total) if total else "-"
            table.add_row(
                str(rank),
                fmt_changes(option.changes),
                format_bytes(peak_bytes, short=True),
                bar,
                speed_text,
            )

    @on(DataTable.RowHighlighted, "#options")
    def _option_highlighted(self, event: DataTable.RowHighlighted) -> None:
        event.stop()
        index = event.cursor_row
        if 0 <= index < len(self._options):
            option = self._options[index]
            spare = format_bytes(option.headroom_bytes, short=True)
            note = option.quality_note
            self.query_one("#option-note", Static).update(
                f"Option {index + 1}: {spare} to spare. {note}".strip()
            )


def flux_unavailable(resolved, what: str) -> str:
    """Said instead of a number when the memory planner has no Flux step (its UNet figure would be wrong)."""
    model = flux_model(resolved.config.base_model)
    name = model.name if model else VARIANT_NAMES.get(resolved.family, "FLUX.1")
    return (
        f"No {what} for {name}: the memory planner in this version has no Flux step, and a Stable Diffusion "
        "figure would be wrong. Base storage and block swap still apply when training."
    )


def gpu_title(state: WizardState) -> str:
    """'For GPU 0 (NVIDIA GeForce RTX 4090): 17.5 GiB usable.'"""
    gpu = state.gpu
    if gpu is None or (gpu.index is None and not gpu.total_bytes):
        return "For the CPU (no GPU chosen): predictions are for reference."
    if gpu.index is None:
        return f"For a {gpu.name}: {format_bytes(gpu.usable_bytes, short=True)}."
    return f"For GPU {gpu.index} ({gpu.name}): {format_bytes(gpu.usable_bytes, short=True)} usable now."


def state_gpu_usable(state: WizardState) -> int | None:
    """Usable bytes of the chosen card (None: CPU)."""
    return state.gpu.usable_bytes if state.gpu else None
