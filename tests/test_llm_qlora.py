"""QLoRA (NF4 base through bitsandbytes) and 8-bit AdamW on the CPU, end to end on the tiny Llama: train from a
YAML config, resume exactly, export an adapter the un-quantised base loads; weight dtypes under QLoRA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from llm_helpers import (
    StopAfter,
    adapter_tensors,
    make_job,
    max_diff,
    records,
    single_thread,
    write_jsonl,
    write_llm_yaml,
)

from loratui.config import load_config
from loratui.models.llm.loading import ModelLoadError, load_base
from loratui.models.quant import bitsandbytes_problem
from loratui.runs.checkpoints import load_checkpoint
from loratui.train.llm.trainer import run_training

pytest.importorskip("bitsandbytes")
if bitsandbytes_problem("cpu", "QLoRA") is not None:
    pytest.skip("the installed bitsandbytes does not run on the CPU", allow_module_level=True)

IDS = torch.tensor([[1, 40, 41, 300, 301, 302, 500, 7]])


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from single_thread()


@pytest.fixture()
def qa_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "data" / "qa.jsonl", records("prompt_response", 8))


def _config(tmp_path: Path, base: Path, data: Path, **overrides):
    """The config a user writes in YAML (loaded through the config loader, aliases and all)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    return load_config(write_llm_yaml(tmp_path, base, data, **overrides)).config


def _three_segments(cfg) -> tuple[dict, object]:
    """Stop after 2 optimizer steps, resume and stop after 2 more, resume to the end (6 steps)."""
    job = make_job(cfg)
    assert run_training(job, stop=StopAfter(2), console=False).state == "stopped"
    first = job.run.latest_checkpoint()
    assert first.name == "step-2"
    assert run_training(
        make_job(cfg, resume_from=first, run=job.run), stop=StopAfter(2), console=False
    ).state == ("stopped")
    second = job.run.latest_checkpoint()
    result = run_training(make_job(cfg, resume_from=second, run=job.run), console=False)
    assert result.state == "finished" and result.step == 6
    return adapter_tensors(result.adapter_dir), first


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits.float()


def test_qlora_trains_from_yaml_resumes_exactly_and_exports(tmp_path: Path, tiny_llama: Path, qa_file: Path):
    from peft import PeftModel

    options = {
        "load_in_4bit": True,
        "max_steps": 6,
        "gradient_accumulation_steps": 2,
        "lr_scheduler": "cosine",
    }
    straight_cfg = _config(tmp_path / "a", tiny_llama, qa_file, **options)
    assert straight_cfg.load_in_4bit
    straight = run_training(make_job(straight_cfg), console=False)
    assert straight.state == "finished"
    base_layer = straight.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(base_layer).__name__ == "Linear4bit" and base_layer.weight.dtype == torch.uint8

    resumed, _ = _three_segments(_config(tmp_path / "b", tiny_llama, qa_file, **options))
    trained = adapter_tensors(straight.adapter_dir)
    assert max_diff(trained, resumed) == 0.0  # the same weights as the uninterrupted run, bit for bit

    # the PEFT adapter loads on the un-quantised base with exactly the trained LoRA weights
    quantised_out = _logits(straight.model)
    base, _, _ = load_base(str(tiny_llama))
    plain = _logits(base)
    loaded = PeftModel.from_pretrained(base, str(straight.adapter_dir))
    state = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert len(state) == len(trained) > 0
    for key, value in trained.items():
        torch.testing.assert_close(state[key.replace(".weight", ".default.weight")], value, rtol=0, atol=0)
    adapted = _logits(loaded)
    assert (adapted - plain).abs().max() > 1e-3  # the adapter changes the un-quantised model's output
    # on a freshly loaded 4-bit base the adapter gives the training model's output
    base4, _, _ = load_base(str(tiny_llama), load_in_4bit=True)
    again = _logits(PeftModel.from_pretrained(base4, str(straight.adapter_dir)))
    torch.testing.assert_close(again, quantised_out, rtol=0, atol=1e-5)


