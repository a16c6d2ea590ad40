"""Weights & Biases logging next to TensorBoard: a fake `wandb` module records what loratui calls."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
from sd_helpers import events_of, make_image_dataset, make_job, seed_like_config

from loratui.runs.rundir import create_run_dir
from loratui.train.loop.loggers import LoggerSettings, wandb_mode
from loratui.train.loop.reporting import Reporter


class FakeRun:
    def __init__(self, calls: list):
        self.calls = calls

    def log(self, data: dict, step: int | None = None) -> None:
        self.calls.append(("log", dict(data), step))

    def finish(self) -> None:
        self.calls.append(("finish",))


@pytest.fixture
def fake_wandb(monkeypatch):
    calls: list = []
    module = types.ModuleType("wandb")

    def init(**kwargs):
        calls.append(("init", kwargs))
        return FakeRun(calls)

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return calls


def _logged(calls: list) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for call in calls:
        if call[0] == "log":
            for tag, value in call[1].items():
                out.setdefault(tag, {})[call[2]] = value
    return out


def test_reporter_sends_scalars_to_wandb_and_tensorboard(fake_wandb, tmp_path):
    run = create_run_dir(tmp_path / "runs", "wb")
    settings = LoggerSettings(
        log_with=("tensorboard", "wandb"),
        wandb_project="proj",
        wandb_run_name="nice",
        config={"lora_rank": 4},
    )
    reporter = Reporter(run, total_steps=2, console=False, loggers=settings)
    reporter.step(1, 0, 0.5, 1e-4, 2, grad_norm=0.25)
    reporter.step(2, 0, 0.25, 5e-5, 2)
    reporter.tensorboard.add_scalar("eval_loss", 0.75, 2)  # what trainers call for extra curves
    assert reporter.tensorboard.names == ["tensorboard", "wandb"]
    reporter.close()
    init = fake_wandb[0]
    assert init[0] == "init"
    assert init[1]["project"] == "proj" and init[1]["name"] == "nice" and init[1]["mode"] == "offline"
    assert init[1]["config"] == {"lora_rank": 4} and Path(init[1]["dir"]) == run.logs_dir
    logged = _logged(fake_wandb)
    assert logged["loss"] == {1: 0.5, 2: 0.25}
    assert logged["lr"] == {1: 1e-4, 2: 5e-5}
    assert logged["grad_norm"] == {1: 0.25}
    assert logged["eval_loss"] == {2: 0.75}
    assert fake_wandb[-1] == ("finish",)
    assert list(run.logs_dir.glob("events.out.tfevents.*"))  # TensorBoard still written
    infos = [e["message"] for e in events_of(run, "info")]
    assert any("wandb sync" in m for m in infos)


def test_wandb_mode_is_offline_unless_the_user_chose(monkeypatch):
    assert wandb_mode({}) == "offline"
    assert wandb_mode({"WANDB_MODE": "online"}) is None
    assert wandb_mode({"WANDB_API_KEY": "x" * 40}) is None


def test_missing_wandb_names_the_extra_and_tensorboard_goes_on(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    run = create_run_dir(tmp_path / "runs", "nowb")
    reporter = Reporter(
        run, total_steps=1, console=False, loggers=LoggerSettings(log_with=("tensorboard", "wandb"))
    )
    reporter.step(1, 0, 0.5, 1e-4, 1)
    assert reporter.tensorboard.names == ["tensorboard"]
    reporter.close()
    warnings = [e["message"] for e in events_of(run, "warning")]
    assert any('pip install "loratui[wandb]"' in m for m in warnings)


def test_log_with_spellings(tmp_path):
    from loratui.config import load_config
    from loratui.config.errors import ConfigError

    def resolve(text: str):
        path = tmp_path / "c.yaml"
        path.write_text("base_model: x.safetensors\ntrain_data_dir: d\n" + text, encoding="utf-8")
        return load_config(path).config

    assert resolve("").log_with == ["tensorboard"]
    assert resolve("log_with: wandb\n").log_with == ["wandb"]
    assert resolve("log_with: [tensorboard, wandb]\n").log_with == ["tensorboard", "wandb"]
    assert resolve("log_with: all\n").log_with == ["tensorboard", "wandb"]
    assert resolve("report_to: none\n").log_with == []
    assert resolve("log_tracker_name: mine\n").wandb_project == "mine"
    with pytest.raises(ConfigError, match="log_with"):
        resolve("log_with: comet\n")
    with pytest.raises(ConfigError, match="WANDB_API_KEY"):
        resolve("wandb_api_key: abc\n")


def test_sd_run_logs_its_losses_to_wandb(fake_wandb, tiny_sd15, tmp_path):
    torch.set_num_threads(1)
    data = make_image_dataset(tmp_path / "data", 2)
    config = seed_like_config(
        tmp_path, tiny_sd15, data, batch_size=1, max_steps=2, save_steps=None, log_with="wandb"
    )
    job = make_job(config)
    from loratui.train.sd.trainer import train

    assert train(job) == "finished"
    steps = {e["step"]: e["loss"] for e in events_of(job.run, "step")}
    assert _logged(fake_wandb)["loss"] == steps
    assert fake_wandb[0][1]["name"] == job.run.name and fake_wandb[-1] == ("finish",)
    assert not list(job.run.logs_dir.glob("events.out.tfevents.*"))  # log_with: wandb alone


def test_dry_run_warns_before_training_when_wandb_is_missing(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from loratui.cli.app import app

    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setenv("LORATUI_FAKE_NVML", "none")
    (tmp_path / "data").mkdir()
    config = tmp_path / "c.yaml"
    config.write_text(
        "base_model: runwayml/stable-diffusion-v1-5\ntask_type: image-generation\n"
        f"train_data_dir: {tmp_path / 'data'}\nlog_with: [tensorboard, wandb]\n",
        encoding="utf-8",
    )
    result = CliRunner().invoke(app, ["train", "--config", str(config), "--dry-run"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert 'pip install "loratui[wandb]"' in result.output
