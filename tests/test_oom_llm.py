"""OOM recovery in the LLM trainer on the tiny Llama, under the memory meter's simulated card."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from llm_helpers import adapter_tensors, make_config, make_job, max_diff, records, single_thread, write_jsonl

from loratui.config import ResolvedConfig
from loratui.models.llm.batches import Unit, collate
from loratui.models.llm.loss import chunked_token_loss_sum, token_loss_sum
from loratui.runs.config_file import read_run_config, write_run_config
from loratui.runs.events import read_events
from loratui.train.llm.oom import cut_units
from loratui.train.llm.trainer import run_training
from loratui.train.loop.plan import StepPlan
from loratui.train.oom.optimizer_swap import can_use_8bit


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from single_thread()


@pytest.fixture(autouse=True)
def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORATUI_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LORATUI_DEBUG_SAMPLES", "1")
    monkeypatch.delenv("LORATUI_SIMULATE_VRAM", raising=False)


def _events(job, kind: str) -> list[dict]:
    return [e for e in read_events(job.run.events_path) if e["type"] == kind]


def _peaks(job) -> list[int]:
    return [e["meter_peak"] for e in _events(job, "step")]


def test_micro_batch_rung_recovers_and_equals_a_run_configured_that_way(
    tmp_path: Path, tiny_llama: Path
) -> None:
    data = write_jsonl(tmp_path / "data" / "qa.jsonl", records("prompt_response", 8))
    # Calibrate the simulated card: the peak of every step with micro-batch 2 x 2 fits, 4 x 1 does not.
    # The 2 x 2 run (metered on an unlimited card) is also the reference for the final LoRA.
    reference = make_job(
        make_config(
            tiny_llama,
            data,
            tmp_path / "ref",
            batch_size=2,
            gradient_accumulation_steps=2,
            simulate_vram="1TiB",
        )
    )
    run_training(reference, console=False)
    probe = make_job(make_config(tiny_llama, data, tmp_path / "probe", batch_size=4, simulate_vram="1TiB"))
    run_training(probe, console=False)
    assert max(_peaks(reference)) < min(_peaks(probe))
    budget = (max(_peaks(reference)) + min(_peaks(probe))) // 2

    job = make_job(
        make_config(
            tiny_llama, data, tmp_path / "oom", batch_size=4, simulate_vram=str(budget), chunked_loss=False
        )
    )
    write_run_config(job.run.path, job.resolved)  # as `loratui train` does before the worker starts
    result = run_training(job, console=False)

    assert result.state == "finished" and result.step == 3
    ooms, recovered = _events(job, "oom"), _events(job, "oom_recovered")
    assert [(e["step"], e["rung"]) for e in ooms] == [(1, "micro_batch")]
    assert [(e["step"], e["rung"]) for e in recovered] == [(1, "micro_batch")]
    event = recovered[0]
    assert (event["old"]["batch_size"], event["old"]["gradient_accumulation_steps"]) == (4, 1)
    assert (event["new"]["batch_size"], event["new"]["gradient_accumulation_steps"]) == (2, 2)
    assert event["error"].startswith("OutOfMemoryError") and event["seconds"] > 0
    assert event["memory"]["meter_budget"] == budget and event["memory"]["meter_live"] > 0
    # the planned steps, the planned effective batch, every sample once per epoch, in the planned order
    plan = StepPlan(8, 4, 1, 3, 42)
    steps = _events(job, "step")
    assert [e["step"] for e in steps] == [1, 2, 3]
    assert [e["sample_indices"] for e in steps] == [plan.samples_for_step(s) for s in range(3)]
    assert sorted(steps[0]["sample_indices"] + steps[1]["sample_indices"]) == list(range(8))
    assert [e["sample_indices"] for e in steps] == [e["sample_indices"] for e in _events(reference, "step")]
    assert max(_peaks(job)) <= budget
    # the same LoRA as a run configured with 2 x 2 from the start
    assert (
        max_diff(
            adapter_tensors(result.adapter_dir), adapter_tensors(reference.run.path.parent.parent / "adapter")
        )
        <= 1e-5
    )
    # the settings really used: the run's live config (config.yaml + oom.json), oom.json, run_finished, the
    # adapter's README and marker; config.yaml itself keeps what the run was started with
    live = read_run_config(job.run.path).to_yaml()
    assert "batch_size: 2\n" in live and "gradient_accumulation_steps: 2\n" in live
    assert "batch_size: 4\n" in job.run.config_path.read_text()
    record = json.loads((job.run.path / "oom.json").read_text())
    assert record["original"]["batch_size"] == 4 and record["current"]["batch_size"] == 2
    finished = _events(job, "run_finished")[0]
    assert [r["rung"] for r in finished["oom_recoveries"]] == ["micro_batch"]
    assert "batch_size 2, gradient_accumulation_steps 2" in (result.adapter_dir / "README.md").read_text()
    marker = json.loads((result.adapter_dir / "loratui_adapter.json").read_text())
    assert marker["training"]["batch_size"] == 2 and marker["training"]["effective_batch"] == 4
    checkpoint = json.loads((job.run.latest_checkpoint() / "meta.json").read_text())
    assert checkpoint["settings"]["batch_size"] == 2


#: the 8-bit AdamW rung runs on the CPU too where bitsandbytes can (>= 0.50): the optimizer is really swapped
_EIGHT_BIT = ["optimizer_8bit"] if can_use_8bit(torch.device("cpu")) else []


def test_budget_too_small_for_anything_fails_naming_the_smallest_option(
    tmp_path: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loratui.train.process import worker
    from loratui.train.process.launch import prepare_run

    monkeypatch.setenv("LORATUI_OOM_PLANNER", "0")  # one rung at a time (the message still asks the planner)
    data = write_jsonl(tmp_path / "data" / "qa.jsonl", records("prompt_response", 8))
    weights = (tiny_llama / "model.safetensors").stat().st_size
    cfg = make_config(
        tiny_llama,
        data,
        tmp_path,
        batch_size=4,
        simulate_vram=str(int(weights * 1.08)),
        oom_allow_quality_reduction=False,
        chunked_loss=False,  # turned off by hand: rung 3 turns it back on
    )
    run, _ = prepare_run(ResolvedConfig(cfg, {}, "llm"), resume=None, overwrite=False)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        code = worker.main([str(run.path)])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    events = read_events(run.events_path)
    assert code != 0
    failed = [e for e in events if e["type"] == "run_failed"]
    assert len(failed) == 1 and "smallest option" in failed[0]["error"]
    assert "OomExhausted" in failed[0]["error"] and "every rung of the OOM ladder" in failed[0]["error"]
    assert [e["rung"] for e in events if e["type"] == "oom"] == [
        "micro_batch",
        "micro_batch",
        "gradient_checkpointing",
        "offload",
        *_EIGHT_BIT,
    ]
    assert json.loads(run.status_path.read_text())["state"] == "failed"


def test_chunked_loss_equals_the_full_loss_with_the_same_gradients(tiny_llama: Path) -> None:
    from loratui.models.llm.loading import load_base

    model, _, _ = load_base(str(tiny_llama))
    model.train()
    units = [Unit([1, 5, 9, 13, 17, 21], [-100, -100, 9, 13, 17, 21], 4), Unit([1, 7, 8], [-100, 7, 8], 2)]
    batch = collate(units, 0)
    full = token_loss_sum(model, batch)
    full.backward()
    expected = model.lm_head.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    chunked = chunked_token_loss_sum(model, batch, chunk_tokens=2)
    chunked.backward()
    assert float(chunked.detach()) == pytest.approx(float(full.detach()), rel=1e-5)
    torch.testing.assert_close(model.lm_head.weight.grad, expected, rtol=1e-4, atol=1e-6)


def test_cutting_units_keeps_their_number_and_counts_targets() -> None:
    units = [Unit(list(range(10)), [-100] * 4 + list(range(4, 10)), 6), Unit([1, 2], [-100, 2], 1)]
    cut = cut_units(units, 6)
    assert len(cut) == 2 and cut[1] is units[1]
    assert cut[0].input_ids == list(range(6)) and cut[0].num_targets == 2


def test_quality_rung_cuts_max_seq_len_loudly_after_the_other_rungs(
    tmp_path: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORATUI_OOM_PLANNER", "0")
    data = write_jsonl(tmp_path / "data" / "qa.jsonl", records("prompt_response", 8))
    lowest = {
        "batch_size": 1,
        "gradient_accumulation_steps": 4,
        "gradient_checkpointing": True,
        "chunked_loss": True,
        "simulate_vram": "1TiB",
    }
    full = make_job(make_config(tiny_llama, data, tmp_path / "full", **lowest))
    short = make_job(make_config(tiny_llama, data, tmp_path / "short", max_seq_len=72, **lowest))
    run_training(full, console=False)
    run_training(short, console=False)
    assert max(_peaks(short)) < min(_peaks(full))
    budget = (max(_peaks(short)) + min(_peaks(full))) // 2

    job = make_job(
        make_config(
            tiny_llama, data, tmp_path / "oom", batch_size=4, simulate_vram=str(budget), chunked_loss=False
        )
    )
    write_run_config(job.run.path, job.resolved)  # as `loratui train` does before the worker starts
    result = run_training(job, console=False)
    assert result.state == "finished" and [e["step"] for e in _events(job, "step")] == [1, 2, 3]
    rungs = [e["rung"] for e in _events(job, "oom")]
    first = ["micro_batch", "micro_batch", "gradient_checkpointing", "offload", *_EIGHT_BIT]
    assert rungs[: len(first)] == first
    quality = _events(job, "oom")[len(first) :]
    assert {e["rung"] for e in quality} == {"quality"} and all(e["quality_reduced"] for e in quality)
    assert any("lowering quality" in e["message"] for e in _events(job, "warning"))
    if _EIGHT_BIT:  # training went on with bitsandbytes' 8-bit AdamW on the CPU
        assert _events(job, "oom_recovered")[-1]["new"]["optimizer"] == "adamw8bit"
    lowered = _events(job, "oom_recovered")[-1]["new"]["max_seq_len"]
    assert 48 <= lowered < 96 and f"max_seq_len: {lowered}\n" in read_run_config(job.run.path).to_yaml()
    assert [e["sample_indices"] for e in _events(job, "step")] == [
        StepPlan(8, 4, 1, 3, 42).samples_for_step(s) for s in range(3)
    ]


def test_out_of_memory_in_samples_or_evaluation_skips_them_and_training_goes_on(
    tmp_path: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import loratui.models.llm.generate as llm_sample
    import loratui.train.llm.trainer as llm_trainer

    def no_memory(*_args, **_kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    evaluations = []
    real_evaluate = llm_trainer.evaluate

    def evaluate_once_short(*args, **kwargs):
        evaluations.append(1)
        if len(evaluations) == 1:
            no_memory()
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(llm_sample, "generate_answer", no_memory)
    monkeypatch.setattr(llm_trainer, "evaluate", evaluate_once_short)
    data = write_jsonl(tmp_path / "data" / "qa.jsonl", records("prompt_response", 8))
    cfg = make_config(
        tiny_llama,
        data,
        tmp_path,
        max_steps=4,
        val_split=0.25,
        sample_prompts=["头痛怎么办？"],
        sample_every_steps=2,
    )
    job = make_job(cfg)
    result = run_training(job, console=False)

    assert result.state == "finished" and result.step == 4
    assert [e["step"] for e in _events(job, "step")] == [1, 2, 3, 4]
    skipped = [(e["skipped"], e["step"]) for e in _events(job, "warning") if e.get("skipped")]
    # 6 training rows at batch 2: an epoch is 3 steps; evaluation after each epoch and at the last step
    assert skipped == [("samples", 2), ("evaluation", 3), ("samples", 4)] and not _events(job, "sample")
    assert all(
        "out of memory (OutOfMemoryError: CUDA out of memory" in e["message"]
        for e in _events(job, "warning")
        if e.get("skipped")
    )
    assert len(evaluations) == 2 and [e["step"] for e in _events(job, "eval")] == [4]  # the next one ran
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_other_errors_in_samples_still_fail_the_run(
    tmp_path: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import loratui.models.llm.generate as llm_sample

    def broken(*_args, **_kwargs):
        raise ValueError("template error")

    monkeypatch.setattr(llm_sample, "generate_answer", broken)
    data = write_jsonl(tmp_path / "data" / "qa.jsonl", records("prompt_response", 8))
    job = make_job(
        make_config(tiny_llama, data, tmp_path, max_steps=2, sample_prompts=["hi"], sample_every_steps=1)
    )
    with pytest.raises(ValueError, match="template error"):
        run_training(job, console=False)
