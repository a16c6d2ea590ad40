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
