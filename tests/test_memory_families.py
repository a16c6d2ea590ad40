"""The planner knows today's LLM families from their real config.json (shipped, no weights): each builds on the
meta device at its published size, traces, and a MoE keeps every expert's weights but only top-k activations."""

from __future__ import annotations

import json

import pytest

from loratui.config import TrainConfig
from loratui.memory.arch import ArchSpec, bundled_llm_config, known_llm_names
from loratui.memory.summary import build_summary

#: published parameter counts (model cards / technical reports); Gemma 3: the text model only (the report's
#: embedding + non-embedding parameters, without the 417M vision encoder the checkpoints also hold)
PUBLISHED = {
    "llama-3.2-1b": 1.24e9,
    "llama-3.2-3b": 3.21e9,
    "llama-3.1-8b": 8.03e9,
    "llama-3.1-70b": 70.6e9,
    "qwen2.5-7b": 7.61e9,
    "qwen2.5-14b": 14.7e9,
    "qwen2.5-32b": 32.5e9,
    "qwen3-8b": 8.2e9,
    "qwen3-30b-a3b": 30.5e9,
    "gemma-2-9b": 9.24e9,
    "gemma-3-12b": (1012 + 10759) * 1e6,
    "gemma-3-27b": (1416 + 25600) * 1e6,
    "mistral-7b-v0.3": 7.25e9,
    "mistral-nemo-12b": 12.2e9,
    "phi-4": 14.7e9,
    "llama-2-7b": 6.74e9,
    "llama-2-13b": 13.0e9,
    "tinyllama-1.1b": 1.1e9,
}


def _spec(name: str) -> ArchSpec:
    return ArchSpec("llm", "llm", {"model": bundled_llm_config(name)}, f"bundled:{name}")


def test_every_shipped_config_has_a_published_size() -> None:
    assert sorted(PUBLISHED) == known_llm_names()


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_family_builds_at_its_published_size(name: str) -> None:
    params = build_summary(_spec(name)).components["model"].params
    assert abs(params / PUBLISHED[name] - 1) <= 0.015, f"{name}: {params / 1e9:.3f}B"


def test_fused_projections_are_the_lora_targets_phi4_has() -> None:
    names = {
        layer.name.rsplit(".", 1)[-1] for layer in build_summary(_spec("phi-4")).components["model"].layers
    }
    assert {"qkv_proj", "gate_up_proj", "o_proj", "down_proj"} <= names and "q_proj" not in names


#: one of each kind of layer the tracer meets beyond Llama's (q/k norms, eager attention, sliding windows,
#: fused projections); Qwen2.5 and Mistral build like Llama (bench/published_figures.py traces Mistral too)
@pytest.mark.parametrize("name", ["qwen3-8b", "gemma-2-9b", "gemma-3-12b", "phi-4"])
def test_family_is_planned_from_its_config_folder(tmp_path, monkeypatch, name: str) -> None:
    """A base-model folder with the family's config.json is traced (not the analytic fallback)."""
    from loratui.memory import estimate as estimate_module
    from loratui.memory.estimate import estimate_peak

    monkeypatch.setenv("LORATUI_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "config.json").write_text(json.dumps(bundled_llm_config(name)))
    cfg = TrainConfig(
        task_type="text-generation",
        model_family="llm",
        base_model=str(tmp_path),
        gradient_checkpointing=True,
        max_seq_len=1024,
    )
    estimate_module._PLANNERS.clear()
    estimate = estimate_peak(cfg)
    estimate_module._PLANNERS.clear()
    assert estimate.method.startswith("traced"), estimate.notes
    expected = build_summary(_spec(name)).components["model"].params * 2
    assert estimate.breakdown["weights"] == pytest.approx(expected, rel=0.01)
    assert estimate.breakdown["activations"] + estimate.breakdown["logits_loss"] > 0.1 * 2**30


def test_moe_keeps_all_experts_but_activates_top_k() -> None:
    """Qwen3-30B-A3B: all 128 experts' weights are resident; a decoder layer's activations are those of the
    8 routed experts (close to a dense MLP of 8 x 768), far from a dense MLP of all experts."""
    from loratui.memory.fit import calibrate_llm
    from loratui.memory.regime import Regime

    moe = bundled_llm_config("qwen3-30b-a3b")
    summary = build_summary(_spec("qwen3-30b-a3b")).components["model"]
    experts = 48 * 128 * 3 * 2048 * 768
    assert summary.params > experts > 0.9 * 30e9 * 0.9
    moe_keys = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step")
    dense = {k: v for k, v in moe.items() if k not in moe_keys + ("mlp_only_layers", "norm_topk_prob")}
    dense.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"], intermediate_size=8 * 768)

    def per_layer(config: dict) -> float:
        spec = ArchSpec("llm", "llm", {"model": config}, "test")
        # attention-only LoRA: compares the MLPs' activations, not the experts' own LoRA deltas
        fit = calibrate_llm(
            spec, Regime("amp16", False, False, ("q_proj", "k_proj", "v_proj", "o_proj")), "meta"
        )
        return fit.evaluate(1, 2048, 16, 11)[1] - fit.evaluate(1, 2048, 16, 10)[1]

    routed, top_k_dense = per_layer(moe), per_layer(dense)
    assert top_k_dense <= routed <= 1.6 * top_k_dense


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_config_only_count_agrees_with_the_published_size(name: str) -> None:
    """The closed-form count (preset class, GGUF and analytic sizing) reads MoE experts, tied Gemma embeddings."""
    from loratui.config.base_model import _llm_params

    assert abs(_llm_params(bundled_llm_config(name)) / PUBLISHED[name] - 1) <= 0.015, name
