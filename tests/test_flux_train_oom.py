"""The Flux trainer's OOM hooks: storing the base smaller and swapping more blocks in the running process."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from loratui.models.flux.block_swap import _frozen_tensors
from loratui.models.flux.fp8 import Fp8Linear
from loratui.models.flux.loading import load_flux
from loratui.train.flux.oom import (
    apply_base_weights_dtype,
    apply_blocks_to_swap,
    flux_rung_applier,
    resident_parts,
)
from loratui.train.flux.setup import FluxModels, place_transformer
from loratui.train.flux.trainer import train
from tests.flux_helpers import add_lora, fixed_inputs, loss_and_grads
from tests.sd_helpers import events_of, make_image_dataset, make_job, seed_like_config


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


#: The OOM runs' settings: two micro-batches of one per step, caches on, the earlier rungs with nothing left.
OOM_RUN = {
    "model_family": "flux",
    "lora_rank": 4,
    "alpha": 4,
    "save_steps": None,
    "max_steps": 2,
    "batch_size": 1,
    "gradient_accumulation_steps": 2,
    "gradient_checkpointing": True,
    "cache_latents": True,
    "cache_text_encoder_outputs": True,
    "optimizer": "adamw8bit",  # the earlier rungs have nothing left to lower
}


def _metered_peak(folder: Path, model: Path, data: Path, **settings) -> int:
    """The simulated card's peak over a finished run's steps (on a card too large to run out)."""
    job = make_job(seed_like_config(folder, model, data, simulate_vram="1TiB", **OOM_RUN, **settings))
    assert train(job) == "finished"
    return max(e["meter_peak"] for e in events_of(job.run, "step"))


@pytest.mark.slow
def test_a_flux_run_recovers_from_an_oom_by_swapping_blocks_and_quantising_the_base(
    tiny_flux_dev: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORATUI_CACHE_DIR", str(tmp_path / "cache"))
    data = make_image_dataset(tmp_path / "data", 4, sizes=[(72, 64)])

    plain = _metered_peak(tmp_path / "plain", tiny_flux_dev, data)
    fp8 = _metered_peak(tmp_path / "fp8", tiny_flux_dev, data, base_weights_dtype="fp8")
    budget = (plain + fp8) // 2  # the model loads; its step needs a smaller base

    job = make_job(
        seed_like_config(tmp_path / "oom", tiny_flux_dev, data, simulate_vram=str(budget), **OOM_RUN)
    )
    assert train(job) == "finished"
    rungs = "+".join(e["rung"] for e in events_of(job.run, "oom")).split("+")
    assert "block_swap" in rungs and rungs[-1] == "quantise_base"  # the planner may take both at once
    recovered = events_of(job.run, "oom_recovered")[-1]["new"]
    assert recovered["base_weights_dtype"] in ("fp8", "nf4") and recovered["blocks_to_swap"] > 0
    steps = events_of(job.run, "step")
    assert [e["step"] for e in steps] == [1, 2] and all(math.isfinite(e["loss"]) for e in steps)
    assert (recovered["batch_size"], recovered["gradient_accumulation_steps"]) == (
        1,
        2,
    )  # same effective batch
    assert max(e["meter_peak"] for e in steps) <= budget
    finished = events_of(job.run, "run_finished")[0]
    assert "quantise_base" in [r["rung"] for r in finished["oom_recoveries"]][-1]


def test_a_flux_run_recovers_from_an_oom_by_swapping_blocks_alone(
    tiny_flux_dev: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORATUI_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LORATUI_OOM_PLANNER", "0")  # one rung at a time: block_swap before quantise_base
    data = make_image_dataset(tmp_path / "data", 4, sizes=[(72, 64)])
    peak = _metered_peak(tmp_path / "plain", tiny_flux_dev, data)
    # block swap takes the last block of each kind off the card; one swapped block is on it at the peak
    transformer = load_flux(tiny_flux_dev).transformer
    last = (transformer.transformer_blocks[-1], transformer.single_transformer_blocks[-1])
    smaller = min(sum(t.untyped_storage().nbytes() for t in _frozen_tensors(block)) for block in last)
    budget = peak - smaller // 2

    job = make_job(
        seed_like_config(tmp_path / "oom", tiny_flux_dev, data, simulate_vram=str(budget), **OOM_RUN)
    )
    assert train(job) == "finished"
    assert [e["rung"] for e in events_of(job.run, "oom")] == ["block_swap"]
    recovered = events_of(job.run, "oom_recovered")[-1]["new"]
    assert recovered["blocks_to_swap"] > 0 and recovered["base_weights_dtype"] == "bf16"
    assert (recovered["batch_size"], recovered["gradient_accumulation_steps"]) == (1, 2)  # same batch
    steps = events_of(job.run, "step")
    assert [e["step"] for e in steps] == [1, 2] and all(math.isfinite(e["loss"]) for e in steps)
    assert max(e["meter_peak"] for e in steps) <= budget
    finished = events_of(job.run, "run_finished")[0]
    assert [r["rung"] for r in finished["oom_recoveries"]] == ["block_swap"]
