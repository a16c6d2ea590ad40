"""QLoRA and 8-bit AdamW on the CPU: the planner's prediction vs the metered peak of the trainer's real step.

    python bench/bench_qlora_cpu.py [--json results.json]

bitsandbytes >= 0.50 runs NF4 `Linear4bit` forward/backward and `AdamW8bit` on the CPU, so the LLM trainer's
QLoRA and 8-bit AdamW steps are measured here with `MemoryMeter` (4-bit weights counted with their quantisation
state) on the mid-size Llama (hidden 256, 4 layers, vocabulary 1,000; random weights, built offline) and
compared with `estimate_peak(config, device="cpu")` calibrated from scratch. Each session trains at an
effective batch of 4 as micro-batch 4 x 1 and 2 x 2, two optimizer steps each, fp32 (`mixed_precision: no`).

Also printed: the planner's CUDA prediction for Llama-3.1-8B QLoRA at batch 2, sequence 2048, checkpointing,
bf16, rank 8 (the torchtune README case), from the shipped table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SESSIONS = [
    (seq, ckpt, rank, options)
    for options in (
        {"load_in_4bit": True},
        {"optimizer": "adamw8bit"},
        {"load_in_4bit": True, "optimizer": "adamw8bit"},
    )
    for seq in (128, 256)
    for ckpt, rank in ((False, 16), (True, 64))
]


def accuracy(root: Path) -> list:
    from loratui.tiny_models import build_tiny_llama
    from loratui.train.memory_check.accuracy import session_rows
    from loratui.train.memory_check.realstep import build_mid_llama

    mid = build_mid_llama(build_tiny_llama(root / "llama"), root / "mid-llama")
    rows = []
    for seq, ckpt, rank, options in SESSIONS:
        label = "mid-llama " + " + ".join(
            {"load_in_4bit": "QLoRA", "optimizer": "8-bit AdamW"}[key] for key in options
        )
        found = session_rows(label, "llm", "llm", mid, root, seq, ckpt, rank, batches=(4, 2), options=options)
        for row in found:
            print(f"{label} seq {seq} ckpt {ckpt} rank {rank} b{row.batch}: {row.error:+.2%}", flush=True)
        rows += found
    return rows


def llama31_8b_qlora() -> dict:
    from loratui.config import TrainConfig
    from loratui.memory.arch import bundled_llm_config
    from loratui.memory.estimate import estimate_peak

    folder = Path(tempfile.mkdtemp(prefix="loratui-llama31-"))
    (folder / "config.json").write_text(json.dumps(bundled_llm_config("llama-3.1-8b")), encoding="utf-8")
    out = {}
    for label, targets in (("all-linear", ["all-linear"]), ("q,k,v,o", None)):
        cfg = TrainConfig(
            task_type="text-generation",
            base_model=str(folder),
            load_in_4bit=True,
            batch_size=2,
            max_seq_len=2048,
            gradient_checkpointing=True,
            mixed_precision="bf16",
            lora_rank=8,
            target_modules=targets,
        )
        estimate = estimate_peak(cfg, device="cuda")
        out[label] = {"total": estimate.total_bytes, "breakdown": estimate.breakdown}
        print(
            f"Llama-3.1-8B QLoRA b2 s2048 ckpt r8 {label}: {estimate.total_bytes / 2**30:.2f} GiB", flush=True
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write rows and predictions here")
    args = parser.parse_args()
    from loratui.models.quant import bitsandbytes_problem
    from loratui.train.memory_check.accuracy import markdown_table, summarize

    problem = bitsandbytes_problem("cpu", "this benchmark")
    if problem:
        print(problem, file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="loratui-bench-qlora-") as tmp:
        os.environ["LORATUI_CACHE_DIR"] = str(Path(tmp) / "cache")  # calibrate from scratch
        rows = accuracy(Path(tmp))
    stats = summarize(rows)
    print(markdown_table(rows))
    print(
        f"median |error| {stats['median']:.2%}, worst {stats['worst']:.2%} over {stats['count']} configurations"
    )
    big = llama31_8b_qlora()
    if args.json:
        payload = {"rows": [r.to_dict() for r in rows], "summary": stats, "llama31_8b_qlora": big}
        args.json.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
