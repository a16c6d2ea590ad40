"""LLM step memory on the CPU meter: a Llama-3.2-1B-shaped model (128k vocabulary), chunked loss off and on.

    OMP_NUM_THREADS=2 python bench/bench_llm_lean_memory.py [--seq 2048] [--json out.json]

Builds a Llama-3.2-1B-shaped causal LM from `LlamaConfig` (hidden 2048, 16 layers, 32 heads / 8 KV heads,
intermediate 8192, vocabulary 128,256, tied embeddings; random weights, nothing downloaded) and saves it in
bf16. Then, for `chunked_loss` on and off, runs one optimizer step of the LLM trainer's real step
(`loratui.train.memory_check.realstep.llm_real_step`: LoRA rank 8 on the default targets, every linear layer;
gradient checkpointing, bf16 on the CPU, batch 1, every token a target) under `MemoryMeter`, and compares the
metered peak with `estimate_peak(config, device="cpu")` (traced with the CPU's autocast rules). Peak host memory stays under about 8 GB (full logits) and 3.5 GB (chunked).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LLAMA_32_1B = {
    "hidden_size": 2048,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 8192,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-5,
}


def build_model(dest: Path, shape: dict, tokenizer_from: Path) -> Path:
    """A random-weight Llama of `shape`, saved in bf16, with a tiny tokenizer (data are random token ids)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**shape, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # built in bf16: no fp32 copy
    model.save_pretrained(dest, safe_serialization=True)
    del model
    gc.collect()
    for item in tokenizer_from.iterdir():
        if item.name.startswith("tokenizer") or item.name in (
            "special_tokens_map.json",
            "chat_template.jinja",
        ):
            shutil.copy(item, dest / item.name)
    return dest


def metered_step(step, threads: int):
    """One optimizer step of `step` under a `MemoryMeter` (weights and optimizer registered), on `threads`."""
    import torch

    from loratui.memory.meter import MemoryMeter

    meter = MemoryMeter()
    for module in step.modules:
        meter.register_model(module)
    meter.register_optimizer(step.optimizer)
    meter.reset_peak()
    torch.set_num_threads(threads)
    with meter:
        step.run(None)
    return meter


def measure(base: Path, seq: int, chunked: bool, threads: int = 2, **extra) -> dict:
    """Metered peak of one optimizer step of the real LLM step, then the planner's prediction."""
    from loratui.config import TrainConfig
    from loratui.memory.estimate import estimate_peak
    from loratui.train.memory_check.realstep import llm_real_step

    cfg = TrainConfig(
        task_type="text-generation",
        model_family="llm",
        base_model=str(base),
        train_data_dir=str(base),
        max_seq_len=seq,
        batch_size=1,
        lora_rank=8,
        gradient_checkpointing=True,
        mixed_precision="bf16",
        chunked_loss=chunked,
        **extra,
    )
    step = llm_real_step(cfg)
    started = time.perf_counter()
    meter = metered_step(step, threads)
    seconds = time.perf_counter() - started
    peak, breakdown = meter.peak_bytes, meter.breakdown("peak")
    meter.close()
    del step, meter
    gc.collect()
    print(f"chunked_loss={chunked}: metered {peak} bytes in {seconds:.0f}s {breakdown}", flush=True)
    started = time.perf_counter()
    predicted = estimate_peak(cfg, device="cpu")
    return {
        "chunked_loss": chunked,
        **extra,
        "seq": seq,
        "metered_peak": peak,
        "metered_breakdown": breakdown,
        "predicted_peak": predicted.total_bytes,
        "predicted_breakdown": predicted.breakdown,
        "error": round(predicted.total_bytes / peak - 1, 4),
        "step_seconds": round(seconds, 1),
        "planning_seconds": round(time.perf_counter() - started, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only", choices=("on", "off"), help="measure one setting only")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the step")
    args = parser.parse_args()
    from loratui.tiny_models import build_tiny_llama
    from loratui.util.sizes import format_bytes

    rows = []
    with tempfile.TemporaryDirectory(prefix="loratui-bench-lean-") as tmp:
        root = Path(tmp)
        tiny = build_tiny_llama(root / "tiny")
        started = time.perf_counter()
        base = build_model(root / "llama-3.2-1b-shape", LLAMA_32_1B, tiny)
        print(f"built the 1B-shaped model in {time.perf_counter() - started:.0f}s", flush=True)
        settings = [True, False] if args.only is None else [args.only == "on"]
        for chunked in settings:
            row = measure(base, args.seq, chunked, args.threads)
            rows.append(row)
            print(
                f"chunked_loss={chunked}: metered {format_bytes(row['metered_peak'])}, predicted "
                f"{format_bytes(row['predicted_peak'])} ({row['error']:+.1%}); step {row['step_seconds']}s",
                flush=True,
            )
    if len(rows) == 2:
        on, off = rows
        print(
            f"saving of the chunked loss: {format_bytes(off['metered_peak'] - on['metered_peak'])} "
            f"({on['metered_peak'] / off['metered_peak']:.2f}x of the full-logits peak)",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
