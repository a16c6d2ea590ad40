"""OOM recovery pieces without a trainer: detection, the ladder, the recovering step on a toy model, records,
the settings cache and the console lines."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from loratui.config import ResolvedConfig, TrainConfig
from loratui.runs.config_file import read_run_config, write_run_config
from loratui.runs.follow import format_event
from loratui.runs.rundir import create_run_dir
from loratui.train.oom import cache as oom_cache
from loratui.train.oom.errors import OomExhausted, RestartNeeded, is_oom, is_sticky
from loratui.train.oom.ladder import OomLadder, halve_micro_batch, settings_of
from loratui.train.oom.record import read_record
from loratui.train.oom.recovering import RecoveringStep


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORATUI_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LORATUI_SIMULATE_VRAM", raising=False)
    monkeypatch.setenv("LORATUI_OOM_PLANNER", "0")


# --- detection ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        torch.cuda.OutOfMemoryError("out of memory (simulated card of 3.0 GiB)"),
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried "
            "to allocate 8589934592 bytes. Error code 12 (Cannot allocate memory)"
        ),
        MemoryError(),
    ],
)
def test_out_of_memory_errors_are_recognised(exc: BaseException) -> None:
    assert is_oom(exc, pressure=lambda: False)


def test_cudnn_not_supported_counts_only_under_memory_pressure() -> None:
    exc = RuntimeError(
        "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a "
        "non-contiguous input."
    )
    assert is_oom(exc, pressure=lambda: True)
    assert not is_oom(exc, pressure=lambda: False)


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 16x8)"),
        ValueError("out of memory"),  # not an allocator error type
        RuntimeError("CUDA error: an illegal memory access was encountered"),
        KeyError("batch_size"),
    ],
)
def test_other_errors_are_not_out_of_memory(exc: BaseException) -> None:
    assert not is_oom(exc, pressure=lambda: True)


def test_wrapped_out_of_memory_and_sticky_errors() -> None:
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError as inner:
            raise RuntimeError("step failed") from inner
    except RuntimeError as outer:
        assert is_oom(outer)
    assert is_sticky(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_sticky(torch.OutOfMemoryError("CUDA out of memory"))


# --- the ladder -------------------------------------------------------------------------------------------


def _llm_settings(**changes) -> dict:
    base = {
        "batch_size": 8,
        "gradient_accumulation_steps": 1,
        "gradient_checkpointing": False,
        "chunked_loss": False,
        "activation_offload": False,
        "optimizer": "adamw",
        "max_seq_len": 1024,
    }
    return {**base, **changes}


def test_ladder_order_keeps_the_effective_batch_and_ends() -> None:
    settings = _llm_settings()
    ladder = OomLadder("llm", dict(settings), unavailable={"optimizer_8bit"})
    names, seen = [], []
    while (rung := ladder.next_rung(settings)) is not None:
        names.append(rung.name)
        settings.update(rung.changes)
        seen.append(settings["batch_size"] * settings["gradient_accumulation_steps"])
    assert names[:6] == ["micro_batch"] * 3 + ["gradient_checkpointing", "offload", "activation_offload"]
    assert set(names[6:]) == {"quality"} and settings["max_seq_len"] == 512  # never below half the start
    assert set(seen) == {8} and settings["batch_size"] == 1 and settings["chunked_loss"]
    assert settings["activation_offload"]
    no_quality = OomLadder("llm", _llm_settings(), allow_quality=False, unavailable={"optimizer_8bit"})
    assert all(r.name != "quality" for r in no_quality.remaining(_llm_settings()))
    assert [r.name for r in OomLadder("llm", _llm_settings()).remaining(_llm_settings())][
        6
    ] == "optimizer_8bit"
    # chunked loss on (the default): past checkpointing comes activation offload, where a GPU is there
    chunked = _llm_settings(
        chunked_loss=True, gradient_checkpointing=True, batch_size=1, gradient_accumulation_steps=8
    )
    ladder = OomLadder("llm", dict(chunked))
    assert [r.name for r in ladder.remaining(chunked)][:2] == ["activation_offload", "optimizer_8bit"]
    no_gpu = OomLadder("llm", dict(chunked), unavailable={"optimizer_8bit", "activation_offload"})
    assert {r.name for r in no_gpu.remaining(chunked)} == {"quality"}
    sd = OomLadder("sd", {}).remaining(
        {
            "batch_size": 1,
            "gradient_accumulation_steps": 1,
            "gradient_checkpointing": True,
            "cache_latents": True,
            "cache_text_encoder_outputs": True,
            "optimizer": "adamw8bit",
            "resolution": 512,
        }
    )
    assert all(r.name != "activation_offload" for r in sd)


def test_ladder_halving_uses_divisors_of_the_effective_batch() -> None:
    assert halve_micro_batch(6, 1) == (3, 2)
    assert halve_micro_batch(3, 2) == (1, 6)
    assert halve_micro_batch(1, 8) is None


def test_sd_ladder_caches_only_what_may_be_cached() -> None:
    sd = {
        "batch_size": 1,
        "gradient_accumulation_steps": 4,
        "gradient_checkpointing": True,
        "cache_latents": False,
        "cache_text_encoder_outputs": False,
        "optimizer": "adamw8bit",
        "resolution": 512,
    }
    rung = OomLadder("sd", sd, can_cache_text=False).next_rung(sd)
    assert rung.name == "offload" and rung.changes == {"cache_latents": True}
    quality = OomLadder("sd", sd, can_cache_text=False, can_cache_latents=False).next_rung(sd)
    assert quality.quality and quality.changes == {"resolution": 448}


def test_planner_skips_rungs_that_cannot_be_enough() -> None:
    settings = _llm_settings()
    ladder = OomLadder("llm", dict(settings), unavailable={"optimizer_8bit"})
    # the planner says only micro-batch 1 with checkpointing fits: both halvings and checkpointing at once
    chosen = ladder.choose(settings, lambda s: s["batch_size"] == 1 and s["gradient_checkpointing"])
    assert [r.name for r in chosen] == ["micro_batch"] * 3 + ["gradient_checkpointing"]
    assert [r.name for r in ladder.choose(settings, lambda s: None)] == ["micro_batch"]  # cannot tell
    assert [r.name for r in ladder.choose(settings, lambda s: False)] == ["micro_batch"]  # nothing fits: try
    assert len(ladder.choose(settings, lambda s: True)) == 1
    # never jumps into a quality reduction: the rungs before it are tried first, one at a time
    assert [r.name for r in ladder.choose(settings, lambda s: s["max_seq_len"] < 1024)] == ["micro_batch"]
    near_the_end = {
        **settings,
        "batch_size": 1,
        "gradient_accumulation_steps": 8,
        "gradient_checkpointing": True,
    }
    assert [r.name for r in ladder.choose(near_the_end, lambda s: s["max_seq_len"] < 1024)] == ["offload"]


# --- the recovering step on a toy model -------------------------------------------------------------------


class _Events:
    def __init__(self) -> None:
        self.items: list[dict] = []

    def event(self, type: str, step: int | None = None, **fields) -> None:
        self.items.append({"type": type, "step": step, **fields})


def _toy_step(tmp_path: Path, **cfg_values):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    cfg_values.setdefault("simulate_vram", "1GiB")  # a meter: memory at the failure, leak checks
    cfg_values.setdefault("batch_size", 4)
    cfg = TrainConfig(task_type="text-generation", model_family="llm", runs_dir=str(tmp_path), **cfg_values)
    run = create_run_dir(tmp_path, "toy")
    resolved = ResolvedConfig(cfg, {}, "llm")
    write_run_config(run.path, resolved)
    job = SimpleNamespace(run=run, resolved=resolved)
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    accelerator = Accelerator(cpu=True)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    events = _Events()
    step = RecoveringStep(
        job,
        events,
        accelerator=accelerator,
        optimizer=optimizer,
        scheduler=scheduler,
        params=list(model.parameters()),
        max_grad_norm=None,
        model=model,
    )
    data = torch.randn(16, 8)
    return step, model, data, events, job


def test_toy_recovery_retries_the_same_step_with_half_the_micro_batch(tmp_path: Path) -> None:
    step, model, data, events, job = _toy_step(tmp_path)
    seen: list[list[int]] = []

    def micro_loss(batch):
        seen.append(list(batch))
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        return model(data[list(batch)]).square().sum() / 4

    before = model.weight.detach().clone()
    step.run(1, [3, 1, 2, 0], micro_loss)
    assert seen == [[3, 1, 2, 0], [3, 1], [2, 0]]
    assert [e["type"] for e in events.items] == ["oom", "oom_recovered"]
    assert events.items[0]["old"]["batch_size"] == 4 and events.items[0]["new"]["batch_size"] == 2
    assert events.items[1]["seconds"] > 0 and "meter_live" in events.items[1]["memory"]
    assert not torch.equal(before, model.weight.detach())
    assert (
        "batch_size: 2\n" in read_run_config(job.run.path).to_yaml()
        and read_record(job.run.path)["recoveries"]
    )
    assert "batch_size: 4\n" in job.run.config_path.read_text()  # config.yaml: what the run started with


def test_gradients_of_the_failed_attempt_are_dropped(tmp_path: Path) -> None:
    """The second micro-batch fails after the first one's backward: its gradients must not count twice."""
    step, model, data, events, _ = _toy_step(tmp_path / "oom", batch_size=2, gradient_accumulation_steps=2)
    calls: list[list[int]] = []

    def second_fails(batch):
        calls.append(list(batch))
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return model(data[list(batch)]).square().sum() / 4

    step.run(1, [0, 1, 2, 3], second_fails)
    assert calls == [[0, 1], [2, 3], [0], [1], [2], [3]]
    clean, clean_model, _, _, _ = _toy_step(tmp_path / "clean", batch_size=1, gradient_accumulation_steps=4)
    clean.run(1, [0, 1, 2, 3], lambda batch: clean_model(data[list(batch)]).square().sum() / 4)
    torch.testing.assert_close(model.weight, clean_model.weight, rtol=0, atol=1e-6)


