"""Resuming as loratui prints it: `loratui train --resume runs/<run>` needs no --config (the run directory carries
its config), and `--resume latest` also finds a run whose output_dir (and so its name) changed since."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from llm_helpers import single_thread, write_llm_yaml
from typer.testing import CliRunner

from loratui.cli.app import app
from loratui.config import load_config
from loratui.runs.checkpoints import resolve_resume, write_checkpoint
from loratui.runs.events import read_events
from loratui.runs.rundir import create_run_dir, list_runs
from loratui.train.process import launch as core

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from single_thread()


def _config(tmp_path: Path, tiny_llama: Path, **overrides) -> Path:
    return write_llm_yaml(tmp_path, tiny_llama, **overrides)


def _fake_run(tmp_path: Path, config: Path, name: str = "adapter"):
    """A run directory as `prepare_run` leaves it, with one checkpoint (its files only)."""
    resolved = load_config(config)
    run, _ = core.prepare_run(resolved, resume=None, overwrite=False)
    core.release_locks(run)
    checkpoint = write_checkpoint(
        run,
        2,
        lora_state={"base_model.model.layer.lora_A.weight": torch.zeros(4, 8)},
        training_state={"optimizer": {}},
        meta={},
        config_yaml=run.config_path.read_text(encoding="utf-8"),
    )
    return run, checkpoint


def test_resume_of_a_run_directory_needs_no_config(
    tmp_path: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run, _ = _fake_run(tmp_path, _config(tmp_path, tiny_llama))
    monkeypatch.chdir(tmp_path)
    for spec in (str(run.path), f"runs/{run.name}", str(run.checkpoints_dir / "step-2")):
        result = CliRunner().invoke(app, ["train", "--resume", spec, "--dry-run", "--json"])
        assert result.exit_code == 0, result.output
        payload = json.loads(result.output)
        assert payload["config"]["base_model"] == str(tiny_llama)
        assert payload["sources"]["base_model"] != "default"
    # `latest` without a config: the newest run with a checkpoint in --runs-dir
    result = CliRunner().invoke(
        app, ["train", "--resume", "latest", "--runs-dir", str(tmp_path / "runs"), "--dry-run", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["config"]["output_dir"] == str(tmp_path / "adapter")
    missing = CliRunner().invoke(app, ["train", "--resume", str(tmp_path / "nope"), "--dry-run"])
    assert missing.exit_code != 0 and "no run or checkpoint called" in missing.output
    assert "base_model: not set" not in missing.output


def test_the_printed_resume_command_resumes(tmp_path: Path, tiny_llama: Path) -> None:
    """Exactly as the "restarts used up" message prints it: `loratui train --resume RUN_DIR`, no --config."""
    config = _config(tmp_path, tiny_llama)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    base = [sys.executable, "-m", "loratui", "train", "--no-tui"]
    first = subprocess.run(
        [*base, "--config", str(config)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert first.returncode == 0, first.stdout + first.stderr
    run = list_runs(tmp_path / "runs")[0].run
    resumed = subprocess.run(
        [*base, "--resume", f"runs/{run.name}", "--max-steps", "4"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "base_model: not set" not in resumed.stdout + resumed.stderr
    assert f"resuming from runs/{run.name}/checkpoints/step-2" in resumed.stdout
    steps = [e["step"] for e in read_events(run.events_path) if e["type"] == "step"]
    assert steps == [1, 2, 3, 4]


def test_resume_latest_finds_the_run_after_output_dir_changed(tmp_path: Path, tiny_llama: Path) -> None:
    config = _config(tmp_path, tiny_llama)
    run, checkpoint = _fake_run(tmp_path, config)
    other = create_run_dir(tmp_path / "runs", "unrelated")  # a newer run of other data, without checkpoints
    (other.path / "status.json").write_text("{}")
    moved = _config(tmp_path, tiny_llama, output_dir=str(tmp_path / "adapter-v2"))
    resolved = load_config(moved)
    assert resolved.config.name == "adapter-v2"  # so the run name prefix no longer matches
    like = {"base_model": resolved.config.base_model, "train_data_dir": resolved.config.train_data_dir}
    assert resolve_resume("latest", tmp_path / "runs", resolved.config.name, like=like) == (run, checkpoint)
    resumed, found = core.prepare_run(resolved, resume="latest", overwrite=False)
    core.release_locks(resumed)
    assert (resumed, found) == (run, checkpoint)
    assert load_config(run.config_path).config.output_dir == str(tmp_path / "adapter-v2")  # exports there now
    other_data = _config(
        tmp_path, tiny_llama, output_dir=str(tmp_path / "x"), train_data_dir=str(tmp_path / "o")
    )
    with pytest.raises(FileNotFoundError, match="no run with a checkpoint"):
        unrelated = load_config(other_data).config
        resolve_resume(
            "latest",
            tmp_path / "runs",
            unrelated.name,
            like={"base_model": "b", "train_data_dir": "elsewhere"},
        )
