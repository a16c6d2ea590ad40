"""The LoRA dtype and the device's autocast rules as part of the LLM regime: traced, keyed and metered."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loratui.config import TrainConfig
from loratui.memory.regime import Regime
from loratui.memory.tables import clear_memory_cache
from loratui.memory.tracemode import TraceMode


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORATUI_CACHE_DIR", str(tmp_path / "cache"))
    clear_memory_cache()


def _config(base: Path, **values) -> TrainConfig:
    settings = {
        "task_type": "text-generation",
        "model_family": "llm",
        "base_model": str(base),
        "train_data_dir": str(base),
        "max_seq_len": 128,
        "batch_size": 2,
        "gradient_checkpointing": True,
        "mixed_precision": "bf16",
        **values,
    }
    return TrainConfig(**settings)


def test_the_regime_key_carries_the_lora_dtype_and_the_autocast_rules() -> None:
    plain = Regime("amp16", True, False, ("all-linear",), chunked_loss=True)
    assert plain.key() == "amp16|ckpt=1|drop=0|t=all-linear|loss=chunked"  # shipped fp32-LoRA keys unchanged
    keys = {
        plain.key(),
        Regime("amp16", True, False, ("all-linear",), chunked_loss=True, lora_dtype="bf16").key(),
        Regime("amp16", True, False, ("all-linear",), chunked_loss=True, autocast="cpu").key(),
    }
    assert len(keys) == 3


def test_regime_for_takes_the_lora_dtype_and_the_cpu_rules_for_a_cpu_step(tiny_llama: Path) -> None:
    from loratui.memory.estimate import regime_for

    cfg = _config(tiny_llama, lora_dtype="bf16")
    on_gpu, _ = regime_for(cfg, "cuda", "llm")
    on_cpu, notes = regime_for(cfg, "cpu", "llm")
    assert (on_gpu.lora_dtype, on_gpu.autocast) == ("bf16", "cuda")
    assert (on_cpu.lora_dtype, on_cpu.autocast) == ("bf16", "cpu")
    assert not any("CUDA's autocast" in n for n in notes)
    fp32_cpu, _ = regime_for(_config(tiny_llama, mixed_precision="no"), "cpu", "llm")
    assert fp32_cpu.autocast == "cuda"  # no autocast: the same fits as anywhere


OPS = {
    "linear": lambda x, w: torch.nn.functional.linear(x, w),
    "matmul": lambda x, w: x @ w,
    "rms-norm pieces": lambda x, w: x.pow(2).mean(-1, keepdim=True) * torch.rsqrt(x.abs() + 1),
    "softmax": lambda x, w: torch.softmax(x, -1),
    "log_softmax": lambda x, w: torch.log_softmax(x, -1),
    "layer_norm": lambda x, w: torch.nn.functional.layer_norm(x, (x.shape[-1],)),
    "exp": lambda x, w: torch.exp(x),
    "sum": lambda x, w: torch.sum(x, -1),
    "cross_entropy": lambda x, w: torch.nn.functional.cross_entropy(x, torch.zeros(4, dtype=torch.long)),
    "mse_loss": lambda x, w: torch.nn.functional.mse_loss(x, torch.zeros_like(x)),
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_the_cpu_rules_give_the_dtypes_of_the_cpu_autocast(name: str) -> None:
    op = OPS[name]
    for dtype in (torch.float32, torch.bfloat16):
        x, w = torch.randn(4, 8, dtype=dtype), torch.randn(8, 8, dtype=dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = op(x, w).dtype
        with TraceMode(torch.bfloat16, fused_attention=False, rules="cpu"):
            got = op(x, w).dtype
        assert got == expected, (name, dtype)


def test_the_planner_changes_with_the_lora_dtype_from_the_shipped_table(
    tmp_path: Path, fresh_cache: None
) -> None:
    """Llama-3.1-8B (shipped table, bf16-LoRA regimes included), batch 2 x 2,048, checkpointing, on a GPU: the
    step itself (not only the LoRA weights, gradients and AdamW state) holds less with the LoRA in bf16."""
    import json

    from loratui.memory.arch import bundled_llm_config
    from loratui.memory.estimate import estimate_peak

    folder = tmp_path / "llama-3.1-8b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(bundled_llm_config("llama-3.1-8b")), encoding="utf-8")
    settings = {"max_seq_len": 2048, "lora_rank": 8, "target_modules": None}
    fp32 = estimate_peak(_config(folder, **settings), device="cuda")
    bf16 = estimate_peak(_config(folder, lora_dtype="bf16", **settings), device="cuda")
    assert "shipped table" in bf16.method
    assert bf16.breakdown["lora_params"] * 2 == fp32.breakdown["lora_params"]
    step = [
        e.breakdown["activations"] + e.breakdown["logits_loss"] + e.breakdown["gradients"]
        for e in (fp32, bf16)
    ]
    assert step[1] < 0.95 * step[0]


@pytest.fixture(scope="module")
def mid_llama(tiny_llama: Path, tiny_models_dir: Path) -> Path:
    """A Llama layout whose decoder activations, not its logits, make most of the step (hidden 256, 4 layers)."""
    from loratui.train.memory_check.realstep import build_mid_llama

    return build_mid_llama(tiny_llama, tiny_models_dir / "mid-llama")


def test_the_bf16_lora_trace_matches_the_metered_trainer_step_on_the_cpu(
    mid_llama: Path, fresh_cache: None
) -> None:
    """bf16 autocast on the CPU, checkpointing, chunked loss, LoRA weights in bf16: the trainer's real step under
    the CPU meter vs `estimate_peak(device="cpu")`, which traces the LoRA in bf16 with the CPU's autocast rules."""
    from loratui.memory.estimate import estimate_peak
    from loratui.train.memory_check.realstep import llm_real_step, measure_real_peak

    half = _config(mid_llama, max_seq_len=256, lora_dtype="bf16")
    metered = measure_real_peak(llm_real_step(half), steps=1).peak_bytes
    predicted = estimate_peak(half, device="cpu")
    assert abs(predicted.total_bytes / metered - 1) <= 0.05, (predicted.total_bytes, metered)
