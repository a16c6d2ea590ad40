"""The memory planner counts each optimizer's state as the optimizer really keeps it (tensors and dtype), on the
tiny SD1.5 pipeline and the tiny Llama, and its predicted peak follows the CPU meter with Prodigy and Adafactor."""

from __future__ import annotations

import pytest
import torch

from loratui.config import TrainConfig
from loratui.memory.estimate import estimate_peak, optimizer_bytes, state_elements

OPTIMIZERS = ["adamw", "adamw8bit", "prodigy", "adafactor", "schedulefree_adamw", "came", "lion"]


@pytest.fixture(scope="module", autouse=True)
def isolated_cache(tmp_path_factory):
    """One fit cache for the module (the traced reference steps are shared by every optimizer)."""
    from loratui.memory.tables import clear_memory_cache

    patch = pytest.MonkeyPatch()
    patch.setenv("LORATUI_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    clear_memory_cache()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    clear_memory_cache()
    patch.undo()


def _state_bytes(optimizer) -> int:
    inner = getattr(optimizer, "optimizer", optimizer)
    return sum(
        v.numel() * v.element_size()
        for state in inner.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    )


def _sd_config(base, data, optimizer: str, **extra) -> TrainConfig:
    return TrainConfig(
        base_model=str(base),
        train_data_dir=str(data),
        model_family="sd15",
        resolution=64,
        batch_size=2,
        lora_rank=4,
        mixed_precision="no",
        optimizer=optimizer,
        **extra,
    )


def _llm_config(base, optimizer: str, **extra) -> TrainConfig:
    return TrainConfig(
        task_type="text-generation",
        model_family="llm",
        base_model=str(base),
        train_data_dir=".",
        max_seq_len=32,
        batch_size=2,
        lora_rank=4,
        mixed_precision="no",
        optimizer=optimizer,
        **extra,
    )


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_planned_state_equals_the_state_after_one_step_sd(optimizer, tiny_sd15, tmp_path):
    from loratui.train.memory_check.realstep import sd_real_step, write_image_dataset

    cfg = _sd_config(tiny_sd15, write_image_dataset(tmp_path / "images", 2, 64), optimizer)
    step = sd_real_step(cfg, "sd15")
    step.run(None)
    actual = _state_bytes(step.optimizer)
    planned = estimate_peak(cfg, family="sd15", device="cpu").breakdown["optimizer_state"]
    assert actual > 0
    assert abs(planned / actual - 1) <= 0.01, (optimizer, planned, actual)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_planned_state_equals_the_state_after_one_step_llm(optimizer, tiny_llama):
    from loratui.train.memory_check.realstep import llm_real_step

    cfg = _llm_config(tiny_llama, optimizer)
    step = llm_real_step(cfg)
    step.run(None)
    actual = _state_bytes(step.optimizer)
    planned = estimate_peak(cfg, family="llm", device="cpu").breakdown["optimizer_state"]
    assert actual > 0
    assert abs(planned / actual - 1) <= 0.01, (optimizer, planned, actual)


def test_state_layouts_follow_the_optimizer_options():
    """Shapes decide factored state; options that add or drop a tensor change the count."""
    a, b = (4, 320), (320, 4)  # LoRA A and B of a 320 -> 320 Linear at rank 4
    assert state_elements("adafactor", a, False) == 4 + 320 + 1  # row + column + RMS, no first moment
    assert state_elements("adafactor", a, False, {"beta1": 0.9}) == 4 + 320 + 1 + 1280
    assert state_elements("adafactor", (320,), False) == 320 + 1  # 1-D: full second moment
    assert state_elements("came", b, True) == 1280 + 2 * (320 + 4) + 1
    assert state_elements("prodigy", a, False) == 4 * 1280  # exp_avg, exp_avg_sq, s, p0
    assert state_elements("prodigy", b, True) == 3 * 1280 + 1  # B starts at zero: p0 is a 0-d tensor
    assert state_elements("prodigy", a, False, {"betas": [0.0, 0.99]}) == 3 * 1280
    assert state_elements("schedulefree_adamw", a, False) == 2 * 1280
    assert state_elements("lion", a, False) == 1280
    wide = (4, 2048), (2048, 4)  # large enough for 8-bit state (bitsandbytes keeps small tensors in fp32)
    sizes = [(2048, 2)]
    shapes = [(wide[0], 1, False), (wide[1], 1, True)]
    ranking = {name: optimizer_bytes(name, sizes, 4, "cuda", shapes)[0] for name in OPTIMIZERS}
    assert (
        ranking["adafactor"] < ranking["adamw8bit"] < ranking["lion"] < ranking["adamw"] < ranking["prodigy"]
    )


@pytest.mark.parametrize("optimizer", ["prodigy", "adafactor"])
def test_planned_peak_follows_the_cpu_meter(optimizer, tiny_sd15, tiny_llama, tmp_path):
    """Predicted peak vs the metered peak of the trainers' real step (CPU): within 5 %."""
    from loratui.train.memory_check.accuracy import session_rows
    from loratui.train.memory_check.realstep import write_image_dataset

    data = write_image_dataset(tmp_path / "images", 4, 64)
    rows = session_rows(
        "tiny-sd15", "sd", "sd15", tiny_sd15, data, 64, False, 8, batches=(2,), optimizer=optimizer
    )
    rows += session_rows(
        "tiny-llama", "llm", "llm", tiny_llama, tmp_path, 64, False, 8, batches=(2,), optimizer=optimizer
    )
    for row in rows:
        assert abs(row.error) <= 0.05, (optimizer, row)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_oom_ladder_offers_the_8bit_rung_only_where_the_state_maps(optimizer):
    """AdamW -> 8-bit AdamW keeps its moments; the other optimizers skip the rung, with the reason stated."""
    from loratui.train.oom.ladder import OomLadder

    settings = {
        "batch_size": 1,
        "gradient_accumulation_steps": 1,
        "gradient_checkpointing": True,
        "chunked_loss": True,
        "optimizer": optimizer,
        "max_seq_len": 64,
    }
    ladder = OomLadder("llm", dict(settings), allow_quality=False)
    # activation offload (rung 4, CUDA) comes before the 8-bit rung on a GPU; this test is about rung 5
    rungs = [rung.name for rung in ladder.remaining(settings) if rung.name != "activation_offload"]
    skipped = ladder.skipped(settings)
    if optimizer == "adamw":
        assert rungs == ["optimizer_8bit"] and not skipped
    elif optimizer == "adamw8bit":
        assert rungs == [] and not skipped
    else:
        assert rungs == []
        assert f"optimizer {optimizer} keeps state that does not map onto 8-bit" in skipped["optimizer_8bit"]
