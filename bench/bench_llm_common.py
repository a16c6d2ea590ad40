"""Shared pieces of the LLM benchmarks: a random-weight Llama folder of a chosen size, datasets, configs.

Models are built from a config with random weights (nothing is downloaded); the tokenizer is the tiny bundled
byte-level BPE tokenizer (ids < 1000), which any vocabulary size of 1000 or more accepts.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)

SIZES: dict[str, dict[str, Any]] = {
    # ~7M parameters: small enough for a CPU, big enough that compute dominates a step.
    "small": {
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "vocab_size": 1000,
    },
    # TinyLlama-1.1B shape (Llama architecture, GQA), 32k vocabulary.
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
    },
}


def build_model(dest: Path, size: str, *, dtype: str = "float32", seed: int = 0) -> Path:
    """A Llama folder (config + safetensors + tokenizer) of `size` with random weights (reused if present)."""
    import torch
    import transformers

    from loratui.tiny_models.llama import build_tiny_llama

    dest = Path(dest)
    if (dest / "config.json").is_file() and any(dest.glob("*.safetensors")):
        return dest
    tiny = build_tiny_llama(dest.parent / "tokenizer-source")
    config = transformers.LlamaConfig(
        **SIZES[size],
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
        dtype=dtype,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config).to(getattr(torch, dtype))
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for name in TOKENIZER_FILES:
        if (tiny / name).exists():
            shutil.copyfile(tiny / name, tmp / name)
    tmp.rename(dest)
    return dest


def medical_records() -> list[dict[str, str]]:
    """The bundled demo records (prompt/response)."""
    path = REPO / "loratui" / "demo" / "text_assets" / "medical_qa.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_dataset(path: Path, n: int, *, short: bool = False, seed: int = 0) -> Path:
    """`n` records: the demo QA pairs repeated with a counter; `short` keeps them to a few words."""
    rng = random.Random(seed)
    base = medical_records()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for i in range(n):
            rec = dict(base[i % len(base)])
            rec.pop("system", None)
            if short:
                rec = {
                    "prompt": rec["prompt"][: rng.randint(6, 14)],
                    "response": rec["response"][: rng.randint(8, 24)],
                }
            rec["prompt"] = f"{rec['prompt']} #{i}"
            handle.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


def write_text_dataset(path: Path, n: int, words: int, seed: int = 0) -> Path:
    """`n` raw-text records of about `words` words (for fixed-length GPU runs)."""
    rng = random.Random(seed)
    vocab = [
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
        "week",
        "take",
        "see",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(n):
            handle.write(json.dumps({"text": " ".join(rng.choice(vocab) for _ in range(words))}) + "\n")
    return path


def job_for(values: dict[str, Any]):
    """A WorkerJob with a fresh run directory for a config dict."""
    from loratui.config import ResolvedConfig, TrainConfig
    from loratui.runs.rundir import create_run_dir
    from loratui.train.job import WorkerJob

    cfg = TrainConfig(**values)
    run = create_run_dir(Path(cfg.runs_dir), cfg.name)
    return WorkerJob(run, ResolvedConfig(cfg, {}, "llm"), None, True)


def step_rates(events: list[dict[str, Any]], skip: int = 1, clock: str = "time") -> list[float]:
    """tokens/s of each step after the first `skip` (warm-up), from the step events' wall-clock times
    (`clock="time"`) or the process CPU time (`clock="process_cpu_s"`)."""
    steps = [e for e in events if e["type"] == "step"]
    return [
        b["tokens"] / (b[clock] - a[clock]) for a, b in zip(steps[skip - 1 :], steps[skip:], strict=False)
    ]


def machine() -> str:
    import platform

    import torch

    return f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
