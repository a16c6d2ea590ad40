"""Step 6: the resolved config with where each value came from (for FLUX.1 / Chroma runs, a line with the
Flux choices first), and saving it (atomically, asking before replacing a file)."""

from __future__ import annotations

from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Button, Input, Static

from loratui.tui.flux_choices import flux_model, flux_summary, is_flux_family
from loratui.tui.formatting import display_path
from loratui.tui.messages import ConfigSaved, WorkFailed
from loratui.tui.screens.confirm import ConfirmScreen
from loratui.tui.steps.base import WizardStep
from loratui.tui.widgets.config_view import ConfigView
from loratui.tui.wizard_state import annotated_yaml


def default_save_path(state) -> str:
    """The starting config's path, or '<output name>.yaml' in the current folder."""
    if state.saved_path:
        return display_path(state.saved_path)
    if state.config_path:
        return display_path(state.config_path)
    resolved = state.try_resolve()
    name = resolved.config.name if resolved else "lora"
    return f"{name}.yaml"


class ReviewStep(WizardStep):
    """Problems first, then the annotated YAML; Save writes exactly what is shown."""

    STEP_TITLE = "Review and save"

    def compose(self) -> ComposeResult:
        yield self.heading()
        yield self.summary()
        yield ConfigView(id="config-view")
        with Horizontal(classes="field"):
            yield Static("Save as", classes="label")
            yield Input(id="save-path", compact=True)
            yield Button("Save", id="save", compact=True, variant="primary")

    def focus_first(self) -> None:
        self.query_one(ConfigView).focus()

    def enter(self) -> None:
        resolved = self.state.try_resolve()
        problems = self.state.problems()
        if resolved is not None:
            self.query_one(ConfigView).show(resolved)
        flux = ""
        if resolved is not None and is_flux_family(resolved.family):
            model = flux_model(resolved.config.base_model)
            variant = model.variant if model else ("chroma" if resolved.family == "chroma" else None)
            flux = flux_summary(resolved.config, variant) + "\n"
        if problems:
            lines = "\n".join(f"  - {p}" for p in problems[:4])
            more = f"\n  … and {len(problems) - 4} more" if len(problems) > 4 else ""
            self.say(
                f"{flux}✗ {len(problems)} problem{'s' if len(problems) != 1 else ''} to fix before training:\n"
                f"{lines}{more}"
            )
        else:
            self.say(
                f"{flux}✓ The config resolves with no problems. Values you chose are marked `# wizard`; "
                "save it to rerun with `loratui train --config FILE`."
            )
        self.set_class(bool(problems), "-problem")
        self.query_one("#save-path", Input).value = default_save_path(self.state)

    @on(Input.Submitted, "#save-path")
    @on(Button.Pressed, "#save")
    def _save_pressed(self, event) -> None:
        event.stop()
        text = self.query_one("#save-path", Input).value.strip()
        if not text:
            self.notify("Type a file name to save to.", severity="warning")
            return
        path = Path(text).expanduser()
        if path.exists():

            def answered(yes: bool | None) -> None:
                if yes:
                    self.save(path)

            self.app.push_screen(
                ConfirmScreen(f"{display_path(path)} exists. Replace it?", yes="Replace"), answered
            )
            return
        self.save(path)

    def save(self, path: Path) -> None:
        """Write the annotated YAML atomically (small file: done on the UI thread)."""
        from loratui.util.atomic import atomic_write_text

        resolved = self.state.try_resolve()
        if resolved is None:
            self.notify("The config has problems; fix them before saving.", severity="error")
            return
        try:
            atomic_write_text(path, annotated_yaml(resolved))
        except OSError as exc:
            self.post_message(WorkFailed("Could not save the config", f"{path}: {exc}"))
            return
        self.post_message(ConfigSaved(path))
        self.notify(f"Saved {display_path(path)}. Train with: loratui train --config {display_path(path)}")