def test_qlora_keeps_non_quantised_weights_in_the_compute_dtype(
    tmp_path: Path, tiny_llama: Path, qa_file: Path
):
    cfg = _config(tmp_path, tiny_llama, qa_file, load_in_4bit=True, mixed_precision="bf16", max_steps=1)
    cfg = cfg.model_copy(update={"gradient_checkpointing": True})
    result = run_training(make_job(cfg), console=False)
    assert result.state == "finished"
    dtypes: dict[str, set] = {"lora": set(), "4bit": set(), "other": set()}
    for name, param in result.model.named_parameters():
        kind = "lora" if "lora_" in name else "4bit" if param.dtype == torch.uint8 else "other"
        dtypes[kind].add(param.dtype)
        if kind == "other":
            assert not param.requires_grad, name
    assert dtypes == {"lora": {torch.float32}, "4bit": {torch.uint8}, "other": {torch.bfloat16}}
    inner = result.model.base_model.model
    assert inner.lm_head.weight.dtype == inner.model.embed_tokens.weight.dtype == torch.bfloat16
    assert inner.model.norm.weight.dtype == torch.bfloat16
    assert inner.model.layers[0].self_attn.q_proj.base_layer.compute_dtype == torch.bfloat16

    fp32 = run_training(
        make_job(_config(tmp_path / "fp32", tiny_llama, qa_file, load_in_4bit=True, max_steps=1)),
        console=False,
    )
    inner = fp32.model.base_model.model
    assert inner.lm_head.weight.dtype == torch.float32  # without mixed precision: fp32 compute on the CPU
    assert inner.model.layers[0].self_attn.q_proj.base_layer.compute_dtype == torch.float32


def test_8bit_adamw_trains_and_resumes_exactly_with_its_state(
    tmp_path: Path, tiny_llama: Path, qa_file: Path
):
    # rank 64: the q_proj/o_proj LoRA matrices have 4,096 elements, enough for bitsandbytes' 8-bit state
    options = {"optimizer": "adamw_8bit", "lora_rank": 64, "max_steps": 6, "learning_rate": 1e-3}
    straight = run_training(make_job(_config(tmp_path / "a", tiny_llama, qa_file, **options)), console=False)
    assert straight.state == "finished"
    resumed, first = _three_segments(_config(tmp_path / "b", tiny_llama, qa_file, **options))
    assert max_diff(adapter_tensors(straight.adapter_dir), resumed) == 0.0

    saved = load_checkpoint(first).training_state["optimizer"]["state"]
    states = [state["__bnb_optimizer_quant_state__"] for state in saved.values()]
    assert {str(state["state1"].dtype) for state in states} == {"torch.uint8", "torch.float32"}
    eight_bit = [state for state in states if state["state1"].dtype == torch.uint8]
    assert all(state["state2"].dtype == torch.uint8 and "absmax1" in state for state in eight_bit)


def test_missing_or_old_bitsandbytes_is_explained(
    tmp_path: Path, tiny_llama: Path, qa_file: Path, monkeypatch
):
    import loratui.models.quant as quant
    from loratui.train.loop.optim import MissingDependency

    monkeypatch.setattr(quant, "bitsandbytes_version", lambda: None)
    cfg = _config(tmp_path, tiny_llama, qa_file, load_in_4bit=True)
    with pytest.raises(
        ModelLoadError, match=r'needs bitsandbytes: pip install "loratui\[quant\]".*load_in_4bit: false'
    ):
        run_training(make_job(cfg), console=False)
    eight_bit = _config(tmp_path / "8bit", tiny_llama, qa_file, optimizer="adamw8bit")
    with pytest.raises(
        MissingDependency, match=r'adamw8bit needs bitsandbytes: pip install "loratui\[quant\]"'
    ):
        run_training(make_job(eight_bit), console=False)
    monkeypatch.setattr(quant, "bitsandbytes_version", lambda: (0, 45, 5))
    with pytest.raises(
        ModelLoadError, match=r"on the CPU needs bitsandbytes >= 0\.50 \(installed: 0\.45\.5\)"
    ):
        run_training(make_job(cfg), console=False)
    with pytest.raises(MissingDependency, match=r"on the CPU needs bitsandbytes >= 0\.50"):
        run_training(make_job(eight_bit), console=False)
    assert quant.bitsandbytes_problem("cuda", "QLoRA") is None  # older releases still run on CUDA


