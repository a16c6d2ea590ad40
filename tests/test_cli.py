"""CLI surface: help everywhere, light start-up, honest exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from loratui.cli.app import app

COMMANDS = [
    ["wizard"],
    ["train"],
    ["gpu"],
    ["recommend"],
    ["presets"],
    ["presets", "list"],
    ["presets", "show"],
    ["check"],
    ["caption"],
    ["export"],
    ["sample"],
    ["runs"],
    ["attach"],
    ["demo"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_every_command_has_help(command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and len(result.output.splitlines()) > 4


def test_root_help_lists_every_command() -> None:
    result = CliRunner().invoke(app, ["--help"])
    for name in (
        "wizard",
        "train",
        "gpu",
        "recommend",
        "presets",
        "check",
        "caption",
        "export",
        "sample",
        "runs",
        "attach",
        "demo",
    ):
        assert f"  {name} " in result.output


def test_help_imports_no_heavy_module() -> None:
    code = (
        "import sys\n"
        "sys.argv = ['loratui', '--help']\n"
        "from loratui.cli.app import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'peft', 'textual', 'accelerate')"
        " if m in sys.modules]\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY=\n" in out, out


def test_not_implemented_commands_exit_2_honestly() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--config", "x.yaml", "--gpus", "2"])
    assert result.exit_code == 2 and "not implemented yet" in result.output


def test_train_without_config_is_unusable() -> None:
    result = CliRunner().invoke(app, ["train"])
    assert result.exit_code == 2 and "--config" in result.output


def test_train_dry_run_shows_sources(tmp_path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"base_model: {model}\ntrain_data_dir: {data}\nlora_rank: 4\n")
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "train",
            "--config",
            str(cfg),
            "--preset",
            "12gb",
            "--set",
            "epochs=3",
            "--batch-size",
            "5",
            "--dry-run",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    import json

    payload = json.loads(result.output)
    assert payload["config"]["lora_rank"] == 4 and payload["sources"]["lora_rank"] == f"config {cfg}:3"
    assert payload["config"]["epochs"] == 3 and payload["sources"]["epochs"] == "--set"
    assert payload["config"]["batch_size"] == 5 and payload["sources"]["batch_size"] == "flag"
    assert payload["sources"]["optimizer"] == "preset 12gb[sd15]"
    table = runner.invoke(app, ["train", "--config", str(cfg), "--dry-run"], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "from" in table.output and "default" in table.output


def test_train_reports_config_errors_all_at_once(tmp_path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("lora_rnak: 8\nbatch_size: four\nmixed_precision: fp8\n")
    result = CliRunner().invoke(app, ["train", "--config", str(cfg), "--dry-run"])
    assert result.exit_code == 1
    assert "3 problems" in result.output and "lora_rank" in result.output


def test_dry_run_names_missing_paths(tmp_path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("base_model: ./missing.safetensors\ntrain_data_dir: ./missing\n")
    result = CliRunner().invoke(app, ["train", "--config", str(cfg), "--dry-run"], env={"COLUMNS": "200"})
    assert (
        result.exit_code == 1 and "does not exist" in result.output and "missing.safetensors" in result.output
    )


def test_version() -> None:
    from loratui import __version__

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output
