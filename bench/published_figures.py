"""Peers' published, measured peak memory vs loratui's planner for its own trainer at the same settings.

    python bench/published_figures.py [--cases ID,ID] [--markdown] [--json out.json]

Each `PeerFigure` is one figure a peer measured on a GPU and published, with its source (repository file at a
commit) and every setting that figure was taken at. For each, loratui's planner predicts its own LLM step at
those settings (shipped architecture configs, no weights, nothing downloaded) and the script prints the ratio
and the verdict against the goal: loratui's step needs no more than the peer's peak + 5 %. Figures are compared
on the peer's memory statistic: `torch.cuda.max_memory_allocated` (litgpt), torchtune's "peak memory active" or
its unstated "peak memory per GPU" (both compared on the allocated basis: the planner's total without the CUDA
context, library workspaces and allocator fragmentation). Units: litgpt prints GB = 10^9 bytes, torchtune GiB.

The second half of the goal (the planner within 10 % of loratui's own measured step) needs a GPU:
`bench/gpu_check.py` measures it; here the planner's stated error band is shown.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

GIB = 2**30
GOAL = 0.05  # loratui's step may need at most the peer's peak + 5 %
STATISTICS = {
    "allocated": "torch.cuda.max_memory_allocated",
    "active": "peak memory active (torch.cuda.memory_stats active_bytes.all.peak)",
    "unstated": "not stated by the source (torchtune logs active / allocated / reserved); allocated basis",
}
UNITS = {"GB": 1e9, "GiB": float(GIB)}

LITGPT = "https://github.com/Lightning-AI/litgpt/blob/26857050fe3ff627cd714fe92f5838f51a3d5efa/config_hub/finetune/"
TORCHTUNE = "https://github.com/pytorch/torchtune/blob/bd2a0fc7c31430972728494fa01aaeeb0ebf1ba1/"
LITGPT_COMMON = (
    "Alpaca2k (samples padded to the longest in the batch, at most 512 tokens: loratui is predicted at 512, an "
    "upper bound); bf16-true (weights and LoRA in bf16); no activation checkpointing; AdamW lr 2e-4; 1 x A10G; "
    "peak over the whole run printed by litgpt.utils as max_memory_allocated() / 1e9"
)
ATTENTION = ("q_proj", "v_proj")
ALL_LINEAR_AND_HEAD = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
PHI3_LINEAR_AND_HEAD = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")
TORCHTUNE_TARGETS = ("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Mistral-7B-v0.1 and Phi-3-mini-4k differ from shipped configs only in these keys (their published config.json)
MISTRAL_V01 = {
    "vocab_size": 32000,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "max_position_embeddings": 32768,
}
PHI3_MINI = {
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32064,
    "max_position_embeddings": 4096,
    "original_max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "sliding_window": 2047,
    "bos_token_id": 1,
    "eos_token_id": 32000,
    "pad_token_id": 32000,
}
#: options a peer used that change memory, and the loratui config (key, value) pairs that would express them
#: (the first key the config has is used; none: loratui lacks the option)
OPTION_KEYS: dict[str, tuple[tuple[str, Any], ...]] = {
    "chunked cross-entropy": (("chunked_loss", True),),
    "activation offloading to CPU": (
        ("activation_offloading", True),
        ("offload_activations", True),
        ("activation_offload", True),
    ),
    "LoRA weights in bf16": (("lora_dtype", "bf16"), ("lora_weights_dtype", "bf16")),
}


@dataclass(frozen=True)
class PeerFigure:
    """One published, measured peak-memory figure and the exact settings it was measured at."""

    id: str
    peer: str
    source: str
    model: str
    arch: str  # shipped config (loratui/memory/arch_configs) of that model
    method: str  # LoRA | QLoRA
    rank: int
    alpha: int
    dropout: float
    targets: tuple[str, ...]  # in Hugging Face module names
    batch: int
    seq_len: int
    checkpointing: bool
    precision: str
    optimizer: str
    gpu: str
    statistic: str  # key of STATISTICS
    value: float
    unit: str  # GB | GiB
    settings_note: str
    options: tuple[str, ...] = ()  # memory options beyond the above (keys of OPTION_KEYS, or others)
    arch_overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def peak_bytes(self) -> float:
        return self.value * UNITS[self.unit]


def _litgpt(id_: str, model: str, arch: str, method: str, batch: int, value: float, **kw: Any) -> PeerFigure:
    folder = kw.pop("folder", arch)
    rank, alpha, dropout = kw.pop("rank", 32), kw.pop("alpha", 16), kw.pop("dropout", 0.05)
    targets = kw.pop("targets", ATTENTION)
    return PeerFigure(
        id=id_,
        peer="litgpt",
        source=f"{LITGPT}README.md (row {folder}/{method.lower()}.yaml; settings in that yaml)",
        model=model,
        arch=arch,
        method=method,
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        targets=targets,
        batch=batch,
        seq_len=512,
        checkpointing=False,
        precision="bf16-true" + (", bnb.nf4" if method == "QLoRA" else ""),
        optimizer="AdamW",
        gpu="1 x A10G (24 GB)",
        statistic="allocated",
        value=value,
        unit="GB",
        settings_note=LITGPT_COMMON,
        options=("LoRA weights in bf16",),
        **kw,
    )


FIGURES: tuple[PeerFigure, ...] = (
    PeerFigure(
        id="torchtune-llama3.1-8b-lora",
        peer="torchtune",
        source=f"{TORCHTUNE}README.md (Memory and training speed; recipes/configs/llama3_1/8B_lora_single_device.yaml)",
        model="Llama-3.1-8B",
        arch="llama-3.1-8b",
        method="LoRA",
        rank=8,
        alpha=16,
        dropout=0.0,
        targets=TORCHTUNE_TARGETS,
        batch=2,
        seq_len=2048,
        checkpointing=True,
        precision="bf16 (weights and LoRA)",
        optimizer="AdamW",
        gpu="1 x RTX 4090 (24 GB)",
        statistic="unstated",
        value=16.2,
        unit="GiB",
        settings_note="dataset packed to 2048 tokens, no gradient accumulation, torch.compile on",
        options=("chunked cross-entropy", "LoRA weights in bf16", "torch.compile"),
    ),
    PeerFigure(
        id="torchtune-llama3.1-8b-qlora",
        peer="torchtune",
        source=f"{TORCHTUNE}README.md (Memory and training speed; recipes/configs/llama3_1/8B_qlora_single_device.yaml)",
        model="Llama-3.1-8B",
        arch="llama-3.1-8b",
        method="QLoRA",
        rank=8,
        alpha=16,
        dropout=0.0,
        targets=TORCHTUNE_TARGETS,
        batch=2,
        seq_len=2048,
        checkpointing=True,
        precision="NF4 base (torchao), other weights and LoRA bf16",
        optimizer="AdamW",
        gpu="1 x RTX 4090 (24 GB)",
        statistic="unstated",
        value=7.4,
        unit="GiB",
        settings_note="dataset packed to 2048 tokens, no gradient accumulation, torch.compile on",
        options=("chunked cross-entropy", "LoRA weights in bf16", "torch.compile"),
    ),
    PeerFigure(
        id="torchtune-llama3.2-3b-lora",
        peer="torchtune",
        source=f"{TORCHTUNE}README.md (Optimization flags, row LoRA; recipes/configs/llama3_2/3B_lora_single_device.yaml)",
        model="Llama-3.2-3B",
        arch="llama-3.2-3b",
        method="LoRA",
        rank=64,
        alpha=128,
        dropout=0.0,
        targets=TORCHTUNE_TARGETS,
        batch=2,
        seq_len=4096,
        checkpointing=True,
        precision="bf16 (weights and LoRA)",
        optimizer="AdamW",
        gpu="1 x A100",
        statistic="active",
        value=8.5,
        unit="GiB",
        settings_note="packed to 4096 tokens, torch.compile, chunked cross-entropy, activation checkpointing and "
        "activation offloading (the table's options applied in sequence), gradient accumulation 1",
        options=(
            "chunked cross-entropy",
            "activation offloading to CPU",
            "LoRA weights in bf16",
            "torch.compile",
        ),
    ),
    PeerFigure(
        id="torchtune-llama3.2-3b-qlora",
        peer="torchtune",
        source=f"{TORCHTUNE}README.md (Optimization flags, row QLoRA; recipes/configs/llama3_2/3B_qlora_single_device.yaml)",
        model="Llama-3.2-3B",
        arch="llama-3.2-3b",
        method="QLoRA",
        rank=64,
        alpha=128,
        dropout=0.0,
        targets=TORCHTUNE_TARGETS,
        batch=2,
        seq_len=4096,
        checkpointing=True,
        precision="NF4 base (torchao), other weights and LoRA bf16",
        optimizer="AdamW",
        gpu="1 x A100",
        statistic="active",
        value=4.6,
        unit="GiB",
        settings_note="packed to 4096 tokens, torch.compile, chunked cross-entropy, activation checkpointing and "
        "activation offloading, gradient accumulation 1 (the README's command for this row)",
        options=(
            "chunked cross-entropy",
            "activation offloading to CPU",
            "LoRA weights in bf16",
            "torch.compile",
        ),
    ),
    _litgpt("litgpt-llama2-7b-lora", "Llama-2-7B", "llama-2-7b", "LoRA", 2, 19.77),
    _litgpt("litgpt-llama2-7b-qlora", "Llama-2-7B", "llama-2-7b", "QLoRA", 2, 13.68),
    _litgpt("litgpt-llama3.1-8b-lora", "Llama-3.1-8B", "llama-3.1-8b", "LoRA", 1, 19.73),
    _litgpt("litgpt-llama3.1-8b-qlora", "Llama-3.1-8B", "llama-3.1-8b", "QLoRA", 2, 17.41),
    _litgpt(
        "litgpt-llama3.2-1b-lora", "Llama-3.2-1B", "llama-3.2-1b", "LoRA", 1, 4.49, folder="llama-3.2-1B"
    ),
    _litgpt(
        "litgpt-llama3.2-1b-qlora", "Llama-3.2-1B", "llama-3.2-1b", "QLoRA", 2, 5.53, folder="llama-3.2-1B"
    ),
    _litgpt(
        "litgpt-llama3.2-3b-lora", "Llama-3.2-3B", "llama-3.2-3b", "LoRA", 1, 9.67, folder="llama-3.2-3B"
    ),
    _litgpt(
        "litgpt-llama3.2-3b-qlora", "Llama-3.2-3B", "llama-3.2-3b", "QLoRA", 2, 10.30, folder="llama-3.2-3B"
    ),
    _litgpt(
        "litgpt-mistral-7b-lora",
        "Mistral-7B-v0.1",
        "mistral-7b-v0.3",
        "LoRA",
        2,
        20.66,
        folder="mistral-7b",
        arch_overrides=MISTRAL_V01,
    ),
    _litgpt(
        "litgpt-mistral-7b-qlora",
        "Mistral-7B-v0.1",
        "mistral-7b-v0.3",
        "QLoRA",
        2,
        14.29,
        folder="mistral-7b",
        arch_overrides=MISTRAL_V01,
    ),
    _litgpt(
        "litgpt-tinyllama-lora",
        "TinyLlama-1.1B",
        "tinyllama-1.1b",
        "LoRA",
        8,
        13.50,
        folder="tiny-llama",
        targets=ALL_LINEAR_AND_HEAD,
    ),
    _litgpt(
        "litgpt-tinyllama-qlora",
        "TinyLlama-1.1B",
        "tinyllama-1.1b",
        "QLoRA",
        8,
        16.24,
        folder="tiny-llama",
        targets=ALL_LINEAR_AND_HEAD,
    ),
    _litgpt(
        "litgpt-gemma2-9b-qlora",
        "Gemma-2-9B",
        "gemma-2-9b",
        "QLoRA",
        1,
        20.92,
        folder="gemma2-9b",
        rank=16,
        alpha=16,
        dropout=0.1,
        targets=ALL_LINEAR_AND_HEAD,
    ),
    _litgpt(
        "litgpt-phi3-mini-lora",
        "Phi-3-mini-4k-instruct",
        "phi-4",
        "LoRA",
        4,
        19.75,
        folder="phi-3",
        rank=8,
        alpha=16,
        targets=PHI3_LINEAR_AND_HEAD,
        arch_overrides=PHI3_MINI,
    ),
    _litgpt(
        "litgpt-phi3-mini-qlora",
        "Phi-3-mini-4k-instruct",
        "phi-4",
        "QLoRA",
        4,
        19.13,
        folder="phi-3",
        rank=8,
        alpha=16,
        targets=PHI3_LINEAR_AND_HEAD,
        arch_overrides=PHI3_MINI,
    ),
)


# --- prediction -----------------------------------------------------------------------------------------------


def _base_model(figure: PeerFigure, folder: Path) -> str:
    """The shipped config by name, or a folder holding it with the figure's overrides."""
    if not figure.arch_overrides:
        return figure.arch
    from loratui.memory.arch import bundled_llm_config

    target = folder / figure.id
    target.mkdir(parents=True, exist_ok=True)
    config = {**bundled_llm_config(figure.arch), **figure.arch_overrides}
    (target / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return str(target)


def loratui_config(figure: PeerFigure, base_model: str) -> tuple[Any, list[str]]:
    """(TrainConfig at the figure's settings, the peer's memory options loratui has no key for)."""
    from loratui.config import TrainConfig

    fields = TrainConfig.model_fields
    extra: dict[str, Any] = {}
    lacking = []
    for option in figure.options:
        pairs = [(k, v) for k, v in OPTION_KEYS.get(option, ()) if k in fields]
        if pairs:
            extra[pairs[0][0]] = pairs[0][1]
        elif option in OPTION_KEYS:
            lacking.append(option)
    config = TrainConfig(
        task_type="text-generation",
        model_family="llm",
        base_model=base_model,
        lora_rank=figure.rank,
        lora_alpha=figure.alpha,
        lora_dropout=figure.dropout,
        target_modules=list(figure.targets),
        batch_size=figure.batch,
        gradient_accumulation_steps=1,
        max_seq_len=figure.seq_len,
        gradient_checkpointing=figure.checkpointing,
        mixed_precision="bf16",
        optimizer="adamw",
        load_in_4bit=figure.method == "QLoRA",
        **extra,
    )
    return config, lacking


def _basis(estimate: Any, statistic: str) -> int:
    """The prediction on the peer's statistic: allocated-like statistics leave out context/workspace/fragmentation."""
    extra = ("cuda_context", "workspace", "fragmentation")
    if statistic in ("allocated", "active", "unstated"):
        return int(estimate.total_bytes - sum(estimate.breakdown.get(k, 0) for k in extra))
    return int(estimate.total_bytes)


def _reason(figure: PeerFigure, estimate: Any, lacking: list[str]) -> str:
    parts = {
        k: v for k, v in estimate.breakdown.items() if k not in ("cuda_context", "workspace", "fragmentation")
    }
    biggest = sorted(((v, k) for k, v in parts.items() if k != "weights"), reverse=True)[:2]
    heavy = ", ".join(f"{name} {value / GIB:.1f} GiB" for value, name in biggest)
    text = f"loratui's step is heavier: weights {parts.get('weights', 0) / GIB:.1f} GiB, {heavy}"
    return f"{text}; loratui lacks {', '.join(lacking)}" if lacking else text


def evaluate(figure: PeerFigure, folder: Path) -> dict[str, Any]:
    from loratui.memory.estimate import estimate_peak

    config, lacking = loratui_config(figure, _base_model(figure, folder))
    estimate = estimate_peak(config, device="cuda")
    predicted = _basis(estimate, figure.statistic)
    ratio = predicted / figure.peak_bytes
    within = ratio <= 1 + GOAL
    other = [o for o in figure.options if o not in OPTION_KEYS]
    return {
        "id": figure.id,
        "peer_gib": figure.peak_bytes / GIB,
        "predicted_gib": predicted / GIB,
        "ratio": ratio,
        "within_goal": within,
        "band": estimate.error_band,
        "method": estimate.method,
        "lacking": lacking,
        "not_modelled": other,
        "reason": "" if within else _reason(figure, estimate, lacking),
    }


def run(ids: list[str] | None = None) -> list[dict[str, Any]]:
    figures = [f for f in FIGURES if not ids or f.id in ids]
    unknown = set(ids or []) - {f.id for f in figures}
    if unknown:
        raise SystemExit(f"unknown case(s): {', '.join(sorted(unknown))}")
    with tempfile.TemporaryDirectory() as tmp:
        return [evaluate(f, Path(tmp)) for f in figures]


# --- output ---------------------------------------------------------------------------------------------------


def _settings(figure: PeerFigure) -> str:
    targets = ",".join(t.removesuffix("_proj") for t in figure.targets)
    ckpt = "checkpointing" if figure.checkpointing else "no checkpointing"
    return (
        f"r{figure.rank}/α{figure.alpha}, dropout {figure.dropout:g}, {targets}; batch {figure.batch} x "
        f"seq {figure.seq_len}; {ckpt}; {figure.precision}; {figure.optimizer}; {figure.gpu}"
        + (f"; {', '.join(figure.options)}" if figure.options else "")
    )


def markdown(rows: list[dict[str, Any]]) -> str:
    by_id = {f.id: f for f in FIGURES}
    lines = [
        "| case | peer's settings | peer peak (as published; statistic) | loratui predicted (same basis) | ratio | "
        "goal: step ≤ peer + 5 % |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        figure = by_id[row["id"]]
        verdict = "within" if row["within_goal"] else f"not within: {row['reason']}"
        published = f"{figure.value:g} {figure.unit}"
        if figure.unit != "GiB":
            published += f" = {row['peer_gib']:.2f} GiB"
        if row["not_modelled"]:
            verdict += f" (peer also used {', '.join(row['not_modelled'])}: not modelled)"
        lines.append(
            f"| {figure.peer} {figure.model} {figure.method} | {_settings(figure)} | {published}; "
            f"{figure.statistic} | {row['predicted_gib']:.2f} GiB "
            f"(band ±{row['band']:.0%}) | {row['ratio']:.2f} | {verdict} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", help="comma-separated case ids (default: all)")
    parser.add_argument("--markdown", action="store_true", help="print the docs/benchmarks.md table")
    parser.add_argument("--json", type=Path, help="write the rows and the figures' settings here")
    args = parser.parse_args(argv)
    rows = run(args.cases.split(",") if args.cases else None)
    if args.markdown:
        print(markdown(rows))
    else:
        for row in rows:
            mark = "ok  " if row["within_goal"] else "FAIL"
            print(
                f"{mark} {row['id']:<30} peer {row['peer_gib']:6.2f} GiB  loratui {row['predicted_gib']:6.2f} GiB"
                f"  x{row['ratio']:.2f}  {row['reason']}"
            )
    if args.json:
        figures = {f.id: asdict(f) for f in FIGURES}
        args.json.write_text(json.dumps({"rows": rows, "figures": figures}, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