def test_non_oom_errors_and_disabled_recovery_propagate(tmp_path: Path) -> None:
    step, model, data, events, _ = _toy_step(tmp_path)
    with pytest.raises(ValueError, match="broken"):
        step.run(1, [0, 1, 2, 3], lambda batch: (_ for _ in ()).throw(ValueError("broken")))
    assert events.items == []
    off, _, _, events, _ = _toy_step(tmp_path / "off", oom_recovery=False)
    with pytest.raises(torch.OutOfMemoryError):
        off.run(
            1, [0, 1, 2, 3], lambda batch: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory"))
        )
    assert events.items == []


def test_memory_not_released_asks_for_a_restart_with_lowered_settings(tmp_path: Path) -> None:
    step, model, data, events, job = _toy_step(tmp_path)
    kept = []

    def leaky(batch):
        kept.append(torch.ones(4096))  # still referenced after the failure
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(RestartNeeded, match="not released"):
        step.run(1, [0, 1, 2, 3], leaky)
    assert events.items[-1]["type"] == "oom" and "not released" in events.items[-1]["restart"]
    assert "batch_size: 2" in read_run_config(job.run.path).to_yaml()  # what the restarted worker will use


def test_exhausted_ladder_names_the_smallest_option(tmp_path: Path) -> None:
    step, model, data, events, _ = _toy_step(tmp_path, oom_allow_quality_reduction=False, simulate_vram=None)
    with pytest.raises(OomExhausted, match="smallest option the OOM ladder knows"):
        step.run(
            1, [0, 1, 2, 3], lambda b: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory"))
        )
    from loratui.train.oom.optimizer_swap import can_use_8bit

    eight_bit = ["optimizer_8bit"] if can_use_8bit(torch.device("cpu")) else []  # bitsandbytes >= 0.50
    # the chunked loss is on by default and activation offload needs a GPU: no rung 3 or 4 here
    assert [e["rung"] for e in events.items if e["type"] == "oom"] == [
        "micro_batch",
        "micro_batch",
        "gradient_checkpointing",
        *eight_bit,
    ]
    if eight_bit:  # the running AdamW was really swapped for bitsandbytes' 8-bit AdamW on the CPU
        assert type(step.optimizer.optimizer).__name__ == "AdamW8bit"


