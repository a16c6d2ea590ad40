"""The Flux planner against the meter: a reduced Flux transformer's real forward + backward + AdamW steps on
this CPU, predicted from traces at 1-2 blocks extrapolated to the model's depth (the SD path's tolerance)."""

from __future__ import annotations

import json

import pytest
import torch

from loratui.config import TrainConfig
from loratui.memory.estimate import estimate_peak
from loratui.memory.flux import bundled_flux_configs
from loratui.memory.flux_probe import add_flux_lora, build_transformer, flux_loss
from loratui.memory.meter import MemoryMeter
from loratui.memory.regime import Point, Regime
from loratui.memory.tracemode import TraceMode

WORST_LIMIT = 0.10  # tests/test_memory_accuracy.py
SMALL = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 3,
    "num_single_layers": 5,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "joint_attention_dim": 64,
    "pooled_projection_dim": 32,
    "guidance_embeds": True,
    "axes_dims_rope": [4, 6, 6],
}
TEXT_TOKENS = 32


@pytest.fixture(scope="module")
def small_flux(tmp_path_factory):
    """A diffusers-style folder holding only the transformer's and the AE's configs (the planner reads configs
    only; the text encoders are taken as FLUX.1-dev's)."""
    folder = tmp_path_factory.mktemp("flux-small")
    (folder / "transformer").mkdir()
    config = {"_class_name": "FluxTransformer2DModel", **SMALL}
    (folder / "transformer" / "config.json").write_text(json.dumps(config), encoding="utf-8")
    vae = {**bundled_flux_configs("flux1-dev")["vae"], "block_out_channels": [16] * 4, "norm_num_groups": 8}
    (folder / "vae").mkdir()
    (folder / "vae" / "config.json").write_text(json.dumps(vae), encoding="utf-8")
    return folder


def measured_peak(checkpointing: bool, batch: int, resolution: int, rank: int) -> int:
    """Live-tensor peak of two real optimizer steps at the model's full depth."""
    torch.manual_seed(0)
    arch = {"class": "FluxTransformer2DModel", "config": SMALL}
    model = build_transformer(arch, SMALL["num_layers"], SMALL["num_single_layers"], "cpu", torch.float32)
    for param in model.parameters():
        param.data.normal_(0, 0.02)
    add_flux_lora(model, Regime("fp32", checkpointing), rank, torch.float32)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    meter = MemoryMeter()
    meter.register_model(model)
    meter.register_optimizer(optimizer)
    meter.reset_peak()
    point = Point(batch, (resolution // 16) ** 2 + TEXT_TOKENS, rank)
    with meter:
        for _ in range(2):
            loss = flux_loss(model, point, "cpu", TraceMode(None), "fp32")
            loss.backward()
            del loss
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return meter.peak_bytes


@pytest.mark.parametrize(
    ("checkpointing", "batch", "resolution", "rank"),
    [(True, 2, 128, 16), pytest.param(False, 1, 192, 8, marks=pytest.mark.slow)],
)
def test_cpu_prediction_matches_the_meter(small_flux, monkeypatch, checkpointing, batch, resolution, rank):
    monkeypatch.setenv("LORATUI_MEMORY_NO_DISK_CACHE", "1")
    cfg = TrainConfig(
        task_type="image-generation",
        model_family="flux",
        base_model=str(small_flux),
        resolution=resolution,
        batch_size=batch,
        lora_rank=rank,
        gradient_checkpointing=checkpointing,
        mixed_precision="no",
        cache_latents=True,
        cache_text_encoder_outputs=True,
        t5_max_length=TEXT_TOKENS,
    )
    estimate = estimate_peak(cfg, device="cpu")
    assert "this CPU" in estimate.method and "3 double + 5 single" in estimate.method
    # the meter sees the transformer step only (no text encoders or AE are loaded in this check)
    predicted = estimate.total_bytes - estimate.breakdown.get("text_encoders", 0)
    predicted -= estimate.breakdown.get("vae", 0)
    measured = measured_peak(checkpointing, batch, resolution, rank)
    assert abs(predicted / measured - 1) <= WORST_LIMIT, (predicted, measured, estimate.breakdown)
