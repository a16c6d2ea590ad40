"""The Flux trainer's OOM hooks: storing the base smaller and swapping more blocks in the running process."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from loratui.models.flux.fp8 import Fp8Linear
from loratui.models.flux.loading import load_flux
from loratui.train.flux.oom import (
    apply_base_weights_dtype,
    apply_blocks_to_swap,
    flux_rung_applier,
    resident_parts,
)
from loratui.train.flux.setup import FluxModels, place_transformer
from tests.flux_helpers import add_lora, fixed_inputs, loss_and_grads


def _models(folder: Path) -> tuple[FluxModels, list[torch.nn.Parameter]]:
    parts = load_flux(folder)
    params = add_lora(parts)
    models = FluxModels(
        parts, "flux", torch.device("cpu"), torch.float32, guidance_scale=1.0, t5_max_length=32
    )
    place_transformer(models)
    parts.transformer.train()
    return models, params


def test_rungs_apply_to_the_live_transformer(tiny_flux_dev: Path) -> None:
    models, params = _models(tiny_flux_dev)
    inputs = fixed_inputs(models.parts)
    loss, _ = loss_and_grads(models.parts, params, inputs)

    assert resident_parts(models) == [models.transformer]
    assert apply_blocks_to_swap(models, 1)
    assert models.swapper is not None and models.blocks_to_swap == 1
    resident = resident_parts(models)
    assert models.transformer.transformer_blocks[1] in resident
    assert not any(entry.block in resident for entry in models.swapper.swapped)
    assert loss_and_grads(models.parts, params, inputs)[0] == pytest.approx(loss, abs=1e-5)

    assert apply_base_weights_dtype(models, "fp8")
    assert models.base_weights_dtype == "fp8" and models.swapper is not None and models.swapper.count == 1
    assert sum(isinstance(m, Fp8Linear) for m in models.transformer.modules()) == 40
    fp8_loss, grads = loss_and_grads(models.parts, params, inputs)
    assert math.isfinite(fp8_loss) and fp8_loss == pytest.approx(loss, rel=0.05)
    assert all(torch.isfinite(g).all() for g in grads)
    assert not apply_base_weights_dtype(models, "bf16")  # never widened in place
    assert not apply_base_weights_dtype(models, "fp8")

    # the trainer's callback: several settings of one rung at once, the LoRA parameters untouched
    before = [p.detach().clone() for p in params]
    context = SimpleNamespace(dataset=None, latents=SimpleNamespace(cache_enabled=True), text=None)
    job = SimpleNamespace(resolved=SimpleNamespace(config=SimpleNamespace(train_text_encoder=False)))
    apply = flux_rung_applier(job, models, context, reporter=None)
    assert apply({"blocks_to_swap": 2, "gradient_checkpointing": True})
    assert models.swapper.count == 2 and models.transformer.gradient_checkpointing
    assert loss_and_grads(models.parts, params, inputs)[0] == pytest.approx(fp8_loss, abs=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))