def test_oom_rung_swaps_a_running_adamw_to_8bit_on_the_cpu_keeping_its_moments() -> None:
    import bitsandbytes.functional as bnbf
    from accelerate import Accelerator

    from loratui.train.oom.optimizer_swap import can_use_8bit, swap_to_8bit

    assert can_use_8bit(torch.device("cpu")) and not can_use_8bit(None)
    torch.manual_seed(0)
    big, small = torch.nn.Parameter(torch.randn(64, 128)), torch.nn.Parameter(torch.randn(8, 8))
    inner = torch.optim.AdamW([big, small], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(inner, lambda s: 1.0)
    optimizer, scheduler = Accelerator(cpu=True).prepare(inner, scheduler)
    for _ in range(3):
        big.grad, small.grad = torch.randn_like(big), torch.randn_like(small)
        optimizer.step()
    moments = {
        p: (inner.state[p]["exp_avg"].clone(), inner.state[p]["exp_avg_sq"].clone()) for p in (big, small)
    }
    assert swap_to_8bit(optimizer, scheduler)
    new = optimizer.optimizer
    assert type(new).__name__ == "AdamW8bit" and scheduler.scheduler.optimizer is new
    state = new.state[big]
    assert state["state1"].dtype == torch.uint8 and state["step"] == 3
    carried = bnbf.dequantize_blockwise(
        state["state1"], absmax=state["absmax1"], code=state["qmap1"], blocksize=256
    )
    torch.testing.assert_close(
        carried, moments[big][0], rtol=0, atol=0.02 * float(moments[big][0].abs().max())
    )
    torch.testing.assert_close(new.state[small]["state2"], moments[small][1])  # small tensors: 32-bit, copied
    big.grad, small.grad = torch.randn_like(big), torch.randn_like(small)
    before = big.detach().clone()
    optimizer.step()
    assert not torch.equal(before, big.detach())


def test_planner_models_nf4_storage_compute_dtype_weights_and_8bit_state(tiny_llama: Path) -> None:
    from loratui.config import TrainConfig
    from loratui.memory.estimate import estimate_peak, optimizer_bytes, planner_for
    from loratui.memory.estimate_types import NF4_BYTES
    from loratui.memory.meter import MemoryMeter

    llama7 = TrainConfig(
        task_type="text-generation",
        base_model="meta-llama/Llama-2-7b-hf",
        mixed_precision="bf16",
        batch_size=2,
    )
    qlora = llama7.model_copy(update={"load_in_4bit": True, "gradient_checkpointing": True})
    model = planner_for(qlora).summary.components["model"]
    other = model.params - model.quantizable  # embeddings, norms, lm_head
    expected = model.quantizable * NF4_BYTES + other * 2 + model.buffers * 4
    assert estimate_peak(qlora).breakdown["weights"] == int(expected)  # not fp32: the compute dtype
    fp32 = estimate_peak(qlora.model_copy(update={"mixed_precision": "no"})).breakdown["weights"]
    assert fp32 == int(expected + other * 2)
    assert (
        estimate_peak(qlora).total_bytes
        < estimate_peak(llama7.model_copy(update={"gradient_checkpointing": True})).total_bytes
    )

    # 8-bit AdamW: 2 B per element + an fp32 absmax per 256-element block and state (small tensors 32-bit)
    state8, temporaries = optimizer_bytes("adamw8bit", [(4096 * 2, 64)], 16, "cuda")
    assert state8 == 64 * (2 * 4096 * 2 * 16 + 2 * 4 * (4096 * 2 * 16 // 256)) and temporaries == 0
    assert optimizer_bytes("adamw8bit", [(100, 3)], 4, "cpu")[0] == 3 * 8 * 400
    eight = estimate_peak(llama7.model_copy(update={"optimizer": "adamw8bit"}))
    assert eight.breakdown["optimizer_state"] < 0.3 * estimate_peak(llama7).breakdown["optimizer_state"]

    # on the CPU, QLoRA is planned as it runs there (fp32 compute), and the weights match the loaded model's bytes
    tiny = TrainConfig(
        task_type="text-generation", base_model=str(tiny_llama), load_in_4bit=True, mixed_precision="no"
    )
    cpu = estimate_peak(tiny, device="cpu")
    assert not any("CUDA" in note for note in cpu.notes)
    loaded, _, _ = load_base(str(tiny_llama), load_in_4bit=True)
    meter = MemoryMeter()
    meter.register_model(loaded.requires_grad_(False))
    measured = meter.breakdown("live")["weights"]
    meter.close()
    assert abs(cpu.breakdown["weights"] / measured - 1) < 0.03
    plain = estimate_peak(tiny.model_copy(update={"load_in_4bit": False}), device="cpu").breakdown["weights"]
    assert cpu.breakdown["weights"] < 0.8 * plain
