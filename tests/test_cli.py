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


def test_gpus_without_a_visible_gpu_exit_2_with_a_hint() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    result = CliRunner().invoke(app, ["train", "--config", "x.yaml", "--gpus", "2"])
    assert result.exit_code == 2 and "--cpu-processes" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gpus", "0,0"], "distinct GPU ids"),
        (["--gpus", "zero"], "a count (4)"),
        (["--cpu-processes", "2", "--gpus", "2"], "cannot be combined"),
        (["--accelerate-config", "missing.yaml"], "no such file"),
    ],
)
def test_bad_multi_process_options_exit_2(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["train", "--config", "x.yaml", *args])
    assert result.exit_code == 2 and message in result.output, result.output


def test_dry_run_with_gpus_states_per_gpu_batch_and_memory(tmp_path) -> None:
    import json

    data = tmp_path / "data"
    data.mkdir()
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"base_model: {model}\ntrain_data_dir: {data}\nbatch_size: 2\ngradient_accumulation_steps: 3\n"
    )
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--config", str(cfg), "--gpus", "0,2", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    spread = json.loads(result.output)["processes"]
    assert (spread["processes"], spread["gpus"], spread["global_batch"]) == (2, [0, 2], 12)
    assert spread["batch_size_per_device"] == 2 and spread["memory_is_per_gpu"]
    table = runner.invoke(
        app, ["train", "--config", str(cfg), "--gpus", "4", "--dry-run"], env={"COLUMNS": "200"}
    )
    assert table.exit_code == 0, table.output
    assert "batch_size 2 per GPU x 3 accumulation x 4 processes = 24 samples" in table.output


def test_accelerate_config_is_read_for_the_process_count(tmp_path) -> None:
    from loratui.train.process.launcher import LaunchError, launcher_command, processes_from_options

    node = tmp_path / "node.yaml"
    node.write_text(
        "distributed_type: MULTI_GPU\nnum_machines: 2\nnum_processes: 8\nmachine_rank: 1\n"
        "main_process_ip: 10.0.0.1\nmain_process_port: 29500\n"
    )
    spec = processes_from_options(None, None, node)
    assert (spec.processes, spec.num_machines, spec.machine_rank, spec.per_node) == (8, 2, 1, 4)
    argv, _env = launcher_command(tmp_path / "run", spec)
    assert argv[1:3] == ["-m", "accelerate.commands.launch"] and str(node.resolve()) in argv
    assert argv[-3:] == ["-m", "loratui.train.process.worker", str(tmp_path / "run")]
    (tmp_path / "fsdp.yaml").write_text("distributed_type: FSDP\nnum_processes: 2\n")
    with pytest.raises(LaunchError, match="add --fsdp"):
        processes_from_options(None, None, tmp_path / "fsdp.yaml")
    argv, env = launcher_command(tmp_path / "run", processes_from_options("0,2", None, None))
    assert (
        env["CUDA_VISIBLE_DEVICES"] == "0,2"
        and "--multi_gpu" in argv
        and argv[argv.index("--num_processes") + 1] == "2"
    )
    assert processes_from_options("1", None, None) is None  # one GPU: a bare worker, as without --gpus
    argv, env = launcher_command(tmp_path / "run", processes_from_options("3,", None, None))  # GPU 3 alone
    assert "--multi_gpu" not in argv and argv[-3:] == [
        "-m",
        "loratui.train.process.worker",
        str(tmp_path / "run"),
    ]
    assert env["CUDA_VISIBLE_DEVICES"] == "3"


def test_launcher_ignores_the_users_default_accelerate_config(tmp_path, monkeypatch) -> None:
    """Our own launches read only the accelerate config written into the run; --gpus ids count among the
    GPUs already visible."""
    from pathlib import Path

    import yaml

    from loratui.train.process.launcher import (
        LaunchError,
        launcher_command,
        physical_gpu_ids,
        processes_from_options,
    )

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    argv, env = launcher_command(tmp_path / "run", processes_from_options("0,2", None, None))
    assert env["CUDA_VISIBLE_DEVICES"] == "4,6"
    own = Path(argv[argv.index("--config_file") + 1])
    assert own == tmp_path / "run" / "accelerate.yaml"
    settings = yaml.safe_load(own.read_text())
    assert (settings["num_processes"], settings["machine_rank"], settings["gpu_ids"]) == (2, 0, "all")
    assert argv[argv.index("--gpu_ids") + 1] == "all" and argv[argv.index("--machine_rank") + 1] == "0"
    with pytest.raises(LaunchError, match="only 4 GPU"):
        physical_gpu_ids([4], "4,5,6,7")
    assert physical_gpu_ids([1], None) == ["1"]
    # a user's file names its own GPUs; --gpus on top of it wins and the file's gpu_ids must not narrow it
    node = tmp_path / "node.yaml"
    node.write_text("distributed_type: MULTI_GPU\nnum_processes: 2\ngpu_ids: '0,1'\n")
    argv, env = launcher_command(tmp_path / "run", processes_from_options("1,3", None, node))
    assert env["CUDA_VISIBLE_DEVICES"] == "5,7" and argv[argv.index("--gpu_ids") + 1] == "all"


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


def _adapter_folder(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    return folder


def test_a_missing_optional_package_names_the_extra(tmp_path, monkeypatch) -> None:
    def needs_gguf(*_args, **_kwargs):
        raise ModuleNotFoundError("No module named 'gguf'", name="gguf")

    monkeypatch.setattr("loratui.cli.cmd_export.run_text_export", needs_gguf)
    result = CliRunner().invoke(app, ["export", str(_adapter_folder(tmp_path))])
    assert result.exit_code == 2
    assert (
        'error: loratui export: the optional package gguf is not installed: pip install "loratui[gguf]"'
        in (result.output)
    )

    def needs_bitsandbytes(**_kwargs):
        raise ModuleNotFoundError("No module named 'bitsandbytes.nn'", name="bitsandbytes.nn")

    monkeypatch.setattr("loratui.cli.cmd_sample.run_image_sample", needs_bitsandbytes)
    sampled = CliRunner().invoke(app, ["sample", "--base", "model.safetensors", "--prompt", "x"])
    assert sampled.exit_code == 2 and 'pip install "loratui[quant]"' in sampled.output
    assert "not implemented" not in result.output + sampled.output


def test_any_other_import_failure_raises_with_its_real_message(tmp_path, monkeypatch) -> None:
    def broken(*_args, **_kwargs):
        raise ModuleNotFoundError("No module named 'peft.tuners.xyz'", name="peft.tuners.xyz")

    monkeypatch.setattr("loratui.cli.cmd_export.run_text_export", broken)
    result = CliRunner().invoke(app, ["export", str(_adapter_folder(tmp_path))])
    assert isinstance(result.exception, ModuleNotFoundError)
    assert "peft.tuners.xyz" in str(result.exception) and "not implemented" not in result.output
