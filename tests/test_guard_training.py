"""A diverging run (learning_rate 1e9) stops after max_nonfinite_steps with a message naming the cause and the
last good checkpoint, exits non-zero with state `failed`, and never exports non-finite weights."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from llm_helpers import make_config, records, single_thread, write_jsonl, write_llm_yaml
from safetensors.torch import load_file, save_file
from sd_helpers import events_of, make_image_dataset, seed_like_config

from loratui.config import ResolvedConfig, load_config
from loratui.runs.events import read_events
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


def _assert_diverged(run, code: int, limit: int) -> dict:
    assert code == 1
    events = read_events(run.events_path)
    assert not [e for e in events if e["type"] in ("run_finished", "export")]
    warnings = [e for e in events if e["type"] == "warning" and e.get("nonfinite")]
    assert len(warnings) == limit
    failed = [e for e in events if e["type"] == "run_failed"]
    assert len(failed) == 1
    message = failed[0]["error"]
    assert "TrainingDiverged: training diverged" in message and "learning_rate 1e+09 too high" in message
    assert json.loads(run.status_path.read_text())["state"] == "failed"
    # no update was applied with a nan loss: every checkpoint holds finite weights
    for checkpoint in run.checkpoints():
        assert all(torch.isfinite(t).all() for t in load_file(checkpoint / "lora.safetensors").values())
    return failed[0]


def test_llm_huge_learning_rate_fails_without_exporting(tmp_path: Path, tiny_llama: Path) -> None:
    data = write_jsonl(tmp_path / "data" / "qa.jsonl", records("prompt_response", 8))
    cfg = make_config(
        tiny_llama,
        data,
        tmp_path,
        learning_rate=1e9,
        weight_decay=0.01,
        max_steps=12,
        save_steps=1,
        max_nonfinite_steps=2,
    )
    run, _ = prepare_run(ResolvedConfig(cfg, {}, "llm"), resume=None, overwrite=False)
    failed = _assert_diverged(run, _run_worker(run), limit=2)
    first = next(e["step"] for e in read_events(run.events_path) if e.get("nonfinite"))
    assert f"The last good checkpoint is {run.checkpoints_dir / f'step-{first - 1}'}" in failed["error"]
    assert "--set learning_rate=" in failed["error"]
    assert not (tmp_path / "adapter").exists()


def test_sd_huge_learning_rate_fails_without_exporting(tmp_path: Path, tiny_sd15: Path) -> None:
    data = make_image_dataset(tmp_path / "data", n=4)
    config = seed_like_config(
        tmp_path, tiny_sd15, data, learning_rate="1e9", batch_size=1, epochs=None, max_steps=12, save_steps=50
    )
    resolved = load_config(config)
    run, _ = prepare_run(resolved, resume=None, overwrite=False)
    failed = _assert_diverged(run, _run_worker(run), limit=3)
    assert "No checkpoint was saved before it" in failed["error"]
    assert not (tmp_path / "output").exists() or not any((tmp_path / "output").rglob("*.safetensors"))
    assert not events_of(run, "export")


def test_export_refuses_nonfinite_weights(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from loratui.cli.app import app

    lora = tmp_path / "lora.safetensors"
    save_file(
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.full((4, 8), float("nan")),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4),
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0),
        },
        str(lora),
    )
    result = CliRunner().invoke(
        app, ["export", str(lora), "--format", "diffusers", "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 1, result.output
    assert "holds nan/inf values" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_diverging_run_through_the_cli_fails_and_exports_nothing(tmp_path: Path, tiny_llama: Path) -> None:
    """`loratui train` as a user runs it (worker subprocess): exit 1, the cause named, no adapter written."""
    import os
    import subprocess
    import sys

    config = write_llm_yaml(
        tmp_path,
        tiny_llama,
        learning_rate=1e9,
        weight_decay=0.01,
        max_steps=12,
        save_steps=1,
        max_seq_len=160,
    )
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "loratui", "train", "--config", str(config), "--no-tui"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "training diverged" in out and "learning_rate 1e+09 too high" in out
    assert "The last good checkpoint is" in out
    assert "Traceback" not in proc.stdout
    assert not (tmp_path / "adapter").exists()
