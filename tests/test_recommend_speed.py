"""`loratui recommend` for 7B/8B configs: the same options and predicted bytes as before, without torch."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from loratui.config import ResolvedConfig, TrainConfig
from loratui.memory import estimate as estimate_module
from loratui.memory.recommend import explore, rank_options
from loratui.memory.tables import clear_memory_cache

GIB = 2**30

#: Llama-2-7b-hf's config.json as published (no attention_bias / mlp_bias keys)
LLAMA2_7B_HF = {
    "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 4096,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "pad_token_id": 0,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.31.0.dev0",
    "use_cache": True,
    "vocab_size": 32000,
}
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 128256,
}

#: (config, usable GiB) -> (current peak, top five options with their predicted peaks, digest of every candidate);
#: recorded before the planner was made faster (the candidates were traced on the meta device then)
PINNED = {
    "llama-2-7b-hf": (
        117227601065,
        [
            (
                {"batch_size": 4, "gradient_checkpointing": True, "gradient_accumulation_steps": 2},
                21249238505,
            ),
            (
                {"batch_size": 2, "gradient_checkpointing": True, "gradient_accumulation_steps": 4},
                18254580467,
            ),
            (
                {"batch_size": 1, "gradient_checkpointing": True, "gradient_accumulation_steps": 8},
                16757251448,
            ),
            ({"gradient_checkpointing": True, "load_in_4bit": True}, 22881634611),
            (
                {"batch_size": 1, "lora_rank": 32, "load_in_4bit": True, "gradient_accumulation_steps": 8},
                23497466986,
            ),
        ],
        "07a1373ab9daa4ed",
    ),
    "llama-3.1-8b": (
        48799862136,
        [
            (
                {"batch_size": 1, "gradient_checkpointing": True, "gradient_accumulation_steps": 8},
                21084650282,
            ),
            ({"gradient_checkpointing": True, "load_in_4bit": True}, 19312873916),
            ({"gradient_checkpointing": True, "max_seq_len": 1024}, 21081124620),
            (
                {
                    "batch_size": 1,
                    "max_seq_len": 1024,
                    "load_in_4bit": True,
                    "gradient_accumulation_steps": 8,
                },
                21006464514,
            ),
            (
                {
                    "batch_size": 4,
                    "gradient_checkpointing": True,
                    "max_seq_len": 512,
                    "gradient_accumulation_steps": 2,
                },
                21077279198,
            ),
        ],
        "63cdf20c22ca99b7",
    ),
    "sd15": (
        8167186610,
        [
            (
                {
                    "batch_size": 2,
                    "cache_latents": True,
                    "cache_text_encoder_outputs": True,
                    "gradient_accumulation_steps": 4,
                },
                5173077956,
            ),
            ({"batch_size": 2, "cache_latents": True, "gradient_accumulation_steps": 4}, 5421660125),
            (
                {
                    "batch_size": 8,
                    "gradient_checkpointing": True,
                    "cache_latents": True,
                    "cache_text_encoder_outputs": True,
                    "gradient_accumulation_steps": 1,
                },
                4974611015,
            ),
            (
                {
                    "batch_size": 8,
                    "gradient_checkpointing": True,
                    "cache_latents": True,
                    "gradient_accumulation_steps": 1,
                },
                5223193185,
            ),
            (
                {"gradient_checkpointing": True, "cache_latents": True, "cache_text_encoder_outputs": True},
                3792525742,
            ),
        ],
        "b7b1326c53f3e963",
    ),
}
BUDGET_GIB = {"llama-2-7b-hf": 22, "llama-3.1-8b": 22, "sd15": 7}


def _values(name: str, root: Path) -> dict:
    if name == "sd15":
        return {
            "task_type": "image-generation",
            "model_family": "sd15",
            "base_model": "runwayml/stable-diffusion-v1-5",
            "resolution": 512,
            "lora_rank": 32,
            "batch_size": 4,
            "gradient_accumulation_steps": 2,
            "mixed_precision": "fp16",
        }
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(LLAMA2_7B_HF if name == "llama-2-7b-hf" else LLAMA31_8B))
    values = {
        "task_type": "text-generation",
        "model_family": "llm",
        "base_model": str(folder),
        "max_seq_len": 2048,
        "mixed_precision": "bf16",
    }
    if name == "llama-2-7b-hf":
        return {**values, "lora_rank": 64, "batch_size": 8}
    return {**values, "lora_rank": 16, "batch_size": 2, "gradient_accumulation_steps": 4}


@pytest.fixture
def cold_planner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """No fit or summary cached in memory or on disk."""
    monkeypatch.setenv("LORATUI_CACHE_DIR", str(tmp_path / "cache"))
    clear_memory_cache()
    estimate_module._PLANNERS.clear()
    yield
    clear_memory_cache()
    estimate_module._PLANNERS.clear()


@pytest.mark.parametrize("name", list(PINNED))
def test_recommendations_are_pinned(name: str, tmp_path: Path, cold_planner) -> None:
    values = _values(name, tmp_path)
    cfg = TrainConfig(**values)
    resolved = ResolvedConfig(cfg, {k: "config x.yaml" for k in values}, cfg.model_family)
    options, _ = explore(resolved, BUDGET_GIB[name] * GIB)
    current, top, digest = PINNED[name]
    assert next(o for o in options if not o.changes).estimate.total_bytes == current
    ranked = rank_options(options, 5)
    assert [(o.changes, o.estimate.total_bytes) for o in ranked] == top
    every = sorted([json.dumps(o.changes, sort_keys=True), o.estimate.total_bytes] for o in options)
    assert hashlib.sha256(json.dumps(every).encode()).hexdigest()[:16] == digest
