"""The text path through the real CLI: train (worker subprocess), export --merge, sample --compare, demo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from llm_helpers import records, single_thread, write_jsonl
from typer.testing import CliRunner

from loratui.cli.app import app
from loratui.runs.rundir import list_runs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from single_thread()


def _dataset_with_a_bad_line(folder: Path) -> Path:
    path = write_jsonl(folder / "qa.jsonl", records("prompt_response", 6))
    lines = path.read_text(encoding="utf-8").splitlines()
    lines.insert(2, '{"prompt": "unterminated", "response": ')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _config(tmp_path: Path, base: Path, data: Path) -> Path:
    config = {
        "base_model": str(base),
        "task_type": "text-generation",
        "train_data_dir": str(data),
        "output_dir": str(tmp_path / "adapter"),
        "runs_dir": str(tmp_path / "runs"),
        "lora_rank": 4,
        "max_steps": 2,
        "batch_size": 2,
        "max_seq_len": 160,
        "mixed_precision": "no",
    }
    path = tmp_path / "llm.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    return path


def test_bad_dataset_is_refused_before_training(tmp_path: Path, tiny_llama: Path) -> None:
    config = _config(tmp_path, tiny_llama, _dataset_with_a_bad_line(tmp_path / "data"))
    result = CliRunner().invoke(app, ["train", "--config", str(config), "--no-tui"])
    assert result.exit_code == 1, result.output
    assert "qa.jsonl:3" in result.output and "--skip-checks" in result.output
    assert not (tmp_path / "runs").exists() or not list_runs(tmp_path / "runs")


def test_train_export_sample_through_the_cli(tmp_path: Path, tiny_llama: Path) -> None:
    config = _config(tmp_path, tiny_llama, _dataset_with_a_bad_line(tmp_path / "data"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "loratui", "train", "--config", str(config), "--no-tui", "--skip-checks"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "started: 2 steps" in out and "step 2 " in out and "finished" in out
    assert "warning: skipped 1 unusable record(s)" in out and "qa.jsonl:3" in out  # skipped, with the line
    assert f"exported: {(tmp_path / 'adapter').resolve()}" in out and "use it: from peft import" in out
    run = list_runs(tmp_path / "runs")[0].run
    assert json.loads(run.status_path.read_text())["state"] == "finished"
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    runner = CliRunner()
    merged = runner.invoke(app, ["export", str(run.path), "--merge", "--dtype", "bf16"])
    assert merged.exit_code == 0, merged.output
    assert (run.path / "exports" / "merged-bf16" / "config.json").is_file()
    sample = runner.invoke(
        app,
        [
            "sample",
            "--base",
            str(tiny_llama),
            "--lora",
            str(tmp_path / "adapter"),
            "--prompt",
            "患者：头痛三天，体温正常，该吃什么药？",
            "--compare",
            "--max-new-tokens",
            "8",
        ],
    )
    assert sample.exit_code == 0, sample.output
    assert "--- base ---" in sample.output and "--- base + LoRA ---" in sample.output


def test_text_demo(tmp_path: Path, tiny_llama: Path) -> None:
    from loratui.demo.text_demo import run_demo

    shutil.copytree(tiny_llama, tmp_path / "models" / "tiny-llama")  # reused: same build settings

    class Plain:
        def __init__(self) -> None:
            self.lines: list[str] = []

        def print(self, text: object = "", **_: object) -> None:
            self.lines.append(str(text))

    console = Plain()
    assert run_demo(tmp_path, steps=4, console=console) == 0
    text = "\n".join(console.lines)
    assert "dataset check: 0 error(s)" in text and "validation loss on held-out answers" in text
    assert f"adapter: {tmp_path / 'adapter'}" in text and "loratui train --config" in text
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert run_demo(tmp_path, steps=2, console=Plain()) == 0  # runs again in the same folder


@pytest.mark.slow
def test_sigterm_checkpoints_then_resume_finishes(tmp_path: Path, tiny_llama: Path) -> None:
    import signal
    import time

    from loratui.runs.events import read_events

    data = write_jsonl(tmp_path / "data" / "qa.jsonl", records("prompt_response", 8))
    config = _config(tmp_path, tiny_llama, data)
    values = yaml.safe_load(config.read_text(encoding="utf-8"))
    values["max_steps"] = 400
    config.write_text(yaml.safe_dump(values, allow_unicode=True), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "loratui", "train", "--config", str(config), "--no-tui"]
    started = subprocess.run(
        [*cmd, "--detach"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert started.returncode == 0, started.stderr
    run = list_runs(tmp_path / "runs")[0].run
    deadline = time.time() + 120
    while not any(e["type"] == "step" for e in read_events(run.events_path)):
        assert time.time() < deadline
        time.sleep(0.2)
    os.kill(json.loads(run.status_path.read_text())["pid"], signal.SIGTERM)
    while not any(e["type"] == "run_stopped" for e in read_events(run.events_path)):
        assert time.time() < deadline
        time.sleep(0.2)
    stopped_at = run.latest_checkpoint()
    assert stopped_at is not None and int(stopped_at.name.split("-")[1]) < 400
    resumed = subprocess.run(
        [*cmd, "--resume", str(run.path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    steps = [e["step"] for e in read_events(run.events_path) if e["type"] == "step"]
    assert steps == list(range(1, 401))
