"""Model families on the CPU: LoRA size of the default targets and the planner's accuracy per family.

    python bench/bench_llm_families.py [--quick] [--json results.json]

For each tiny family fixture (`loratui.tiny_models.LLM_FAMILIES`, random weights, built offline): the trainable
LoRA parameters at rank 8 with the family default targets (what the trainer creates), and the memory planner's
predicted peak (`estimate_peak(config, device="cpu")`, calibrated from scratch) against the metered peak of the
real LLM trainer step (`MemoryMeter`) over (sequence 64/128) x (checkpointing off/on) x (rank 4/16) sessions,
each at micro-batch 4 x 1, 2 x 2 and 1 x 4. `--quick`: two sessions per family.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FULL = list(itertools.product((64, 128), (False, True), (4, 16)))
QUICK = [(64, False, 4), (128, True, 16)]


def lora_params(folder: Path, rank: int = 8) -> int:
    """Trainable parameters of the trainer's LoRA with the default targets."""
    from loratui.config import TrainConfig
    from loratui.models.llm.loading import load_base
    from loratui.models.llm.lora import setup_lora

    cfg = TrainConfig(task_type="text-generation", model_family="llm", base_model=str(folder), lora_rank=rank)
    model = setup_lora(cfg, load_base(str(folder))[0])
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def family_accuracy(family: str, folder: Path, work: Path, sessions: list[tuple[int, bool, int]]) -> dict:
    from loratui.train.memory_check.accuracy import session_rows, summarize

    rows = []
    for seq, ckpt, rank in sessions:
        rows += session_rows(family, "llm", "llm", folder, work, seq, ckpt, rank)
    stats = summarize(rows)
    return {"median": stats["median"], "worst": stats["worst"], "configs": stats["count"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from loratui.memory.tables import clear_memory_cache
    from loratui.tiny_models import LLM_FAMILIES, build_tiny_llm

    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory(prefix="loratui-families-") as tmp:
        root = Path(tmp)
        os.environ["LORATUI_CACHE_DIR"] = str(root / "cache")  # calibrate from scratch
        clear_memory_cache()
        for family in LLM_FAMILIES:
            start = time.perf_counter()
            folder = build_tiny_llm(root / "models" / family, family)
            built = time.perf_counter() - start
            row = {"build_s": round(built, 2), "lora_params_r8": lora_params(folder)}
            row.update(family_accuracy(family, folder, root / "work" / family, QUICK if args.quick else FULL))
            results[family] = row
            print(
                f"| {family} | {row['lora_params_r8']:,} | {row['configs']} | {row['median']:.2%} | "
                f"{row['worst']:.2%} |",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
