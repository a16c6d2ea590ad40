"""Predicted vs metered peak on the CPU: the trainers' real step under `MemoryMeter` against `estimate_peak`.

One session per (size, checkpointing, rank) sets the trainer up once with an effective batch of 4 and measures
two optimizer steps for each micro-batch size (4 x 1, 2 x 2, 1 x 4), so accumulation is covered too. Used by
tests/test_memory_accuracy.py and bench/bench_memory_cpu.py.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

EFFECTIVE_BATCH = 4


@dataclass
class Row:
    """One measured configuration."""

    model: str
    batch: int
    accumulation: int
    size: int  # resolution (SD) or sequence length (LLM)
    checkpointing: bool
    rank: int
    measured: int
    predicted: int
    seconds: float

    @property
    def error(self) -> float:
        return self.predicted / self.measured - 1.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "error": round(self.error, 4)}


def _config(
    kind: str,
    family: str,
    base: Path,
    data: Path,
    size: int,
    ckpt: bool,
    rank: int,
    options: dict | None = None,
    **extra: Any,
) -> Any:
    from loratui.config import TrainConfig

    common = {
        **extra,
        "base_model": str(base),
        "train_data_dir": str(data),
        "lora_rank": rank,
        "batch_size": EFFECTIVE_BATCH,
        "gradient_checkpointing": ckpt,
        "mixed_precision": "no",
        **(options or {}),
    }
    if kind == "llm":
        return TrainConfig(task_type="text-generation", model_family="llm", max_seq_len=size, **common)
    return TrainConfig(task_type="image-generation", model_family=family, resolution=size, **common)


def session_rows(
    name: str,
    kind: str,
    family: str,
    base: Path,
    data: Path,
    size: int,
    ckpt: bool,
    rank: int,
    batches: tuple[int, ...] = (4, 2, 1),
    options: dict | None = None,
    **extra: Any,
) -> list[Row]:
    """Measure and predict each micro-batch size of one trainer session (`options` / `extra`: more config keys,
    e.g. `{"load_in_4bit": True, "optimizer": "adamw8bit"}`)."""
    from loratui.memory.estimate import estimate_peak
    from loratui.train.memory_check.realstep import llm_real_step, measure_real_peak, sd_real_step

    cfg = _config(kind, family, base, data, size, ckpt, rank, options, **extra)
    step = llm_real_step(cfg) if kind == "llm" else sd_real_step(cfg, family)
    rows = []
    for batch in batches:
        started = time.perf_counter()
        meter = measure_real_peak(step, steps=2, micro_batch=batch)
        seconds = time.perf_counter() - started
        variant = cfg.model_copy(
            update={"batch_size": batch, "gradient_accumulation_steps": EFFECTIVE_BATCH // batch}
        )
        predicted = estimate_peak(variant, family=family, device="cpu").total_bytes
        rows.append(
            Row(name, batch, EFFECTIVE_BATCH // batch, size, ckpt, rank, meter.peak_bytes, predicted, seconds)
        )
    return rows


def summarize(rows: list[Row]) -> dict[str, float]:
    """Median and worst absolute relative error, and the count."""
    errors = [abs(r.error) for r in rows]
    return {"count": len(rows), "median": statistics.median(errors), "worst": max(errors)}


def markdown_table(rows: list[Row]) -> str:
    from loratui.util.sizes import format_bytes

    lines = [
        "| model | micro-batch x accum | size | ckpt | rank | metered | predicted | error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.batch} x {r.accumulation} | {r.size} | {'on' if r.checkpointing else 'off'} | "
            f"{r.rank} | {format_bytes(r.measured)} | {format_bytes(r.predicted)} | {r.error:+.2%} |"
        )
    return "\n".join(lines)
