"""Pure pieces of the TUI (no app running): chart, formatting, wizard state, and import hygiene."""

from __future__ import annotations

import subprocess
import sys

from loratui.config import load_config
from loratui.tui.chart import plot, resample
from loratui.tui.formatting import bar_text, display_path, fmt_duration, fmt_settings_change
from loratui.tui.wizard_state import WizardState, annotated_yaml


def test_braille_chart_draws_each_series_across_the_width() -> None:
    chart = plot([[3.0, 2.0, 1.0], [2.0, 2.0, 2.0]], width=10, height=4)
    assert (chart.low < 1.0) and (chart.high > 3.0)
    assert all(any(chart.bits[row][col] for row in range(4)) for col in range(10))  # connected line
    assert chart.owner[0][0] == 0 and chart.owner[-1][-1] == 0  # falls from top-left to bottom-right
    assert {chart.owner[r][5] for r in range(4)} >= {1}  # the flat series is drawn too
    assert resample(list(range(100)), 10) == [4.5 + 10 * i for i in range(10)]
    assert resample([1.0, float("nan"), 2.0], 10) == [1.0, 2.0]


def test_formatting_helpers(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert display_path(tmp_path / "link" / "x") == "link/x"  # symlinks keep the name the user gave
    assert display_path("models/sd15") == "models/sd15" and display_path(".") == "."
    assert fmt_duration(3725) == "1:02:05" and fmt_duration(None) == "-"
    old, new = {"batch_size": 4, "resolution": 512}, {"batch_size": 2, "resolution": 512}
    assert fmt_settings_change(old, new) == "batch_size 4 → 2"
    assert fmt_settings_change(old, new, short=True) == "batch 4→2"
    assert bar_text(6, 6, 24, 12) == "███▒▒▒░░░░░░"
    assert bar_text(20, 8, 24, 12).endswith("!")


def test_wizard_values_resolve_and_the_saved_yaml_loads_back(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "start.yaml"
    config.write_text("lora_rank: 32\nepochs: 3\n")
    state = WizardState(config_path=config)
    assert state.set("lora_rank", 16) and not state.set("lora_rank", 16)
    assert state.set_preset("12gb")
    resolved = state.resolve()
    assert resolved.sources["lora_rank"] == "wizard" and resolved.sources["epochs"].startswith("config")
    assert resolved.config.cache_latents is True  # from the preset section
    text = annotated_yaml(resolved)
    assert "lora_rank: 16  # wizard" in text and "epochs: 3  # config" in text
    saved = tmp_path / "saved.yaml"
    saved.write_text(text)
    assert load_config(saved).config == resolved.config
    state.set("batch_size", 0)
    assert state.try_resolve() is None and any("batch_size" in p for p in state.problems())


def test_cli_help_does_not_import_textual() -> None:
    code = "import sys; from loratui.cli.app import app; print('textual' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_wizard_refuses_without_a_terminal() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "loratui", "wizard"], capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 2 and "needs an interactive terminal" in result.stderr


def test_attach_without_a_terminal_stays_plain(tmp_path) -> None:
    from loratui.tui.testing import write_synthetic_run

    run = write_synthetic_run(
        tmp_path / "runs" / "demo-20261121-120000", steps=5, total_steps=5, finished=True
    )
    result = subprocess.run(
        [sys.executable, "-m", "loratui", "attach", str(run)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert "exported: output/my_style/my_style.safetensors" in result.stdout and "\x1b[" not in result.stdout


def test_the_fake_planner_implements_the_planner_interface() -> None:
    import inspect

    from loratui.memory.facade import EstimateView, MemoryPlanner, PlannerFacade, Suggestion
    from loratui.tui.steps.settings import planner
    from loratui.tui.testing import FakePlanner, fake_planner

    assert isinstance(fake_planner(), PlannerFacade) and isinstance(planner(), PlannerFacade)
    assert isinstance(planner(), MemoryPlanner)
    for name in ("estimate", "recommend", "no_fit_message"):
        wanted = inspect.signature(getattr(PlannerFacade, name))
        assert inspect.signature(getattr(FakePlanner, name)) == wanted, name
        assert inspect.signature(getattr(MemoryPlanner, name)) == wanted, name
    assert not isinstance(object(), PlannerFacade)

    resolved = load_config(flags={"lora_rank": 8, "batch_size": 2})
    view = fake_planner().estimate(resolved)
    assert isinstance(view, EstimateView) and view.total_bytes == int(1.82 * 1024**3)
    options = fake_planner().recommend(resolved, 8 * 1024**3, top=2)
    assert len(options) == 2 and all(isinstance(o, Suggestion) for o in options)
    assert options[0].headroom_bytes == 8 * 1024**3 - options[0].estimate.total_bytes


def test_planner_views_carry_the_real_estimate_and_option() -> None:
    from loratui.memory.estimate_types import Estimate
    from loratui.memory.facade import EstimateView, Suggestion
    from loratui.memory.recommend import Option

    estimate = Estimate(5 * 1024**3, {"weights": 3 * 1024**3}, "traced reference step, fp16", 0.12, ["n"])
    view = EstimateView.from_estimate(estimate)
    assert (view.total_bytes, view.method, view.error_band) == (
        5 * 1024**3,
        "traced reference step, fp16",
        0.12,
    )
    assert view.breakdown == {"weights": 3 * 1024**3} and view.notes == ("n",)
    option = Option({"batch_size": 1}, None, estimate, 1024, 0.8, "slower")
    suggestion = Suggestion.from_option(option)
    assert suggestion.changes == {"batch_size": 1} and suggestion.estimate == view
    assert (suggestion.headroom_bytes, suggestion.relative_speed, suggestion.quality_note) == (
        1024,
        0.8,
        "slower",
    )


def test_settings_texts_come_from_the_typed_views() -> None:
    from loratui.memory.facade import EstimateView
    from loratui.tui.steps.settings import estimate_sentence, fmt_changes

    view = EstimateView(4 * 1024**3, method="traced reference step (sd15), cuda", error_band=0.1)
    text = estimate_sentence(view, 6 * 1024**3)
    assert text.startswith("Predicted peak 4.0 GiB ± 10% (traced reference step): fits, 2.0 GiB to spare.")
    assert "does NOT fit (1.0 GiB over)" in estimate_sentence(view, 3 * 1024**3)
    assert (
        estimate_sentence(EstimateView(1024**3), None)
        == "Predicted peak 1.0 GiB: no GPU chosen to compare with."
    )
    assert (
        fmt_changes({}) == "as configured"
        and fmt_changes({"lora_rank": 8, "batch_size": 2}) == "rank 8, batch 2"
    )
