"""Per-GPU memory of FSDP training (`fsdp: true`): what each of N processes holds.

    per GPU = (frozen weights + LoRA parameters + optimizer state + gradients) / N
              + two FSDP groups gathered at full size (the one running and the one prefetched)
              + activations of one micro-batch (unchanged: batch_size is per GPU)
              (+ on CUDA: context, workspaces, fragmentation, as with one process)

An FSDP group is one decoder layer, or the input embeddings / the LM head (`loratui.train.process.fsdp`); the
largest one is counted twice. See docs/memory.md.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from loratui.memory.estimate_types import NF4_BYTES, Estimate

#: breakdown parts split over the processes
SHARDED_PARTS = ("weights", "lora_params", "optimizer_state", "gradients", "optimizer_temporaries")
GATHERED_GROUPS = 2  # the group running and the next one, all-gathered ahead of it


def largest_group_bytes(summary: Any, precision: str, layers_fallback: int, weights: int) -> int:
    """Bytes of the largest FSDP group at full size: a decoder layer's weights (16/32-bit, or NF4 for
    QLoRA), or the input embeddings / LM head (vocab x hidden, 16-bit; also under QLoRA, see
    `sharded_qlora_weights`). Without an architecture summary: the weights over the number of layers."""
    if summary is None:
        return -(-int(weights) // max(1, layers_fallback))
    model = summary.components["model"]
    layers = max(1, int(summary.info.get("layers", 1)))
    width = 4 if precision == "fp32" else 2
    linear_width = NF4_BYTES if precision == "qlora" else width
    other_width = 2 if precision == "qlora" else width
    layer = model.quantizable / layers * linear_width
    embeddings = int(summary.info.get("vocab", 0)) * int(summary.info.get("hidden", 0)) * other_width
    return int(max(layer, embeddings))


def sharded_qlora_weights(estimate: Estimate, summary: Any) -> Estimate:
    """QLoRA with FSDP keeps the weights that are not quantised (embeddings, norms, LM head) in bf16, the
    dtype of the 4-bit storage, where one-process QLoRA casts them to fp32 (`loratui.models.llm.lora`)."""
    model = summary.components["model"]
    weights = int(model.quantizable * NF4_BYTES + (model.params - model.quantizable) * 2 + model.buffers * 4)
    breakdown = {**estimate.breakdown, "weights": weights}
    return replace(estimate, total_bytes=sum(breakdown.values()), breakdown=breakdown)


def with_fsdp(estimate: Estimate, processes: int, group_bytes: int) -> Estimate:
    """The per-process estimate of FSDP training over `processes` ranks."""
    n = max(1, int(processes))
    breakdown = {
        key: (-(-int(value) // n) if key in SHARDED_PARTS else int(value))
        for key, value in estimate.breakdown.items()
    }
    breakdown["fsdp_gathered"] = GATHERED_GROUPS * int(group_bytes)
    notes = [
        *estimate.notes,
        f"per GPU, FSDP over {n} process(es): weights, LoRA, gradients and optimizer state / {n}, plus "
        f"{GATHERED_GROUPS} FSDP groups gathered at full size; activations are per GPU (batch_size is per GPU)",
        "host memory: each process reads the base model before sharding it (plan CPU RAM for the loaded "
        "weights of every process on a machine)",
    ]
    if estimate.device == "cuda":
        notes.append("NCCL's own communication buffers are not included (not measured here)")
    return replace(estimate, total_bytes=sum(breakdown.values()), breakdown=breakdown, notes=notes)
