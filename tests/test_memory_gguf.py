"""A GGUF base is planned at its own size, read from the file's header (no tensor data is read)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from loratui.config import TrainConfig
from loratui.config.base_model import inspect_base_model
from loratui.memory import estimate as estimate_module
from loratui.memory.estimate import estimate_peak, planner_for

gguf = pytest.importorskip("gguf")


def _qwen25_32b_header(path: Path, arch: str = "qwen2") -> Path:
    """Qwen2.5-32B's metadata as llama.cpp writes it, with no tensors (the planner reads only the header)."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(64)
    writer.add_embedding_length(5120)
    writer.add_feed_forward_length(27648)
    writer.add_head_count(40)
    writer.add_head_count_kv(8)
    writer.add_context_length(32768)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(152064)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _config(base: Path) -> TrainConfig:
    return TrainConfig(task_type="text-generation", model_family="llm", base_model=str(base), lora_rank=8)


@pytest.fixture(autouse=True)
def _fresh_planners(tmp_path, monkeypatch):
    monkeypatch.setenv("LORATUI_CACHE_DIR", str(tmp_path / "cache"))
    estimate_module._PLANNERS.clear()
    yield
    estimate_module._PLANNERS.clear()


def test_a_32b_gguf_is_planned_as_32b(tmp_path) -> None:
    path = _qwen25_32b_header(tmp_path / "Qwen2.5-32B-Instruct-Q4_K_M.gguf")
    planner = planner_for(_config(path))
    assert planner.summary is not None  # built from the header's architecture, not the analytic fallback
    assert planner.params == pytest.approx(32.76e9, rel=0.01)
    assert any("GGUF header" in note and "64 layers" in note for note in planner.notes)
    estimate = estimate_peak(_config(path), device="cuda")
    assert estimate.breakdown["weights"] == pytest.approx(2 * 32.76e9, rel=0.01)
    assert inspect_base_model(str(path)).preset_family == "llm-32b"


def test_a_tiny_gguf_is_planned_at_its_tensor_count(tmp_path, tiny_llama: Path) -> None:
    """The real file layout (tokenizer arrays, tensor table): the planner's parameters equal the tensors'."""
    from llm_helpers import write_tiny_gguf
    from safetensors import safe_open

    path = write_tiny_gguf(tiny_llama, tmp_path / "tiny-f32.gguf")
    stored = 0
    with safe_open(str(tiny_llama / "model.safetensors"), "pt") as handle:
        for key in handle.keys():  # noqa: SIM118
            stored += math.prod(handle.get_slice(key).get_shape())
    info = inspect_base_model(str(path))
    assert info.kind == "gguf" and info.params == stored
    planner = planner_for(_config(path))
    assert planner.params == stored
    assert any("stored as F32 100%" in note for note in planner.notes)  # the tensors' storage types


def test_a_gguf_family_the_tracer_cannot_build_is_analytic_at_its_size(tmp_path) -> None:
    """An architecture transformers does not load from GGUF: sized from the tensor table, said to be analytic."""
    import numpy as np

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "bloom")
    writer.add_block_count(3)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    for layer in range(3):
        writer.add_tensor(f"blk.{layer}.attn_qkv.weight", np.zeros((192, 64), dtype=np.float32))
    writer.add_tensor("token_embd.weight", np.zeros((1000, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    estimate = estimate_peak(_config(path), device="cpu")
    assert estimate.method.startswith("analytic") and estimate.error_band == 0.35
    params = 3 * 192 * 64 + 1000 * 64
    assert any("counted from its GGUF tensor table; 3 layers (GGUF header" in n for n in estimate.notes)
    assert estimate.breakdown["weights"] == 4 * params


def test_a_broken_gguf_header_falls_back_with_a_note(tmp_path) -> None:
    path = tmp_path / "broken-7b.gguf"
    path.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + b"\xff" * 8)
    info = inspect_base_model(str(path))
    assert info.kind == "gguf" and any("unreadable GGUF header" in n for n in info.notes)
    planner = planner_for(_config(path))
    assert any("assuming the llama-2-7b architecture" in n for n in planner.notes)


def test_a_moe_gguf_keeps_its_experts(tmp_path) -> None:
    """Qwen3-30B-A3B's llama.cpp metadata (qwen3moe): 128 experts, 8 routed; planned at 30.5B parameters."""
    path = tmp_path / "Qwen3-30B-A3B-Q4_K_M.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen3moe")
    writer.add_block_count(48)
    writer.add_embedding_length(2048)
    writer.add_feed_forward_length(6144)
    writer.add_expert_feed_forward_length(768)
    writer.add_expert_count(128)
    writer.add_expert_used_count(8)
    writer.add_head_count(32)
    writer.add_head_count_kv(4)
    writer.add_key_length(128)
    writer.add_value_length(128)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(151936)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    planner = planner_for(_config(path))
    assert planner.summary is not None
    assert planner.params == pytest.approx(30.53e9, rel=0.01)
    assert inspect_base_model(str(path)).preset_family == "llm-32b"
