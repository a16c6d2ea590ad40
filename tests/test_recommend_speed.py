"""`loratui recommend` for 7B/8B configs: the same options and predicted bytes as before, without torch."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
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
#: recorded before the planner was made faster (the candidates were traced on the meta device then); the LLM
#: entries re-pinned when the default step changed (all linear layers, chunked loss, QLoRA in the compute dtype)
PINNED = {
    "llama-2-7b-hf": (
        140364680511,
        [
            (
                {"batch_size": 4, "gradient_checkpointing": True, "gradient_accumulation_steps": 2},
                21986742032,
            ),
            (
                {"batch_size": 2, "gradient_checkpointing": True, "gradient_accumulation_steps": 4},
                19395348425,
            ),
            (
                {"batch_size": 1, "gradient_checkpointing": True, "gradient_accumulation_steps": 8},
                18099651622,
            ),
            ({"gradient_checkpointing": True, "load_in_4bit": True}, 16758582933),
            ({"batch_size": 1, "load_in_4bit": True, "gradient_accumulation_steps": 8}, 22927836892),
        ],
        # re-pinned when the LLM fit became per moment (batch 8 with checkpointing was under-predicted)
        "896686ef28e7b08e",
    ),
    "llama-3.1-8b": (
        50587431015,
        [
            (
                {"batch_size": 4, "gradient_checkpointing": True, "gradient_accumulation_steps": 2},
                22943989270,
            ),
            ({"gradient_checkpointing": True}, 20200046838),
            ({"batch_size": 1, "load_in_4bit": True, "gradient_accumulation_steps": 8}, 23604653230),
            ({"max_seq_len": 1024, "load_in_4bit": True}, 23602242204),
            ({"batch_size": 1, "max_seq_len": 512, "gradient_accumulation_steps": 8}, 21674736792),
        ],
        # re-pinned as above
        "b2ce26e943b81c9a",
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
#: the shipped Llama-2-7B config (a hub id that is not cached here): the same architecture, the same numbers
PINNED["llama-2-7b"] = PINNED["llama-2-7b-hf"]
BUDGET_GIB = {"llama-2-7b-hf": 22, "llama-2-7b": 22, "llama-3.1-8b": 22, "sd15": 7}


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
    if name == "llama-2-7b":
        return {
            "task_type": "text-generation",
            "model_family": "llm",
            "base_model": "meta-llama/Llama-2-7b-hf",
            "lora_rank": 64,
            "batch_size": 8,
            "max_seq_len": 2048,
            "mixed_precision": "bf16",
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


_WHOLE_COMMAND = """
import json, sys, time
started = time.perf_counter()
from loratui.cli.app import app
try:
    app(["recommend", "--config", sys.argv[1], "--vram", "24GB", "--json"], standalone_mode=False)
finally:
    heavy = sorted(m for m in ("torch", "transformers", "diffusers", "peft") if m in sys.modules)
    print(json.dumps({"heavy": heavy, "seconds": time.perf_counter() - started}), file=sys.stderr)
"""


@pytest.mark.parametrize("name", ["llama-2-7b-hf", "llama-3.1-8b"])
def test_recommend_command_for_a_7b_8b_folder_imports_no_torch(
    name: str, tmp_path: Path, subprocess_env
) -> None:
    """The whole `loratui recommend` process for a config-only 7B/8B folder: shipped tables, no model built."""
    import yaml

    values = _values(name, tmp_path)
    config = tmp_path / "x.yaml"
    config.write_text(yaml.safe_dump({**values, "train_data_dir": str(tmp_path)}))
    done = subprocess.run(
        [sys.executable, "-c", _WHOLE_COMMAND, str(config)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stderr.strip().splitlines()[-1])
    assert report["heavy"] == [], report
    payload = json.loads(done.stdout)
    assert payload["current"]["predicted_peak_bytes"] == PINNED[name][0]
    assert report["seconds"] < 10, report  # about 0.3 s here; the bound only catches a model build or a trace


def test_a_built_summary_is_reused_from_disk(
    tiny_llama: Path, tmp_path: Path, cold_planner, monkeypatch
) -> None:
    """An architecture without a shipped table is built on the meta device once; later plans read it from the
    cache (no torch, no transformers)."""
    from loratui.memory import summary as summary_module
    from loratui.memory.estimate import planner_for

    cfg = TrainConfig(task_type="text-generation", model_family="llm", base_model=str(tiny_llama))
    first = planner_for(cfg, "llm")
    assert first.summary is not None and first.spec.source.startswith(str(tiny_llama))
    estimate_module._PLANNERS.clear()

    def refuse(spec):
        raise AssertionError("the summary was built again")

    monkeypatch.setattr(summary_module, "build_summary", refuse)
    again = planner_for(cfg, "llm")
    assert again.summary == first.summary
    assert again.estimate(cfg, "cuda").total_bytes == first.estimate(cfg, "cuda").total_bytes
