"""MemoryMeter: storage accounting, categories, simulated out-of-memory inside real training steps, no leaks."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from loratui.config import TrainConfig
from loratui.memory.meter import MemoryMeter, simulated_budget_from_env_or_config
from loratui.train.memory_check.realstep import (
    llm_real_step,
    measure_real_peak,
    sd_real_step,
    write_image_dataset,
)


def _toy() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    model[0].requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    return model, optimizer


def test_storage_counted_once_and_released() -> None:
    meter = MemoryMeter()
    with meter:
        a = torch.empty(1000)  # 4000 bytes
        view = a[10:20]
        b = a.view(10, 100)
        assert meter.live_bytes == 4000
        del a, view, b
        assert meter.live_bytes == 0
        c = torch.ones(250)
        d = c + 1
        assert meter.live_bytes == 2000
        del c, d
    assert meter.peak_bytes == 4000
    assert meter.live_bytes == 0


def test_categories_and_optimizer_state() -> None:
    model, optimizer = _toy()
    meter = MemoryMeter()
    meter.register_model(model)
    meter.register_optimizer(optimizer)
    live = meter.breakdown("live")
    frozen = sum(p.numel() * 4 for p in model[0].parameters())
    trainable = sum(p.numel() * 4 for p in model[2].parameters())
    assert live["weights"] == frozen and live["lora"] == trainable
    for _ in range(2):
        with meter:
            loss = model(torch.randn(32, 64)).square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del loss
    after = meter.breakdown("live")
    assert after["optimizer"] >= 2 * trainable  # exp_avg + exp_avg_sq (+ step counters)
    assert after["gradients"] == 0 and after["activations"] == 0
    peak = meter.breakdown()  # the peak is inside optimizer.step(): every gradient and the new state are live
    assert peak["weights"] == frozen and peak["lora"] == trainable and peak["gradients"] == trainable
    assert peak["optimizer"] >= after["optimizer"]  # the state plus the step's temporaries
    assert sum(peak.values()) == meter.peak_bytes
    meter.reset_peak()
    assert meter.peak_bytes == meter.live_bytes


def test_budget_raises_real_out_of_memory_error() -> None:
    meter = MemoryMeter(budget_bytes=10_000)
    with pytest.raises(torch.OutOfMemoryError) as info, meter:
        keep = torch.empty(2000)  # 8000 bytes: fits
        torch.empty(1000)  # 4000 more: over budget
    assert isinstance(info.value, torch.cuda.OutOfMemoryError)
    assert isinstance(info.value, RuntimeError)
    assert "out of memory" in str(info.value) and "simulated card" in str(info.value)
    del keep
    assert meter.live_bytes == 0


def test_budget_oom_inside_real_llm_training_step(tiny_llama, tmp_path) -> None:
    """A simulated 'card' smaller than the step needs raises torch.OutOfMemoryError inside the real step."""
    cfg = TrainConfig(
        task_type="text-generation",
        model_family="llm",
        base_model=str(tiny_llama),
        train_data_dir=str(tmp_path),
        lora_rank=8,
        batch_size=4,
        max_seq_len=128,
        mixed_precision="no",
    )
    step = llm_real_step(cfg)
    full = measure_real_peak(step, steps=1)
    weights = sum(full.breakdown("live")[k] for k in ("weights", "lora", "optimizer"))
    budget = weights + (full.peak_bytes - weights) // 2
    with pytest.raises(torch.OutOfMemoryError):
        measure_real_peak(step, steps=1, budget_bytes=budget)
    gc.collect()
    # the failed step left nothing behind: the same step runs again within the full budget
    again = measure_real_peak(step, steps=1, budget_bytes=int(full.peak_bytes * 1.05))
    assert again.peak_bytes <= full.peak_bytes * 1.05


@pytest.mark.slow
def test_budget_oom_inside_real_sd_training_step(tiny_sd15, tmp_path) -> None:
    data = write_image_dataset(tmp_path / "images", 2, 64)
    cfg = TrainConfig(
        task_type="image-generation",
        model_family="sd15",
        base_model=str(tiny_sd15),
        train_data_dir=str(data),
        resolution=64,
        batch_size=2,
        mixed_precision="no",
    )
    step = sd_real_step(cfg, "sd15")
    full = measure_real_peak(step, steps=1)
    with pytest.raises(torch.OutOfMemoryError):
        measure_real_peak(step, steps=1, budget_bytes=int(full.peak_bytes * 0.8))


def test_meter_does_not_keep_tensors_alive() -> None:
    meter = MemoryMeter()
    with meter:
        big = torch.empty(10_000)
        ref = weakref.ref(big)
    assert meter.live_bytes == 40_000
    del big
    gc.collect()
    assert ref() is None
    assert meter.live_bytes == 0
    meter_ref = weakref.ref(meter)
    del meter
    gc.collect()
    assert meter_ref() is None  # no finalizer or hook keeps the meter alive


def test_close_removes_hooks() -> None:
    model, optimizer = _toy()
    meter = MemoryMeter()
    meter.register_model(model)
    meter.register_optimizer(optimizer)
    meter.close()
    assert meter.live_bytes == 0
    model(torch.randn(2, 64)).sum().backward()
    optimizer.step()
    assert meter.live_bytes == 0


def test_budget_from_env_or_config(monkeypatch) -> None:
    monkeypatch.delenv("LORATUI_SIMULATE_VRAM", raising=False)
    assert simulated_budget_from_env_or_config(TrainConfig()) is None
    monkeypatch.setenv("LORATUI_SIMULATE_VRAM", "3GiB")
    assert simulated_budget_from_env_or_config(None) == 3 * 2**30
    assert simulated_budget_from_env_or_config(TrainConfig(simulate_vram="512MiB")) == 512 * 2**20
    assert simulated_budget_from_env_or_config({"simulate_vram": "8GB"}) == 8 * 10**9
