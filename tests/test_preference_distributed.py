"""A DPO run on two CPU processes (gloo) equals one process with twice the batch: pairs are shared out whole
between the ranks, and each rank's reference pass uses its own model with the adapter switched off."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from llm_helpers import make_config, make_job, write_jsonl
from safetensors.torch import load_file
from test_preference import pairs

from loratui.config import ResolvedConfig
from loratui.runs.events import read_events
from loratui.train.process.launch import prepare_run, start_worker
from loratui.train.process.launcher import Processes

TIMEOUT_S = 240


def test_dpo_on_two_processes_matches_one_process_with_twice_the_batch(
    tmp_path: Path, tiny_llama: Path, subprocess_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loratui.train.llm.trainer import run_training

    monkeypatch.setenv("LORATUI_COLLECTIVE_TIMEOUT_S", "60")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    data = write_jsonl(tmp_path / "data" / "pairs.jsonl", pairs(4))
    values = {"method": "dpo", "max_steps": 3, "save_steps": 3, "learning_rate": 5e-3, "seed": 3}
    two = make_config(tiny_llama, data, tmp_path / "two", batch_size=1, **values)
    run, _ = prepare_run(
        ResolvedConfig(two, {}, "llm"), resume=None, overwrite=False, processes=Processes(2, cpu=True)
    )
    supervisor = start_worker(run)
    try:
        code = supervisor.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        supervisor.kill()
        pytest.fail("the 2-process DPO run did not end in time")
    log = (
        (run.path / "worker.log").read_text(errors="replace")[-4000:]
        if (run.path / "worker.log").exists()
        else ""
    )
    assert code == 0, log
    one = make_job(make_config(tiny_llama, data, tmp_path / "one", batch_size=2, **values))
    assert run_training(one, console=False).state == "finished"
    a = load_file(run.checkpoints_dir / "step-3" / "lora.safetensors")
    b = load_file(one.run.checkpoints_dir / "step-3" / "lora.safetensors")
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    two_steps = [e for e in read_events(run.events_path) if e["type"] == "step"]
    one_steps = [e for e in read_events(one.run.events_path) if e["type"] == "step"]
    for x, y in zip(two_steps, one_steps, strict=True):  # the loss is over both ranks' pairs
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
    assert all("reward_margin" in e for e in two_steps)
