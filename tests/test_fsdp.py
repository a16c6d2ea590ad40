"""FSDP (`fsdp: true`, `loratui train --gpus N --fsdp`): the base, the LoRA and the optimizer state sharded.

Two CPU processes (gloo, through accelerate's launcher under the supervisor) with FSDP train the same LoRA as
one plain process with the same global batch; the checkpoint and the adapter are the one-process files; the
FSDP checkpoint resumes (sharded or not); the OOM ladder restarts the group with its next rung.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from llm_helpers import make_config, make_job, records, write_jsonl
from safetensors.torch import load_file

from loratui.config import ResolvedConfig, TrainConfig
from loratui.runs.events import read_events

TIMEOUT_S = 240


@pytest.fixture()
def subprocess_env(subprocess_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORATUI_COLLECTIVE_TIMEOUT_S", "60")


def _config(tiny_llama: Path, tmp_path: Path, name: str, **overrides) -> TrainConfig:
    data = write_jsonl(tmp_path / "data" / "qa.jsonl", records("prompt_response", 8))
    values = {"max_steps": 4, "save_steps": 2, "lora_dropout": 0.0, "seed": 3, "learning_rate": 1e-2}
    values.update(overrides)
    return make_config(tiny_llama, data, tmp_path / name, **values)


def _lora(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "lora.safetensors")


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _optimizer(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "training_state.pt", weights_only=False)["optimizer"]


def _log(run) -> str:
    path = run.path / "worker.log"
    return path.read_text(errors="replace")[-4000:] if path.exists() else ""


def _run_processes(cfg: TrainConfig, processes: int):
    """Train `cfg` under the supervisor with `processes` CPU processes; returns the run directory."""
    import subprocess

    from loratui.train.process.launch import prepare_run, start_worker
    from loratui.train.process.launcher import Processes

    resolved = ResolvedConfig(cfg, {}, "llm")
    run, _ = prepare_run(resolved, resume=None, overwrite=False, processes=Processes(processes, cpu=True))
    supervisor = start_worker(run)
    try:
        code = supervisor.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        supervisor.kill()
        pytest.fail(f"the FSDP run did not end in {TIMEOUT_S}s; log:\n{_log(run)}")
    assert code == 0, _log(run)
    return run


def test_fsdp_two_processes_match_one_process(tmp_path, tiny_llama, subprocess_env) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loratui.train.llm.trainer import run_training

    fsdp = _config(tiny_llama, tmp_path, "fsdp", batch_size=2, fsdp=True)
    run = _run_processes(fsdp, 2)
    events = read_events(run.events_path)
    started = next(e for e in events if e["type"] == "run_started")
    assert (started["processes"], started["batch_size_per_device"], started["global_batch"]) == (2, 2, 4)
    steps = [e for e in events if e["type"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    assert sorted(p.name for p in run.checkpoints_dir.iterdir()) == ["step-2", "step-4"]
    assert started["fsdp"] is True and started["trainable_params"] > 0

    plain = _config(tiny_llama, tmp_path, "plain", batch_size=4)
    job = make_job(plain)
    assert run_training(job, console=False).state == "finished"
    reference = job.run.checkpoints_dir / "step-4"
    sharded = run.checkpoints_dir / "step-4"
    assert _max_diff(_lora(sharded), _lora(reference)) <= 1e-5
    for a, b in zip(steps, [e for e in read_events(job.run.events_path) if e["type"] == "step"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)

    # the checkpoint is a one-process checkpoint: same files, same optimizer state layout, same values
    assert sorted(p.name for p in sharded.iterdir()) == sorted(p.name for p in reference.iterdir())
    ours, theirs = _optimizer(sharded), _optimizer(reference)
    assert ours["param_groups"] == theirs["param_groups"]
    assert ours["state"].keys() == theirs["state"].keys()
    for index, state in theirs["state"].items():
        assert ours["state"][index].keys() == state.keys()
        for key, value in state.items():
            assert ours["state"][index][key].shape == value.shape
            assert torch.allclose(ours["state"][index][key], value, atol=1e-6, rtol=1e-4), (index, key)

    # the exported adapter (gathered on rank 0) loads with PEFT and holds the trained LoRA
    adapter = Path(fsdp.output_dir)
    assert json.loads((adapter / "loratui_adapter.json").read_text())["training"]["processes"] == 2
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    model = PeftModel.from_pretrained(base, str(adapter))
    exported = load_file(adapter / "adapter_model.safetensors")
    assert _max_diff(exported, _lora(sharded)) == 0.0
    loaded = dict(model.named_parameters())
    some = next(k for k in exported if "lora_B" in k)
    assert torch.equal(loaded[some.replace(".weight", ".default.weight")], exported[some])

    # the FSDP checkpoint of step 2 resumes: sharded (FSDP, one process) and plain, both end where it ended
    final = _lora(sharded)
    for name, sharded_resume in (("resume-fsdp", True), ("resume-plain", False)):
        cfg = _config(tiny_llama, tmp_path, name, batch_size=2, fsdp=sharded_resume)
        resumed = make_job(cfg, resume_from=run.checkpoints_dir / "step-2")
        assert run_training(resumed, console=False).state == "finished"
        assert _max_diff(_lora(resumed.run.checkpoints_dir / "step-4"), final) <= 1e-5, name
