"""GPU throughput and peak memory of loratui's LLM trainer: a ~1B Llama (TinyLlama-1.1B shape, random weights
built from a config), LoRA (bf16 base) and QLoRA (NF4 base), sequence lengths 512 and 2048.

    python bench/bench_llm_gpu.py                         # needs CUDA (+ bitsandbytes for QLoRA)
    python bench/bench_llm_gpu.py --checkpointing         # with gradient checkpointing
    python bench/bench_llm_gpu.py --smoke                 # code-path check on CPU with a small model (LoRA only)

Every run goes through `run_training` (the same code as `loratui train`): batch_size 1, LoRA rank 16 on
q,k,v,o, AdamW, bf16 autocast, `max_steps` steps. Each sample is raw text of (almost exactly) the sequence
length in tokens (counted with the bundled tokenizer). tokens/s: median over the steps after the first two; peak memory:
`torch.cuda.max_memory_allocated()` and the largest `memory_peak` (reserved) in the step events.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import tempfile
from pathlib import Path

from bench_llm_common import build_model, job_for, machine, step_rates

WORDS = [
    "the",
    "patient",
    "doctor",
    "fever",
    "rest",
    "water",
    "pain",
    "sleep",
    "head",
    "throat",
    "cough",
    "day",
]


def exact_length_dataset(path: Path, tokenizer, n: int, tokens: int, seed: int = 0) -> Path:
    """`n` text records of at most `tokens` tokens with BOS and EOS (within a token or two of it)."""
    rng = random.Random(seed)
    budget = tokens - 2  # BOS and EOS
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(n):
            words = [rng.choice(WORDS) for _ in range(tokens * 2)]
            ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"][:budget]
            text = tokenizer.decode(ids)
            while len(tokenizer(text, add_special_tokens=False)["input_ids"]) > budget:
                text = text.rsplit(" ", 1)[0]
            handle.write(json.dumps({"text": text}) + "\n")
    return path


def one_run(
    work: Path, model: Path, data: Path, seq: int, mode: str, steps: int, checkpointing: bool
) -> dict:
    import torch

    from loratui.runs.events import read_events
    from loratui.train.llm.trainer import run_training

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    job = job_for(
        {
            "task_type": "text-generation",
            "base_model": str(model),
            "train_data_dir": str(data),
            "output_dir": str(work / f"out-{mode}-{seq}"),
            "runs_dir": str(work / "runs"),
            "lora_rank": 16,
            "batch_size": 1,
            "max_steps": steps,
            "max_seq_len": seq,
            "mixed_precision": "bf16",
            "load_in_4bit": mode == "qlora",
            "gradient_checkpointing": checkpointing,
            "seed": 0,
        }
    )
    result = run_training(job, console=False)
    events = read_events(job.run.events_path)
    rates = step_rates(events, skip=2)
    row = {
        "mode": mode,
        "seq": seq,
        "checkpointing": checkpointing,
        "tokens_per_s": statistics.median(rates),
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "peak_reserved_gib": max((e.get("memory_peak", 0) for e in events if e["type"] == "step"), default=0)
        / 2**30,
    }
    del result
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seq", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--modes", nargs="+", default=["lora", "qlora"])
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="CPU code-path check with the small model")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()

    import warnings

    import torch
    import transformers
    from transformers import AutoTokenizer

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    if not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("this benchmark needs a CUDA GPU (use --smoke for a CPU code-path check)")
    size = "small" if args.smoke else "1b"
    modes = [m for m in args.modes if m == "lora" or torch.cuda.is_available()]
    seqs = sorted({min(s, 256) for s in args.seq}) if args.smoke else args.seq
    with tempfile.TemporaryDirectory(prefix="bench-llm-gpu-") as tmp:
        work = args.work or Path(tmp)
        model = build_model(work / f"model-{size}", size, dtype="bfloat16")
        tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
        rows = []
        for seq in seqs:
            data = exact_length_dataset(work / f"text-{seq}.jsonl", tokenizer, args.steps + 2, seq)
            for mode in modes:
                row = one_run(work, model, data, seq, mode, args.steps, args.checkpointing)
                rows.append(row)
                print(json.dumps(row), flush=True)
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else machine()
        print(f"device: {name}; model: {size}")
        print("| mode | seq | grad ckpt | tokens/s | peak allocated GiB | peak reserved GiB |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            alloc = f"{r['peak_allocated_gib']:.2f}" if r["peak_allocated_gib"] is not None else "-"
            print(
                f"| {r['mode']} | {r['seq']} | {r['checkpointing']} | {r['tokens_per_s']:.0f} | {alloc} "
                f"| {r['peak_reserved_gib']:.2f} |"
            )


if __name__ == "__main__":
    main()
