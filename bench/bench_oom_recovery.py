"""In-process out-of-memory recovery: time from the OOM to the next completed optimizer step.

    python bench/bench_oom_recovery.py                 # CPU, tiny Llama, memory meter's simulated card
    python bench/bench_oom_recovery.py --repeats 7
    python bench/bench_oom_recovery.py --gpu           # CUDA: a real OOM forced with set_per_process_memory_fraction

CPU: the simulated card (`simulate_vram`) is calibrated between the metered peak of micro-batch 2 x 2 and of
4 x 1, so the configured 4 x 1 runs out of memory in step 1 and the ladder's first rung (micro-batch 2,
accumulation 2) recovers. The figure is the `oom_recovered` event's `seconds`: from the failure (the exception
leaving the step) through freeing, choosing the rung, applying it and re-running the whole step, to the end of
the retried step. For scale, the median time of an ordinary step at 2 x 2 (same run, later steps) is reported.
Variants: the memory planner consulted (cold: its fits for this model are traced first; warm: cached) and not
consulted (`LORATUI_OOM_PLANNER=0`).

GPU (`--gpu`): the small Llama (3.4M parameters, vocabulary 1,000) at micro-batch 32, sequence 512; the
per-process memory fraction is set between the peaks of 16 x 2 and 32 x 1 so CUDA itself raises
`torch.OutOfMemoryError`; reported the same way.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def _job(values: dict):
    from loratui.config import ResolvedConfig, TrainConfig
    from loratui.runs.rundir import create_run_dir
    from loratui.train.job import WorkerJob

    cfg = TrainConfig(**values)
    return WorkerJob(create_run_dir(Path(cfg.runs_dir), cfg.name), ResolvedConfig(cfg, {}, "llm"), None, True)


def _train(values: dict) -> list[dict]:
    from loratui.runs.events import read_events
    from loratui.train.llm.trainer import run_training

    job = _job(values)
    run_training(job, console=False)
    return read_events(job.run.events_path)


def _step_seconds(events: list[dict], after: int) -> list[float]:
    steps = [e for e in events if e["type"] == "step"]
    return [b["time"] - a["time"] for a, b in zip(steps, steps[1:], strict=False) if b["step"] > after]


def _values(work: Path, model: Path, data: Path, tag: str, **changes) -> dict:
    values = {
        "task_type": "text-generation",
        "model_family": "llm",
        "base_model": str(model),
        "train_data_dir": str(data),
        "output_dir": str(work / f"out-{tag}"),
        "runs_dir": str(work / "runs"),
        "lora_rank": 4,
        "learning_rate": 1e-3,
        "batch_size": 4,
        "max_steps": 8,
        "max_seq_len": 96,
        "mixed_precision": "no",
        "save_steps": None,
        "seed": 0,
    }
    values.update(changes)
    return values


def _recovery(events: list[dict]) -> float:
    found = [e for e in events if e["type"] == "oom_recovered"]
    rungs = [e["rung"] for e in events if e["type"] == "oom"]
    assert len(found) == 1 and rungs == ["micro_batch"], f"expected one micro-batch recovery, got {rungs}"
    return float(found[0]["seconds"])


def bench_cpu(repeats: int) -> None:
    import torch
    from bench_llm_common import write_dataset

    from loratui.tiny_models.llama import build_tiny_llama

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["LORATUI_CACHE_DIR"] = str(work / "cache")  # cold planner fits on the first recovery
        model = build_tiny_llama(work / "tiny-llama")
        data = write_dataset(work / "data.jsonl", 32, short=True)
        small = _train(
            _values(
                work, model, data, "cal2", batch_size=2, gradient_accumulation_steps=2, simulate_vram="1TiB"
            )
        )
        large = _train(_values(work, model, data, "cal4", simulate_vram="1TiB"))
        peak2 = max(e["meter_peak"] for e in small if e["type"] == "step")
        peak4 = min(e["meter_peak"] for e in large if e["type"] == "step")
        budget = (peak2 + peak4) // 2
        print(f"metered peaks: 2x2 {peak2:,} B, 4x1 {peak4:,} B; simulated card {budget:,} B")
        results: dict[str, list[float]] = {"planner cold": [], "planner warm": [], "no planner": []}
        ordinary: list[float] = []
        for repeat in range(repeats):
            for variant in ("planner", "no planner"):
                os.environ["LORATUI_OOM_PLANNER"] = "0" if variant == "no planner" else "1"
                events = _train(_values(work, model, data, f"oom{repeat}", simulate_vram=str(budget)))
                name = (
                    variant
                    if variant == "no planner"
                    else ("planner cold" if repeat == 0 else "planner warm")
                )
                results[name].append(_recovery(events))
                ordinary += _step_seconds(events, after=1)
        os.environ.pop("LORATUI_OOM_PLANNER", None)
    print(f"ordinary step at 2x2 under the meter: median {statistics.median(ordinary) * 1000:.0f} ms")
    for name, values in results.items():
        if values:
            print(
                f"OOM -> next completed step, {name}: median {statistics.median(values) * 1000:.0f} ms "
                f"(n={len(values)}, min {min(values) * 1000:.0f}, max {max(values) * 1000:.0f})"
            )


def bench_gpu(repeats: int) -> None:
    import torch
    from bench_llm_common import build_model, write_dataset

    assert torch.cuda.is_available(), "--gpu needs CUDA"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_model(work / "small", "small")
        data = write_dataset(work / "data.jsonl", 256)
        common = {"max_seq_len": 512, "mixed_precision": "bf16", "max_steps": 6}

        def peak(**changes) -> int:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            _train(_values(work, model, data, "cal", **common, **changes))
            return int(torch.cuda.max_memory_reserved())

        small, large = peak(batch_size=16, gradient_accumulation_steps=2), peak(batch_size=32)
        total = torch.cuda.get_device_properties(0).total_memory
        fraction = (small + large) / 2 / total
        print(
            f"reserved peaks: 16x2 {small:,} B, 32x1 {large:,} B; memory fraction {fraction:.5f} of {total:,} B"
        )
        times, ordinary = [], []
        for repeat in range(repeats):
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(fraction)
            try:
                events = _train(_values(work, model, data, f"oom{repeat}", batch_size=32, **common))
            finally:
                torch.cuda.set_per_process_memory_fraction(1.0)
            times.append(_recovery(events))
            ordinary += _step_seconds(events, after=1)
    print(f"ordinary step at 16x2: median {statistics.median(ordinary) * 1000:.1f} ms")
    print(
        f"OOM -> next completed step (CUDA): median {statistics.median(times) * 1000:.1f} ms (n={len(times)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gpu", action="store_true", help="real CUDA OOM (set_per_process_memory_fraction)")
    args = parser.parse_args()
    (bench_gpu if args.gpu else bench_cpu)(args.repeats)


if __name__ == "__main__":
    main()
