"""Memory planner on the CPU: predicted vs metered peak over the full grid, meter overhead, planning speed.

    python bench/bench_memory_cpu.py [--quick] [--json results.json]

Accuracy: for tiny SD1.5, tiny SDXL, tiny Llama and mid-size SD1.5 / Llama models (random weights, built
offline), each (size, checkpointing, rank) trainer session of the real SD / LLM trainer step is measured with
`MemoryMeter` at micro-batch 4 x 1, 2 x 2 and 1 x 4 (two optimizer steps each) and compared with
`estimate_peak(config, device="cpu")`, which calibrates from scratch (empty fit cache).

Overhead: optimizer steps per second of the tiny fixtures with and without the meter.
Planning speed: `recommend()` for SD1.5, SDXL and Llama-2-7B configs with cold in-process caches.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def accuracy_models(root: Path) -> tuple[dict[str, Path], dict[int, Path]]:
    """Tiny and mid-size model folders and image folders under `root`."""
    from loratui.tiny_models import build_tiny_llama, build_tiny_sd
    from loratui.train.memory_check.realstep import build_mid_llama, build_mid_sd15, write_image_dataset

    models = root / "models"
    found = {"llama": build_tiny_llama(models / "llama"), "sd15": build_tiny_sd(models / "sd15", "sd15")}
    found["sdxl"] = build_tiny_sd(models / "sdxl", "sdxl")
    found["mid-llama"] = build_mid_llama(found["llama"], models / "mid-llama")
    found["mid-sd15"] = build_mid_sd15(found["sd15"], models / "mid-sd15")
    images = {res: write_image_dataset(root / "images" / str(res), 4, res) for res in (64, 128)}
    return found, images


def accuracy(root: Path, quick: bool) -> list:
    from loratui.train.memory_check.accuracy import session_rows

    found, images = accuracy_models(root)
    llama, sd15, sdxl = found["llama"], found["sd15"], found["sdxl"]
    mid_llama, mid_sd15 = found["mid-llama"], found["mid-sd15"]
    ranks = (4, 64) if quick else (4, 16, 64)
    grid = list(itertools.product((64, 128), (False, True), ranks))
    plans = [
        ("tiny-llama", "llm", "llm", llama, grid),
        ("tiny-sd15", "sd", "sd15", sd15, grid),
        ("tiny-sdxl", "sd", "sdxl", sdxl, grid),
        ("mid-sd15", "sd", "sd15", mid_sd15, list(itertools.product((64, 128), (False, True), (4, 64)))),
        ("mid-llama", "llm", "llm", mid_llama, list(itertools.product((128, 256), (False, True), (4, 64)))),
    ]
    rows = []
    for name, kind, family, base, sessions in plans:
        started = time.perf_counter()
        for size, ckpt, rank in sessions:
            data = images.get(size, root) if kind == "sd" else root
            rows += session_rows(name, kind, family, base, data, size, ckpt, rank)
        print(f"{name}: {len(sessions) * 3} configs in {time.perf_counter() - started:.0f}s", flush=True)
    return rows


def overhead(root: Path) -> dict[str, float]:
    import torch

    from loratui.config import TrainConfig
    from loratui.memory.meter import MemoryMeter
    from loratui.train.memory_check.realstep import llm_real_step, sd_real_step

    models = root / "models"
    configs = {
        "tiny-llama (batch 2, seq 128)": (
            "llm",
            TrainConfig(
                task_type="text-generation",
                model_family="llm",
                base_model=str(models / "llama"),
                train_data_dir=str(root),
                lora_rank=8,
                batch_size=2,
                max_seq_len=128,
                mixed_precision="no",
            ),
        ),
        "tiny-sd15 (batch 2, 64 px)": (
            "sd15",
            TrainConfig(
                task_type="image-generation",
                model_family="sd15",
                base_model=str(models / "sd15"),
                train_data_dir=str(root / "images" / "64"),
                lora_rank=8,
                batch_size=2,
                resolution=64,
                mixed_precision="no",
            ),
        ),
    }
    result = {}
    torch.set_num_threads(1)
    for label, (family, cfg) in configs.items():
        step = llm_real_step(cfg) if family == "llm" else sd_real_step(cfg, family)
        step.run(None)
        plain, metered = [], []
        for _ in range(3):
            started = time.perf_counter()
            for _ in range(3):
                step.run(None)
            plain.append((time.perf_counter() - started) / 3)
            meter = MemoryMeter()
            for module in step.modules:
                meter.register_model(module)
            meter.register_optimizer(step.optimizer)
            started = time.perf_counter()
            with meter:
                for _ in range(3):
                    step.run(None)
            metered.append((time.perf_counter() - started) / 3)
            meter.close()
        p, m = statistics.median(plain), statistics.median(metered)
        result[label] = {
            "steps_per_s": round(1 / p, 2),
            "metered_steps_per_s": round(1 / m, 2),
            "ratio": round(m / p, 2),
        }
        print(f"overhead {label}: {result[label]}", flush=True)
    return result


def planning_speed() -> dict[str, float]:
    from loratui.config import ResolvedConfig, TrainConfig
    from loratui.memory import estimate
    from loratui.memory.recommend import recommend
    from loratui.memory.tables import clear_memory_cache
    from loratui.util.sizes import GIB

    cases = {
        "SD1.5 512² r32 b4 on 8 GB": {
            "task_type": "image-generation",
            "model_family": "sd15",
            "batch_size": 4,
            "lora_rank": 32,
            "mixed_precision": "fp16",
        },
        "SDXL 1024² r32 b4 on 12 GB": {
            "task_type": "image-generation",
            "model_family": "sdxl",
            "resolution": 1024,
            "batch_size": 4,
            "lora_rank": 32,
            "mixed_precision": "bf16",
        },
        "Llama-2-7B seq 2048 r64 b8 on 8 GB": {
            "task_type": "text-generation",
            "base_model": "llama-2-7b",
            "max_seq_len": 2048,
            "batch_size": 8,
            "lora_rank": 64,
        },
    }
    budgets = {
        "SD1.5 512² r32 b4 on 8 GB": 8,
        "SDXL 1024² r32 b4 on 12 GB": 12,
        "Llama-2-7B seq 2048 r64 b8 on 8 GB": 8,
    }
    out = {}
    for label, values in cases.items():
        clear_memory_cache()
        estimate._PLANNERS.clear()
        cfg = TrainConfig(**values)
        started = time.perf_counter()
        options = recommend(
            ResolvedConfig(cfg, {}, cfg.model_family if cfg.model_family != "auto" else "llm"),
            budgets[label] * GIB,
        )
        out[label] = round(time.perf_counter() - started, 2)
        top = options[0].changes if options else None
        print(f"recommend {label}: {out[label]}s, top option {top}", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ranks 4 and 64 only")
    parser.add_argument("--json", type=Path, help="write all rows and summaries here")
    parser.add_argument(
        "--parts", default="accuracy,overhead,planning", help="comma-separated: accuracy, overhead, planning"
    )
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    from loratui.train.memory_check.accuracy import markdown_table, summarize

    rows, by_model, total, ratios, speed, seconds = [], {}, {"median": 0.0, "worst": 0.0}, {}, {}, 0.0
    with tempfile.TemporaryDirectory(prefix="loratui-bench-memory-") as tmp:
        root = Path(tmp)
        os.environ["LORATUI_CACHE_DIR"] = str(root / "cache")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if parts & {"accuracy", "overhead"}:
            started = time.perf_counter()
            rows = accuracy(root, args.quick) if "accuracy" in parts else []
            seconds = time.perf_counter() - started
        if rows:
            print(markdown_table(rows))
            for name in dict.fromkeys(r.model for r in rows):
                by_model[name] = summarize([r for r in rows if r.model == name])
            total = summarize(rows)
            for name, stats in {**by_model, "all": total}.items():
                print(f"{name}: n={stats['count']} median {stats['median']:.2%} worst {stats['worst']:.2%}")
        if "overhead" in parts:
            if not rows:
                accuracy_models(root)
            ratios = overhead(root)
        if "planning" in parts:
            speed = planning_speed()
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "rows": [r.to_dict() for r in rows],
                    "summary": by_model,
                    "all": total,
                    "accuracy_seconds": seconds,
                    "overhead": ratios,
                    "recommend_seconds": speed,
                },
                indent=1,
            )
        )
    return 0 if total["median"] <= 0.05 and total["worst"] <= 0.10 else 1


if __name__ == "__main__":
    sys.exit(main())
