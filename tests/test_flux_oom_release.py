"""Block swap on a simulated card: the meter sees swapped blocks come and go, and a failed step gives back
every byte it took (the OOM recovery's release check)."""

from __future__ import annotations

import gc
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from loratui.memory.meter import MemoryMeter
from loratui.models.flux.block_swap import _frozen_tensors
from loratui.models.flux.loading import load_flux
from loratui.train.flux.oom import flux_meter_modules, flux_release, resident_parts
from loratui.train.flux.setup import FluxModels, place_transformer
from tests.flux_helpers import add_lora, fixed_inputs

CACHED = SimpleNamespace(latents=SimpleNamespace(cache_enabled=True))  # the AE is not on the card


def _models(folder: Path, blocks_to_swap: int) -> tuple[FluxModels, list[torch.nn.Parameter]]:
    parts = load_flux(folder)
    params = add_lora(parts)
    parts.transformer.enable_gradient_checkpointing()
    parts.transformer.train()
    models = FluxModels(
        parts,
        "flux",
        torch.device("cpu"),
        torch.float32,
        guidance_scale=1.0,
        t5_max_length=32,
        blocks_to_swap=blocks_to_swap,
        simulated_card=True,
    )
    models.text_on_device = False
    place_transformer(models)
    return models, params


def _meter(models: FluxModels, optimizer: torch.optim.Optimizer, budget: int | None = None) -> MemoryMeter:
    meter = MemoryMeter(budget_bytes=budget)
    for module in flux_meter_modules(models, CACHED)():
        meter.register_model(module)
    meter.register_optimizer(optimizer)
    return meter


def _step(models: FluxModels) -> None:
    """A training step's forward and backward; its inputs are made on the card, as the trainer's batches are."""
    out = models.transformer(**fixed_inputs(models.parts))[0]
    (out.float() ** 2).mean().backward()


def _fails(meter: MemoryMeter, models: FluxModels) -> bool:
    """Run a step on the meter's card; True when it ran out of memory (the traceback is gone on return)."""
    try:
        with meter:
            _step(models)
    except torch.OutOfMemoryError:
        return True
    return False


def _block_bytes(block: torch.nn.Module) -> int:
    return sum(t.untyped_storage().nbytes() for t in _frozen_tensors(block))


def test_swapped_blocks_count_only_while_they_are_on_the_card(tiny_flux_dev: Path) -> None:
    peaks, registered = {}, {}
    for count in (0, 2):
        models, params = _models(tiny_flux_dev, count)
        optimizer = torch.optim.AdamW(params)
        meter = _meter(models, optimizer)
        registered[count] = meter.live_bytes
        with meter:
            _step(models)
        peaks[count] = meter.peak_bytes
        meter.close()
    swapped = models.swapper.swapped
    assert [entry.on_device for entry in swapped] == [False, False]
    moved = sum(_block_bytes(entry.block) for entry in swapped)
    # the card holds everything but the swapped blocks' frozen weights; their LoRA layers stay on it
    assert registered[0] - registered[2] == moved
    lora = [m for entry in swapped for m in resident_parts(models) if m in set(entry.block.modules())]
    assert lora and all(p.requires_grad for m in lora for p in m.parameters())
    # at the step's peak only one swapped block is on the card (the next one is prefetched only when it is
    # the next to run): the peak is lower by at least the smaller swapped block
    assert peaks[0] - peaks[2] >= min(_block_bytes(entry.block) for entry in swapped)


@pytest.mark.parametrize("spare", [1, 200_000])
def test_a_failed_swapped_step_gives_back_everything_it_took(tiny_flux_dev: Path, spare: int) -> None:
    models, params = _models(tiny_flux_dev, 2)
    optimizer = torch.optim.AdamW(params)
    meter = _meter(models, optimizer)
    with meter:
        _step(models)
    peak = meter.peak_bytes
    meter.close()
    optimizer.zero_grad(set_to_none=True)

    meter = _meter(models, optimizer, budget=peak - spare)  # fails at or before the peak
    baseline = meter.live_bytes
    assert _fails(meter, models)
    assert any(entry.on_device for entry in models.swapper.swapped)  # the failure left a block on the card
    optimizer.zero_grad(set_to_none=True)
    flux_release(models)()
    gc.collect()
    assert meter.live_bytes == baseline
    assert not any(entry.on_device for entry in models.swapper.swapped)
    meter.close()
