"""The Flux planner against the meter on this CPU (the SD path's tolerance): the Flux trainer's own step on the
tiny FLUX.1-dev model (default suite: checkpointing, bf16 base; fp8 and no checkpointing are `slow`), and a
deeper reduced transformer (3 double + 5 single blocks) predicted from traces at 1-2 blocks (`slow`)."""

from __future__ import annotations

import json

import pytest
import torch

from loratui.config import TrainConfig
from loratui.memory.estimate import estimate_peak
from loratui.memory.fit import _single_thread
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
    with _single_thread(), meter:  # small CPU kernels run fastest on one thread
        for _ in range(2):
            loss = flux_loss(model, point, "cpu", TraceMode(None), "fp32")
            loss.backward()
            del loss
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return meter.peak_bytes


@pytest.mark.parametrize(
    ("checkpointing", "batch", "resolution", "rank"),
    [
        pytest.param(True, 2, 128, 16, marks=pytest.mark.slow),
        pytest.param(False, 1, 192, 8, marks=pytest.mark.slow),
    ],
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


def flux_trainer_peak(cfg: TrainConfig) -> int:
    """Live-tensor peak of two optimizer steps of the Flux trainer's own setup and loss (no run directory)."""
    from types import SimpleNamespace

    from loratui.config import ResolvedConfig
    from loratui.train.flux import setup
    from loratui.train.flux.trainer import FluxLossContext
    from loratui.train.loop.plan import StepPlan, split_micro_batches
    from loratui.train.loop.stepping import optimizer_step
    from loratui.train.memory_check.realstep import _fresh_accelerate, _QuietReporter
    from loratui.train.sd.setup import setup_accelerator, setup_dataset

    _fresh_accelerate()
    reporter = _QuietReporter()
    job = SimpleNamespace(
        resolved=ResolvedConfig(cfg, {}, "flux"),
        run=None,
        resume_from=None,
        overwrite=True,
        skip_checks=False,
    )
    accelerator, precision = setup_accelerator(cfg)
    dataset = setup_dataset(cfg, reporter)
    models = setup.setup_models(job, precision, accelerator.device)
    latents = setup.setup_latents(cfg, models, dataset, reporter)
    lora, params = setup.setup_lora(cfg, models)
    text = setup.setup_text(cfg, models, dataset, reporter, cfg.sample_prompts)
    setup.setup_base_storage(models)
    setup.place_transformer(models)
    plan = StepPlan(len(dataset), cfg.effective_batch, cfg.epochs, cfg.max_steps, cfg.seed)
    optimizer, scheduler = setup.setup_optimizer(cfg, models, lora, plan.total_steps)
    optimizer = setup.setup_wrappers(cfg, accelerator, models, text, optimizer)
    context = FluxLossContext(cfg, models, dataset, latents, text)
    indices = list(range(min(cfg.effective_batch, len(dataset))))
    meter = MemoryMeter()
    meter.register_model(models.transformer)
    meter.register_optimizer(optimizer)
    meter.reset_peak()
    with _single_thread(), meter:
        for _ in range(2):
            optimizer_step(
                split_micro_batches(indices, cfg.batch_size),
                lambda batch: context.micro_loss(batch, 0, len(indices)),
                accelerator=accelerator,
                optimizer=optimizer,
                scheduler=scheduler,
                params=params,
                max_grad_norm=cfg.max_grad_norm,
                model=models.forward_transformer,
            )
    return meter.peak_bytes


@pytest.mark.parametrize(
    ("checkpointing", "base"),
    [
        (True, "bf16"),
        pytest.param(False, "bf16", marks=pytest.mark.slow),
        pytest.param(True, "fp8", marks=pytest.mark.slow),
    ],
)
def test_cpu_prediction_matches_the_flux_trainer(tiny_flux_dev, tmp_path, monkeypatch, checkpointing, base):
    """The Flux trainer's real step (tiny FLUX.1-dev folder, cached latents and T5 outputs, 64 T5 tokens from
    its tokenizer) against the planner's CPU prediction for the same config."""
    from loratui.config import ResolvedConfig
    from loratui.train.memory_check.realstep import write_image_dataset

    monkeypatch.setenv("LORATUI_MEMORY_NO_DISK_CACHE", "1")
    data = write_image_dataset(tmp_path / "data", 4, 128)
    cfg = TrainConfig(
        task_type="image-generation",
        model_family="flux",
        base_model=str(tiny_flux_dev),
        train_data_dir=str(data),
        resolution=128,
        batch_size=2,
        lora_rank=8,
        gradient_checkpointing=checkpointing,
        mixed_precision="no",
        cache_latents=True,
        cache_text_encoder_outputs=True,
        base_weights_dtype=base,
        max_steps=4,
    )
    estimate = estimate_peak(ResolvedConfig(cfg, {}, "flux"), device="cpu")
    assert any("128 tokens" in note and "64 T5 tokens" in note for note in estimate.notes)
    predicted = (
        estimate.total_bytes - estimate.breakdown.get("text_encoders", 0) - estimate.breakdown.get("vae", 0)
    )
    measured = flux_trainer_peak(cfg)
    assert abs(predicted / measured - 1) <= WORST_LIMIT, (predicted, measured, estimate.breakdown)