# --- records, cache, console lines -------------------------------------------------------------------------


def test_settings_cache_round_trip_and_switch(tmp_path: Path) -> None:
    cfg = TrainConfig(
        task_type="text-generation", base_model=str(tmp_path), batch_size=4, simulate_vram="2GiB"
    )
    key = oom_cache.cache_key(cfg, "llm")
    assert key != oom_cache.cache_key(cfg.model_copy(update={"simulate_vram": "3GiB"}), "llm")
    assert key != oom_cache.cache_key(cfg.model_copy(update={"lora_rank": 16}), "llm")
    assert oom_cache.lookup(key) is None
    working = {**settings_of(cfg, "llm"), "batch_size": 2, "gradient_accumulation_steps": 2}
    oom_cache.remember(key, working, model=cfg.base_model)
    assert oom_cache.lookup(key) == working
    assert json.loads(oom_cache.cache_path().read_text())[key]["settings"]["batch_size"] == 2

    run = create_run_dir(tmp_path / "runs", "x")
    job = SimpleNamespace(run=run, resolved=ResolvedConfig(cfg.model_copy(), {}, "llm"))
    assert oom_cache.apply_cached_settings(job) == {"batch_size": 2, "gradient_accumulation_steps": 2}
    assert job.resolved.config.batch_size == 2 and read_record(run.path)["current"]["batch_size"] == 2
    assert not run.config_path.exists()  # config.yaml is written by launch only
    other = SimpleNamespace(
        run=create_run_dir(tmp_path / "runs", "y"),
        resolved=ResolvedConfig(cfg.model_copy(update={"oom_cache": False}), {}, "llm"),
    )
    assert oom_cache.apply_cached_settings(other) is None and other.resolved.config.batch_size == 4


