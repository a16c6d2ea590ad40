"""The wizard's Start button path (`loratui.tui.steps.train.start_run`): the run directory and launch.json are
made by the same core as `loratui train`, the chosen GPU is recorded for the worker, and the TUI's own
environment is left alone."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from loratui.config import ResolvedConfig, TrainConfig
from loratui.runs.launch_file import read_launch
from loratui.train.process import launch as core
from loratui.train.process.launcher import launcher_command
from loratui.train.process.supervisor import Supervisor
from loratui.tui.screens.training import default_gpu_index
from loratui.tui.steps.train import start_run
from loratui.tui.wizard_state import GpuChoice


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list:
    """start_worker stands in for the supervisor process (the core function is the one under test)."""
    runs: list = []

    def fake_start_worker(run):
        runs.append(run)
        return SimpleNamespace(pid=4321)

    monkeypatch.setattr(core, "start_worker", fake_start_worker)
    return runs


def _resolved(tmp_path: Path) -> ResolvedConfig:
    cfg = TrainConfig(
        task_type="text-generation",
        model_family="llm",
        base_model=str(tmp_path / "model"),
        train_data_dir=str(tmp_path / "data"),
        runs_dir=str(tmp_path / "runs"),
        run_name="tui-run",
    )
    return ResolvedConfig(cfg, {}, "llm")


def test_start_run_records_the_gpu_in_launch_json(
    tmp_path: Path, started: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    before = dict(os.environ)
    gpu = GpuChoice(index=2, name="Card", total_bytes=8 * 2**30, usable_bytes=7 * 2**30)

    run_dir, pid = start_run(_resolved(tmp_path), gpu)

    assert dict(os.environ) == before  # the TUI process keeps its environment
    assert pid == 4321 and len(started) == 1 and started[0].path == run_dir
    assert run_dir.parent == tmp_path / "runs" and run_dir.name.startswith("tui-run-")
    launch = read_launch(run_dir)
    assert launch.gpu == "2" and launch.resume_from is None and not launch.overwrite
    assert (run_dir / "config.yaml").is_file() and (run_dir / "status.json").is_file()
    # the supervisor hands the recorded GPU to the worker; the training view shows that GPU
    supervisor = Supervisor(started[0])
    _, env = launcher_command(run_dir, supervisor.spec, gpu=supervisor.launch.gpu)
    assert env["CUDA_VISIBLE_DEVICES"] == "2"
    assert default_gpu_index(run_dir) == 2


def test_start_run_without_a_gpu_inherits_the_environment(
    tmp_path: Path, started: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    cpu = GpuChoice(index=None, name="CPU", total_bytes=None, usable_bytes=None)
    run_dir, _ = start_run(_resolved(tmp_path), cpu)
    assert read_launch(run_dir).gpu is None and os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    supervisor = Supervisor(started[0])
    _, env = launcher_command(run_dir, supervisor.spec, gpu=supervisor.launch.gpu)
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
    assert default_gpu_index(run_dir) == 1
