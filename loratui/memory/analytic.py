"""Closed-form fallback when an architecture cannot be built from its config (see memory.md formulas)."""

from __future__ import annotations

from typing import Any

from loratui.memory.arch import ArchSpec

GIB = 2**30
#: per-sample activation bytes of the SD families at 512² (16-bit, fused attention), from the shipped tables'
#: order of magnitude; only used when no table or trace is available
SD_ACTIVATIONS_512 = {"sd15": 2.4 * GIB, "sd2": 2.4 * GIB, "sdxl": 3.0 * GIB}
SD_PARAMS = {"sd15": 1.07e9, "sd2": 1.29e9, "sdxl": 3.47e9}


#: optimizer state per byte of fp32 LoRA weights, for the analytic fallback (`estimate.state_elements` is exact):
#: AdamW two moments; 8-bit AdamW two 1-byte moments; Prodigy exp_avg, exp_avg_sq, s and p0 (none for the zero
#: B half); Adafactor and CAME factored vectors (small; CAME adds exp_avg); schedule-free z + exp_avg_sq; Lion one.
STATE_PER_LORA_BYTE = {
    "adamw": 2.0,
    "adamw8bit": 0.5,
    "prodigy": 3.5,
    "adafactor": 0.05,
    "schedulefree_adamw": 2.0,
    "came": 1.1,
    "lion": 1.0,
}


def llm_params(spec: ArchSpec, base_model: str) -> tuple[int, str]:
    """(parameters, where the number comes from) of an LLM whose architecture cannot be built: its GGUF tensor
    table, else its config, else its weight files' headers, else its name ("...-13b"), else 7B."""
    from pathlib import Path

    from loratui.config.base_model import _llm_params, params_from_name, params_from_weight_files

    if spec.source.lower().endswith(".gguf"):
        from loratui.config.gguf_header import read_gguf_header

        try:
            return read_gguf_header(spec.source).params, "counted from its GGUF tensor table"
        except (OSError, ValueError):
            pass
    counted = _llm_params(spec.configs["model"])
    if counted:
        return counted, "counted from its config.json"
    folder = Path(spec.source).parent if spec.source.endswith(".json") else None
    stored = params_from_weight_files(folder) if folder is not None else None
    if stored:
        return stored, "counted from its .safetensors headers"
    named = params_from_name(base_model or "")
    if named:
        return int(named), "taken from its name"
    return 7_000_000_000, "ASSUMED (nothing readable gives the size; the estimate may be far off)"


LLM_BAND = 0.35
VOCAB_PER_CHUNK = (
    4096  # logits per target token in one chunk of the chunked loss (models.llm.loss, no torch here)
)
SD_BAND = 0.40


def llm_layers(spec: ArchSpec) -> tuple[int, str]:
    """(decoder layers, where the number comes from): its config's own key, else its weights' headers, else 32."""
    from pathlib import Path

    from loratui.config.base_model import layers_from_weight_files, llm_dimension

    found = llm_dimension(spec.configs["model"], "layers")
    if found:
        where = (
            "GGUF header block_count" if spec.source.lower().endswith(".gguf") else f"config.json {found[1]}"
        )
        return found[0], where
    folder = Path(spec.source).parent if spec.source.endswith(".json") else None
    stored = layers_from_weight_files(folder) if folder is not None else None
    if stored:
        return stored, ".safetensors headers"
    return 32, "ASSUMED"


def _llm(spec: ArchSpec, cfg: Any, device: str, notes: list[str]) -> tuple[dict[str, int], float]:
    from loratui.config.base_model import llm_dimension
    from loratui.memory.methods import sequences_per_sample

    model = spec.configs["model"]
    params, origin = llm_params(spec, str(cfg.base_model or ""))
    layers, layers_origin = llm_layers(spec)
    size = f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M"
    notes.append(
        f"{size} parameters, {origin}; {layers} layers ({layers_origin}); analytic estimate, error band "
        f"±{LLM_BAND:.0%}"
    )
    hidden = (llm_dimension(model, "hidden") or (4096, ""))[0]
    vocab = (llm_dimension(model, "vocab") or (32000, ""))[0]
    b, s, r = cfg.batch_size * sequences_per_sample(cfg), cfg.max_seq_len, cfg.lora_rank  # DPO/ORPO: pairs
    sixteen = cfg.mixed_precision == "bf16" if device == "cpu" else cfg.mixed_precision != "no"
    width = 2 if sixteen else 4
    # QLoRA: NF4 decoder; embeddings and lm_head in the compute dtype
    weights = int(params * 0.52 + 2 * vocab * hidden * width) if cfg.load_in_4bit else params * width
    lora_width = 2 if getattr(cfg, "lora_dtype", "fp32") == "bf16" else 4
    lora = lora_width * layers * r * 8 * hidden  # q, k, v, o: about r * 2h each
    per_layer = 41 * s * b * hidden * width // 2  # LLaMA-style layer, 16-bit (Korthikanti et al. 2022)
    stored = (2 * s * b * hidden * layers + per_layer) if cfg.gradient_checkpointing else per_layer * layers
    if getattr(cfg, "activation_offload", False) and device == "cuda":
        stored = per_layer  # saved activations wait in host memory; one layer's come back at a time
    special = any(model.get(key) for key in ("final_logit_softcapping", "logit_scale"))
    if getattr(cfg, "chunked_loss", False) and not special:
        logits = 14 * b * s * min(vocab, VOCAB_PER_CHUNK)  # one chunk: 16-bit and fp32 logits, their gradient
    else:
        logits = 12 * b * s * vocab
    return {
        "weights": weights,
        "lora_params": lora,
        "optimizer_state": int(STATE_PER_LORA_BYTE.get(cfg.optimizer, 2.0) * lora),
        "gradients": lora,
        "activations": stored,
        "logits_loss": logits,
    }, LLM_BAND


def _sd(spec: ArchSpec, cfg: Any, device: str) -> tuple[dict[str, int], float]:
    family = spec.family if spec.family in SD_PARAMS else "sd15"
    width = 4 if device == "cpu" or cfg.mixed_precision == "no" else 2
    weights = int(SD_PARAMS[family] * width)
    scale = (cfg.resolution / 512) ** 2 * cfg.batch_size * width / 2
    acts = SD_ACTIVATIONS_512[family] * scale * (0.35 if cfg.gradient_checkpointing else 1.0)
    lora = 4 * 2_000_000 * cfg.lora_rank // 8
    return {
        "weights": weights,
        "lora_params": lora,
        "optimizer_state": int(STATE_PER_LORA_BYTE.get(cfg.optimizer, 2.0) * lora),
        "gradients": lora,
        "activations": int(acts),
    }, SD_BAND


def analytic_estimate(spec: ArchSpec, cfg: Any, device: str, notes: list[str]):
    """An `Estimate` from closed-form rules; error band `LLM_BAND` / `SD_BAND`."""
    from loratui.memory.estimate_types import Estimate, cuda_overheads

    notes = list(notes)
    parts, band = _llm(spec, cfg, device, notes) if spec.kind == "llm" else _sd(spec, cfg, device)
    if device == "cuda":
        static = parts["weights"] + parts["lora_params"] + parts["optimizer_state"]
        parts.update(cuda_overheads(spec.kind, parts["activations"], static))
    method = "analytic formulas (architecture could not be built from its config)"
    return Estimate(sum(parts.values()), parts, method, band, notes, "micro-batch forward/backward", device)
