"""Screenshots of every wizard step and of the training view, at 80x24 and 120x40 (pytest-textual-snapshot).

The 120x40 wizard steps are marked slow (run them with `-m slow`) to keep the default run short.

Everything on screen is fixed: fake NVML, relative paths inside a temporary project folder, a fixed planner
result, synthetic run events with fixed times. Update with `pytest tests/test_tui_snapshots.py
--snapshot-update`, then copy the SVGs to docs/screens/ (test_docs_screens_match_snapshots checks it).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from loratui.gpu.fake_nvml import EXAMPLE_SPEC
from loratui.tui.testing import fake_planner, wait_for, write_synthetic_run
from loratui.tui.training_app import TrainingApp
from loratui.tui.wizard_app import WizardApp
from loratui.tui.wizard_state import WizardState

sys.path.insert(0, str(Path(__file__).parent))
from data_fixtures import build_good_image_dataset, pattern, save  # noqa: E402

SIZES = {"80x24": (80, 24), "120x40": (120, 40)}
SNAPSHOTS = Path(__file__).parent / "__snapshots__" / "test_tui_snapshots"
SCREENS = Path(__file__).parent.parent / "docs" / "screens"


@pytest.fixture
def project(tmp_path, monkeypatch, tiny_sd15) -> Path:
    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    (work / "models" / "sd15").symlink_to(tiny_sd15, target_is_directory=True)
    build_good_image_dataset(work / "data" / "style", n=4)
    save(pattern(seed=9), work / "data" / "style" / "nocap.png")
    spec = tmp_path / "nvml.json"
    spec.write_text(json.dumps(EXAMPLE_SPEC))
    monkeypatch.setenv("LORATUI_FAKE_NVML", str(spec))
    monkeypatch.setattr("loratui.tui.steps.settings.planner", fake_planner)
    monkeypatch.chdir(work)
    return work


def wizard(values: dict | None = None) -> WizardApp:
    state = WizardState(values=values or {})
    return WizardApp(state, telemetry_interval=0, poll_interval=0.05)


def no_blink(app) -> None:
    for widget in app.screen.query("Input"):
        widget.cursor_blink = False


def goto(step: int, ready=None):
    """A run_before that walks to `step` (0-based) and waits until `ready(app)` holds."""

    async def run_before(pilot) -> None:
        app = pilot.app
        await wait_for(pilot, lambda: app.state.gpu is not None)
        for _ in range(step):
            await pilot.press("ctrl+n")
        if ready is not None:
            await wait_for(pilot, lambda: ready(app))
        no_blink(app)
        await pilot.pause(0.2)

    return run_before


VALUES = {"base_model": "models/sd15", "train_data_dir": "data/style", "trigger_word": "mychar"}
STEPS = {
    "1_hardware": (0, None),
    "2_model": (
        1,
        lambda app: (
            "Found a Stable Diffusion 1.x" in str(app.screen.step.query_one(".step-summary").render())
        ),
    ),
    "3_dataset": (2, lambda app: app.screen.step.report is not None),
    "4_captions": (3, lambda app: len(app.screen.step.rows) == 5),
    "5_settings": (4, lambda app: app.screen.step._options),
    "6_review": (5, None),
    "7_train": (6, None),
}


@pytest.mark.parametrize("size", ["80x24", pytest.param("120x40", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", list(STEPS))
def test_wizard_step(snap_compare, project, name: str, size: str) -> None:
    """Each wizard step with the tiny SD model and a 5-image dataset."""
    index, ready = STEPS[name]
    if name == "2_model":

        async def run_before(pilot) -> None:
            await goto(1)(pilot)
            await pilot.press(*"models/sd15")
            await wait_for(pilot, lambda: ready(pilot.app))
            no_blink(pilot.app)
            await pilot.pause(0.2)

        assert snap_compare(wizard(), terminal_size=SIZES[size], run_before=run_before)
        return
    assert snap_compare(wizard(VALUES), terminal_size=SIZES[size], run_before=goto(index, ready))


def test_wizard_light_theme(snap_compare, project) -> None:
    """The dataset step in the light theme (theme variables only: both themes stay readable)."""
    app = wizard(VALUES)
    app.theme = "textual-light"
    assert snap_compare(app, terminal_size=(80, 24), run_before=goto(2, STEPS["3_dataset"][1]))


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("state", ["running", "finished"])
def test_training_view(snap_compare, tmp_path, monkeypatch, state: str, size: str) -> None:
    """The training view fed by a synthetic events.jsonl (loss curve, OOM recovery, checkpoints, export)."""
    spec = tmp_path / "nvml.json"
    spec.write_text(json.dumps(EXAMPLE_SPEC))
    monkeypatch.setenv("LORATUI_FAKE_NVML", str(spec))
    finished = state == "finished"
    run = write_synthetic_run(
        tmp_path / "runs" / "my_style-20261121-120000",
        steps=200 if finished else 120,
        finished=finished,
        pid=None if finished else os.getpid(),
    )
    app = TrainingApp(run, telemetry_interval=0, poll_interval=0.05)

    async def run_before(pilot) -> None:
        await wait_for(
            pilot, lambda: pilot.app.screen.view is not None and pilot.app.screen.view.state == state
        )
        await pilot.pause(0.3)

    assert snap_compare(app, terminal_size=SIZES[size], run_before=run_before)


def test_training_view_preference(snap_compare, tmp_path, monkeypatch) -> None:
    """A DPO run: the reward margin chart next to the loss curve, with the reward accuracy."""
    spec = tmp_path / "nvml.json"
    spec.write_text(json.dumps(EXAMPLE_SPEC))
    monkeypatch.setenv("LORATUI_FAKE_NVML", str(spec))
    run = write_synthetic_run(
        tmp_path / "runs" / "my_dpo-20261121-120000", steps=120, oom_at=None, pid=os.getpid(), preference=True
    )
    app = TrainingApp(run, telemetry_interval=0, poll_interval=0.05)

    async def run_before(pilot) -> None:
        await wait_for(pilot, lambda: pilot.app.screen.view is not None and pilot.app.screen.view.step == 120)
        await pilot.pause(0.3)

    assert snap_compare(app, terminal_size=SIZES["120x40"], run_before=run_before)


def test_docs_screens_match_snapshots() -> None:
    """docs/screens/ holds a copy of every snapshot (listed in docs/tui.md)."""
    snapshots = sorted(p.name for p in SNAPSHOTS.glob("*.svg"))
    assert snapshots, "no snapshots yet: run with --snapshot-update"
    doc = (SCREENS.parent / "tui.md").read_text(encoding="utf-8")
    for name in snapshots:
        copy = SCREENS / name
        assert copy.exists() and copy.read_bytes() == (SNAPSHOTS / name).read_bytes(), (
            f"refresh docs/screens/{name}"
        )
        assert f"screens/{name}" in doc, f"docs/tui.md does not list {name}"


def copy_snapshots_to_docs() -> (
    None
):  # pragma: no cover - maintenance helper: python tests/test_tui_snapshots.py
    SCREENS.mkdir(parents=True, exist_ok=True)
    for path in SNAPSHOTS.glob("*.svg"):
        shutil.copyfile(path, SCREENS / path.name)


if __name__ == "__main__":  # pragma: no cover
    copy_snapshots_to_docs()