def test_console_lines_for_recoveries() -> None:
    old = {"batch_size": 4, "gradient_accumulation_steps": 1, "gradient_checkpointing": False}
    new = {"batch_size": 2, "gradient_accumulation_steps": 2, "gradient_checkpointing": False}
    line = format_event(
        {
            "type": "oom",
            "step": 7,
            "old": old,
            "new": new,
            "label": "halve the micro-batch",
            "error": "OutOfMemoryError: CUDA out of memory",
        }
    )
    assert line == (
        "out of memory at step 7 (OutOfMemoryError: CUDA out of memory); trying halve the "
        "micro-batch: batch_size 4 -> 2, gradient_accumulation_steps 1 -> 2"
    )
    done = format_event(
        {"type": "oom_recovered", "step": 7, "old": old, "new": new, "rung": "micro_batch", "seconds": 0.25}
    )
    assert done == (
        "recovered from out of memory at step 7 in 0.25 s: batch_size 4 -> 2, "
        "gradient_accumulation_steps 1 -> 2 (micro_batch)"
    )
    finished = format_event({"type": "run_finished", "oom_recoveries": [{"step": 7, "old": old, "new": new}]})
    assert finished.startswith("finished (recovered from out of memory 1 time(s): step 7: batch_size 4 -> 2")
    assert format_event({"type": "run_finished"}) == "finished"


def test_no_oom_cache_flag_turns_the_cache_off(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from loratui.cli.app import app

    examples = Path(__file__).resolve().parents[1] / "examples"
    args = ["train", "--config", str(examples / "llm_medical_qa.yaml"), "--dry-run", "--json"]
    plain = CliRunner().invoke(app, args)
    off = CliRunner().invoke(app, [*args, "--no-oom-cache"])
    assert json.loads(plain.stdout)["config"]["oom_cache"] is True
    assert (
        json.loads(off.stdout)["config"]["oom_cache"] is False
        and json.loads(off.stdout)["sources"]["oom_cache"] == "flag"
    )


def test_restarted_llm_worker_builds_data_with_the_length_it_started_with(tmp_path: Path) -> None:
    from loratui.train.llm.oom import data_seq_len
    from loratui.train.oom.record import note_settings

    cfg = TrainConfig(task_type="text-generation", max_seq_len=72)
    job = SimpleNamespace(run=create_run_dir(tmp_path, "r"), resolved=ResolvedConfig(cfg, {}, "llm"))
    assert data_seq_len(job) == 72  # no OOM record: the config's length
    note_settings(
        job.run.path, original={"max_seq_len": 96}, current={"max_seq_len": 72}, started={"max_seq_len": 96}
    )
    assert data_seq_len(job) == 96  # built as at the start, then cut to 72 (same units, same plan)


def test_sticky_cuda_error_after_an_out_of_memory_asks_for_a_restart(tmp_path: Path) -> None:
    step, model, data, events, _ = _toy_step(tmp_path)
    calls = []

    def failing(batch):
        calls.append(len(batch))
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(RestartNeeded, match="only a new process clears"):
        step.run(1, [0, 1, 2, 3], failing)
    assert [e["type"] for e in events.items] == ["oom", "oom"] and events.items[-1]["restart"]
