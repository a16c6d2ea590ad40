"""How a Hugging Face causal LM is laid out in a GGUF file, following llama.cpp's conventions.

- Architecture: `config.model_type` -> GGUF `general.architecture` (Mistral runs as `llama` in llama.cpp).
- Tensor names: the `gguf` package's `TensorNameMap` (`model.layers.3.self_attn.q_proj` -> `blk.3.attn_q`).
- Row order: llama.cpp's `llama` graph applies RoPE to interleaved pairs of each head, Hugging Face's Llama code
  to its two halves, so for `llama` the rows of `q_proj` (per attention head) and `k_proj` (per key/value head)
  are permuted on the way in (`permute_rows`). Qwen2/3, Gemma 2/3 and Phi-3 use the halves layout in llama.cpp
  too (NeoX RoPE) and are written unchanged.
- Gemma 2/3: llama.cpp's RMS norm multiplies by the stored weight; Gemma's code by `1 + weight`: norm weights
  are written plus one.
- The hyper-parameters each architecture reads (`{arch}.block_count`, `{arch}.attention.head_count`, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from loratui.models.llm.adapter_files import ExportError

ARCHITECTURES: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
}
MOE_ARCHITECTURES = {"qwen2moe", "qwen3moe"}
PLUS_ONE_NORMS = {"gemma2", "gemma3"}


class UnsupportedArchitecture(ExportError):
    """A model family the GGUF export does not know."""


def permute_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the rows of a q/k projection (or its LoRA B, or its bias) from Hugging Face's RoPE layout (two
    halves per head) to llama.cpp's `llama` layout (interleaved pairs per head)."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


@dataclass(frozen=True)
class Layout:
    """The GGUF architecture of one model and how its Hugging Face tensors are named and ordered there."""

    arch: str
    model_type: str
    n_layers: int
    n_head: int
    n_head_kv: int
    names: Any  # gguf.TensorNameMap

    @property
    def is_moe(self) -> bool:
        return self.arch in MOE_ARCHITECTURES

    def gguf_name(self, hf_name: str) -> str | None:
        """`model.layers.0.self_attn.q_proj.weight` -> `blk.0.attn_q.weight` (a module name maps without suffix);
        None for a tensor llama.cpp has no place for."""
        return self.names.get_name(hf_name, try_suffixes=(".weight", ".bias"))

    def row_heads(self, hf_name: str) -> int | None:
        """How many heads to permute the rows of `hf_name` over (q/k of `llama`), or None."""
        if self.arch != "llama":
            return None
        module = hf_name.removesuffix(".weight").removesuffix(".bias")
        if module.endswith("self_attn.q_proj"):
            return self.n_head
        if module.endswith("self_attn.k_proj"):
            return self.n_head_kv
        return None

    def weight_for_gguf(self, hf_name: str, array: np.ndarray) -> np.ndarray:
        """A base/merged tensor as llama.cpp expects its values (row order, Gemma's norm offset)."""
        heads = self.row_heads(hf_name)
        if heads:
            array = permute_rows(array, heads)
        if self.arch in PLUS_ONE_NORMS and hf_name.endswith("norm.weight"):
            array = array + 1
        return array


def _get(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def text_config(config: Any) -> Any:
    """The language-model part of a config (multimodal configs keep it in `text_config`)."""
    return getattr(config, "text_config", None) or config


def layout_for(config: Any) -> Layout:
    """The GGUF layout of a transformers config, or `UnsupportedArchitecture` naming what is supported."""
    import gguf

    config = text_config(config)
    model_type = str(getattr(config, "model_type", ""))
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        known = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitecture(
            f"GGUF export does not support model_type {model_type!r} yet (supported: {known}); export a PEFT "
            "adapter (--format peft) or a merged Hugging Face folder (--merge) and convert it with llama.cpp"
        )
    n_layers = int(config.num_hidden_layers)
    n_head = int(config.num_attention_heads)
    n_head_kv = int(_get(config, "num_key_value_heads", default=n_head))
    arch_enum = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == arch)
    return Layout(
        arch, model_type, n_layers, n_head, n_head_kv, gguf.get_tensor_name_map(arch_enum, n_layers)
    )


# --- hyper-parameters ------------------------------------------------------------------------------------


def _rope(config: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(full-attention rope parameters, sliding-window rope parameters or None) in either config style."""
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "full_attention" in params:
        return dict(params["full_attention"] or {}), dict(params.get("sliding_attention") or {}) or None
    params = dict(params or {})
    scaling = getattr(config, "rope_scaling", None)
    if isinstance(scaling, dict):
        params = {**scaling, **params}
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    return params, None


def _head_dim(config: Any) -> int:
    return int(_get(config, "head_dim", default=config.hidden_size // config.num_attention_heads))


def _add_rope_scaling(writer: Any, params: dict[str, Any]) -> None:
    import gguf

    kind = params.get("rope_type") or params.get("type")
    factor = params.get("factor")
    if kind == "linear" and factor:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(factor))
    elif kind == "yarn" and factor:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(factor))
        if params.get("original_max_position_embeddings"):
            writer.add_rope_scaling_orig_ctx_len(int(params["original_max_position_embeddings"]))


def llama3_rope_factors(config: Any, params: dict[str, Any]) -> np.ndarray | None:
    """The `rope_freqs.weight` divisors llama.cpp uses for Llama 3.1+ rope scaling (`rope_type: llama3`)."""
    if params.get("rope_type") != "llama3":
        return None
    base = float(params.get("rope_theta", 10000.0))
    dim = _head_dim(config)
    factor = float(params.get("factor", 8.0))
    low = float(params.get("low_freq_factor", 1.0))
    high = float(params.get("high_freq_factor", 4.0))
    old_ctx = float(params.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    factors = []
    for freq in 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def extra_tensors(layout: Layout, config: Any) -> dict[str, np.ndarray]:
    """Tensors llama.cpp needs that the checkpoint does not hold (rope frequency factors)."""
    config = text_config(config)
    params, _ = _rope(config)
    extra: dict[str, np.ndarray] = {}
    if layout.arch == "llama":
        factors = llama3_rope_factors(config, params)
        if factors is not None:
            extra["rope_freqs.weight"] = factors
    if layout.arch == "phi3" and (params.get("rope_type") or params.get("type")) == "longrope":
        extra["rope_factors_long.weight"] = np.asarray(params["long_factor"], dtype=np.float32)
        extra["rope_factors_short.weight"] = np.asarray(params["short_factor"], dtype=np.float32)
    return extra


def add_hparams(writer: Any, layout: Layout, config: Any) -> None:
    """The `{arch}.*` keys llama.cpp reads for this architecture."""
    config = text_config(config)
    params, swa_params = _rope(config)
    head_dim = _head_dim(config)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(layout.n_layers)
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(layout.n_head)
    writer.add_head_count_kv(layout.n_head_kv)
    writer.add_layer_norm_rms_eps(float(_get(config, "rms_norm_eps", default=1e-6)))
    writer.add_rope_freq_base(float(params.get("rope_theta", 10000.0)))
    writer.add_vocab_size(int(config.vocab_size))
    if head_dim * layout.n_head != config.hidden_size or layout.arch in (
        "qwen3",
        "qwen3moe",
        "gemma2",
        "gemma3",
    ):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if layout.arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    if layout.arch == "phi3":
        rotary = float(_get(config, "partial_rotary_factor", default=1.0))
        writer.add_rope_dimension_count(int(rotary * config.hidden_size) // layout.n_head)
        original = _get(config, "original_max_position_embeddings")
        if original:
            writer.add_rope_scaling_orig_ctx_len(int(original))
        if (params.get("rope_type") or params.get("type")) == "longrope":
            scale = config.max_position_embeddings / (original or config.max_position_embeddings)
            attn = 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(original))
            writer.add_rope_scaling_attn_factors(attn)
    if layout.arch in ("gemma2", "gemma3") and _get(config, "sliding_window"):
        writer.add_sliding_window(int(config.sliding_window))
    if layout.arch == "phi3":  # llama.cpp requires the key; no window = a window as long as the context
        writer.add_sliding_window(int(_get(config, "sliding_window", default=config.max_position_embeddings)))
    if layout.arch == "gemma2":
        writer.add_attn_logit_softcapping(float(_get(config, "attn_logit_softcapping", default=50.0)))
        writer.add_final_logit_softcapping(float(_get(config, "final_logit_softcapping", default=30.0)))
    if layout.arch == "gemma3":
        if _get(config, "final_logit_softcapping"):
            writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
        layer_types = _get(config, "layer_types")
        if layer_types:
            writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
        if swa_params and swa_params.get("rope_theta"):
            writer.add_rope_freq_base_swa(float(swa_params["rope_theta"]))
    if layout.is_moe:
        writer.add_expert_count(int(_get(config, "num_experts", "num_local_experts")))
        writer.add_expert_used_count(int(config.num_experts_per_tok))
        if _get(config, "moe_intermediate_size"):
            writer.add_expert_feed_forward_length(int(config.moe_intermediate_size))
    if layout.arch != "phi3":
        _add_rope_scaling(writer, params)
