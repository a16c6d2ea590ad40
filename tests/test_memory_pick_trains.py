"""The recommender's pick really trains within the budget it was picked for (CPU, simulated card).

The GPU check of the same promise (`torch.cuda.set_per_process_memory_fraction` on an "8 GB" card) is in
bench/bench_memory_gpu.py. Here the card is the memory meter's simulated budget: the user's config runs out of
memory on it, the recommender's first option trains to the end without a single out-of-memory error (recovery
turned off, so any error would fail the run) and stays under the budget at every step.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from llm_helpers import make_config, make_job, single_thread, write_jsonl

from loratui.config import ResolvedConfig
from loratui.memory.estimate import estimate_peak
from loratui.memory.recommend import recommend
from loratui.memory.tables import clear_memory_cache
from loratui.runs.events import read_events
from loratui.train.llm.trainer import run_training

SEQ = 64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from single_thread()


@pytest.fixture(autouse=True)
def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LORATUI_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LORATUI_SIMULATE_VRAM", raising=False)
    clear_memory_cache()
    yield
    clear_memory_cache()


def _full_rows(tiny_llama: Path, path: Path, n: int) -> Path:
    """`n` text records of SEQ - 1 .. SEQ tokens (the estimate assumes full rows, as in real long data)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    rows = []
    for i in range(n):
        words = [f"w{i}"]
        while len(tokenizer(" ".join([*words, "fever"]))["input_ids"]) < SEQ - 2 - (i % 2):
            words.append("fever")
        rows.append({"text": " ".join(words)})
    return write_jsonl(path, rows)


def _train(cfg) -> tuple[str, list[dict]]:
    job = make_job(cfg)
    try:
        state = run_training(job, console=False).state
    except Exception as exc:  # in-process: the error itself (the worker would record run_failed)
        state = type(exc).__name__
    return state, read_events(job.run.events_path)


def test_the_top_option_trains_without_out_of_memory_on_the_card_it_was_picked_for(
    tmp_path, tiny_llama
) -> None:
    data = _full_rows(tiny_llama, tmp_path / "data" / "text.jsonl", 8)
    cfg = make_config(
        tiny_llama,
        data,
        tmp_path / "user",
        batch_size=4,
        gradient_accumulation_steps=1,
        max_seq_len=SEQ,
        lora_rank=16,
        max_steps=4,
        oom_recovery=False,
        seed=5,
    )
    wanted = estimate_peak(cfg, device="cpu")
    budget = int(wanted.total_bytes * 0.8)

    options = recommend(ResolvedConfig(cfg, {}, "llm"), budget, device="cpu")
    assert options, "nothing fits 80 % of the config's own peak"
    top = options[0]
    print(f"budget {budget} B; picked {top.changes} predicted {top.estimate.total_bytes} B")
    assert top.estimate.total_bytes <= budget
    assert top.config.batch_size * top.config.gradient_accumulation_steps == 4  # effective batch kept

    # the user's config does not fit the card ...
    state, _events = _train(cfg.model_copy(update={"simulate_vram": str(budget)}))
    assert state == "OutOfMemoryError", state
    # ... and the planner's pick trains every step within it
    picked = top.config.model_copy(
        update={
            "simulate_vram": str(budget),
            "output_dir": str(tmp_path / "pick" / "adapter"),
            "runs_dir": str(tmp_path / "pick" / "runs"),
        }
    )
    state, events = _train(picked)
    steps = [e for e in events if e["type"] == "step"]
    assert state == "finished", [e for e in events if e["type"] in ("run_failed", "oom")]
    assert [e["step"] for e in steps] == [1, 2, 3, 4] and not [e for e in events if e["type"] == "oom"]
    assert max(e["meter_peak"] for e in steps) <= budget
