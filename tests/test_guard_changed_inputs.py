"""Resuming with changed inputs: a different base model or dataset (same size) is refused before training
unless --allow-changed-data; a changed learning_rate is applied and reported; a changed rank is one line."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
from llm_helpers import records, single_thread, write_jsonl, write_llm_yaml
from sd_helpers import make_image_dataset, seed_like_config
from typer.testing import CliRunner

from loratui.cli.app import app
from loratui.config import load_config
from loratui.runs.events import read_events
from loratui.runs.launch_file import read_launch
from loratui.train.loop.resume_inputs import ChangedInputs, check_resume_inputs
from loratui.train.process import worker
from loratui.train.process.launch import prepare_run


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from single_thread()


def _run_worker(run) -> int:
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        return worker.main([str(run.path)])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _llm_config(tmp_path: Path, base: Path, data: Path, **extra) -> Path:
    return write_llm_yaml(
        tmp_path, base, data, save_steps=1, learning_rate=1e-3, lr_scheduler="constant", **extra
    )


@pytest.fixture()
def trained(tmp_path: Path, tiny_llama: Path):
    """A finished two-step LLM run, its config and its data file."""
    data = write_jsonl(tmp_path / "data" / "qa.jsonl", records("prompt_response", 8))
    config = _llm_config(tmp_path, tiny_llama, data)
    run, _ = prepare_run(load_config(config), resume=None, overwrite=False)
    assert _run_worker(run) == 0
    return run, config, data


def _resume(config: Path, *extra: str):
    args = ["train", "-c", str(config), "--resume", "latest", "--no-tui", "--max-steps", "3", *extra]
    return CliRunner().invoke(app, args)


def test_checkpoint_records_fingerprints_and_learning_rate(trained) -> None:
    run, _, _ = trained
    meta = json.loads((run.latest_checkpoint() / "meta.json").read_text())
    assert meta["learning_rate"] == 1e-3
    assert meta["inputs"]["base_model"]["files"] >= 1 and len(meta["inputs"]["base_model"]["sha256"]) == 64
    assert meta["inputs"]["dataset"]["files"] == 1


def test_a_changed_dataset_of_the_same_size_is_refused_before_training(trained) -> None:
    run, config, data = trained
    text = data.read_text(encoding="utf-8")
    swapped = text.replace("a", "e")  # same size, other content
    assert len(swapped) == len(text) and swapped != text
    data.write_text(swapped, encoding="utf-8")
    config_before = run.config_path.read_text()
    events_before = run.events_path.read_text()
    result = _resume(config)
    assert result.exit_code == 1, result.output
    line = " ".join(result.output.split())
    assert "cannot resume from" in line and "the dataset (train_data_dir) changed" in line
    assert "--allow-changed-data" in line and "Traceback" not in result.output
    assert run.config_path.read_text() == config_before and run.events_path.read_text() == events_before

    result = _resume(config, "--allow-changed-data")
    assert result.exit_code == 0, result.output
    assert "the dataset (train_data_dir) changed" in result.output and "continuing" in result.output
    assert read_launch(run.path).allow_changed_data is True


def test_a_changed_base_model_is_refused(trained, tmp_path: Path, tiny_llama: Path) -> None:
    run, config, data = trained
    other = tmp_path / "other-llama"
    shutil.copytree(tiny_llama, other)
    weights = other / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-3] ^= 0x01  # one weight changed, same size
    weights.write_bytes(bytes(raw))
    cfg = load_config(_llm_config(tmp_path, other, data)).config
    with pytest.raises(ChangedInputs, match=r"base_model changed: checkpoint .*, now .*other-llama"):
        check_resume_inputs(cfg, run.latest_checkpoint(), allow_changed_data=False)
    # the same model moved elsewhere is the same input
    moved = tmp_path / "moved-llama"
    shutil.copytree(tiny_llama, moved)
    cfg = load_config(_llm_config(tmp_path, moved, data)).config
    assert check_resume_inputs(cfg, run.latest_checkpoint(), allow_changed_data=False) == []


def test_a_changed_learning_rate_is_applied_and_reported(trained) -> None:
    run, config, _ = trained
    result = _resume(config, "--lr", "0.005")
    assert result.exit_code == 0, result.output
    assert (
        "resumed with a changed setting: learning_rate 0.001 -> 0.005 (applied from step 3)" in result.output
    )
    steps = [e for e in read_events(run.events_path) if e["type"] == "step"]
    assert steps[-1]["step"] == 3 and steps[-1]["lr"] == pytest.approx(0.005)
    meta = json.loads((run.checkpoints_dir / "step-3" / "meta.json").read_text())
    assert meta["learning_rate"] == 0.005


def test_a_changed_rank_is_one_line(trained) -> None:
    run, config, _ = trained
    result = _resume(config, "--lora-rank", "8")
    assert result.exit_code == 1
    assert "size mismatch" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "was trained with lora_rank 4: resume with --set lora_rank=4" in lines[0]


def test_sd_checkpoint_fingerprints_an_image_dataset(tmp_path: Path, tiny_sd15: Path) -> None:
    data = make_image_dataset(tmp_path / "data", n=2)
    config = seed_like_config(tmp_path, tiny_sd15, data, batch_size=1, epochs=None, max_steps=1, save_steps=1)
    run, _ = prepare_run(load_config(config), resume=None, overwrite=False)
    assert _run_worker(run) == 0
    checkpoint = run.latest_checkpoint()
    cfg = load_config(config).config
    assert check_resume_inputs(cfg, checkpoint, allow_changed_data=False) == []
    first = data / "img00.png"
    second = data / "img01.png"
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b)
    second.write_bytes(a)  # two images swapped: the same sizes in total, another dataset
    with pytest.raises(ChangedInputs, match="the dataset"):
        check_resume_inputs(cfg, checkpoint, allow_changed_data=False)
    cfg.lora_rank = 4
    with pytest.raises(ChangedInputs, match="trained with lora_rank 8"):
        check_resume_inputs(cfg, checkpoint, allow_changed_data=True)
