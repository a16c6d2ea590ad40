"""The lean LLM step: chunked / fused loss, LoRA dtype and dropout, activation offload, and how the planner sees
each of them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loratui.config import TrainConfig
from loratui.memory.tables import clear_memory_cache
from loratui.models.llm.batches import Unit, collate
from loratui.models.llm.loss import (
    causal_loss_sum,
    chunk_count,
    chunked_token_loss_sum,
    loss_backend,
    token_loss_sum,
)
from loratui.tiny_models import build_tiny_llama
from loratui.util.sizes import GIB, MIB

VOCAB = 4608

# --- the loss -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wide_vocab_llama(tiny_models_dir: Path) -> Path:
    """A tiny Llama whose vocabulary (4,608) splits the chunked loss into two chunks by default."""
    return build_tiny_llama(tiny_models_dir / "llama-vocab4608", vocab_size=VOCAB)


def _lora_model(base: Path, **cfg_values):
    from loratui.models.llm.loading import load_base
    from loratui.models.llm.lora import apply_lora_dtype, setup_lora

    model, _, _ = load_base(str(base))
    cfg = TrainConfig(task_type="text-generation", base_model=str(base), **cfg_values)
    model = apply_lora_dtype(cfg, setup_lora(cfg, model))
    model.train()
    return model


def _batch(vocab: int):
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in (40, 23, 31)]
    units = [Unit(row, [-100] * 5 + row[5:], len(row) - 5) for row in rows]
    return collate(units, 0)


def _loss_and_grads(model, compute) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads


@pytest.mark.parametrize("chunk_tokens", [None, 7])
def test_chunked_loss_equals_the_full_loss_and_lora_gradients_in_fp32(
    wide_vocab_llama: Path, chunk_tokens: int | None
) -> None:
    model = _lora_model(wide_vocab_llama, lora_dropout=0.0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero, which would leave every A gradient zero
            torch.nn.init.normal_(param, std=0.02)
    assert chunk_count(VOCAB) == 2
    batch = _batch(VOCAB)
    full, expected = _loss_and_grads(model, lambda: token_loss_sum(model, batch))
    chunked, got = _loss_and_grads(
        model, lambda: chunked_token_loss_sum(model, batch, chunk_tokens=chunk_tokens)
    )
    assert chunked == pytest.approx(full, rel=1e-5)
    assert expected and set(got) == set(expected)
    for name, grad in expected.items():  # within 1e-5 of each gradient's scale (summation order differs)
        scale = float(grad.abs().max())
        assert scale > 0, name
        assert float((got[name] - grad).abs().max()) <= 1e-5 * scale, name


def test_the_chunked_loss_never_computes_full_logits(wide_vocab_llama: Path) -> None:
    model = _lora_model(wide_vocab_llama)
    lm = model.get_base_model()
    rows: list[int] = []
    lm.lm_head.register_forward_hook(
        lambda module, args, out: rows.append(out.reshape(-1, out.shape[-1]).shape[0])
    )
    batch = _batch(VOCAB)
    targets = int((batch.labels[:, 1:] != -100).sum())
    causal_loss_sum(model, batch, chunked=True).backward()
    # two chunks in forward, each recomputed once in backward; never a row per input token
    assert len(rows) == 4 and max(rows) == -(-targets // 2) < batch.input_ids.numel()
    rows.clear()
    causal_loss_sum(model, batch, chunked=False).backward()
    assert rows == [batch.input_ids.numel()]


def test_loss_backend_selection_falls_back_to_the_portable_path(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loratui.models.llm import loss

    model = _lora_model(tiny_llama)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(loss.importlib.util, "find_spec", lambda name: None)  # liger-kernel not installed
    assert not loss.liger_installed()
    assert loss_backend(model, cpu, True) == "chunked"
    assert loss_backend(model, cuda, True) == "chunked"
    assert loss_backend(model, cpu, False) == "full"
    batch = _batch(1000)
    with torch.no_grad():
        chunked, full = causal_loss_sum(model, batch, chunked=True), token_loss_sum(model, batch)
    assert float(chunked) == pytest.approx(float(full), rel=1e-5)
    monkeypatch.setattr(loss, "liger_installed", lambda: True)
    assert loss_backend(model, cpu, True) == "chunked"  # Liger's kernels need CUDA
    assert loss_backend(model, cuda, True) == "liger"
    assert loss_backend(model, cuda, False) == "full"
    lm = model.get_base_model()
    lm.config.final_logit_softcapping = 30.0  # logits changed inside the model's forward: full logits only
    assert loss_backend(model, cuda, True) == "full"
    lm.config.final_logit_softcapping = None
    adapted = _lora_model(tiny_llama, target_modules=["q_proj", "lm_head"])
    assert loss_backend(adapted, cuda, True) == "chunked"  # a LoRA-wrapped head: not Liger's plain weight


# --- LoRA dtype and dropout --------------------------------------------------------------------------------


def test_lora_dtype_sets_the_trainable_weights_dtype_and_trains(tiny_llama: Path) -> None:
    model = _lora_model(tiny_llama, lora_dtype="bf16")
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and {p.dtype for p in trainable} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.float32}
    causal_loss_sum(model, _batch(1000), chunked=True).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in trainable)
    assert {p.dtype for p in _lora_model(tiny_llama).parameters() if p.requires_grad} == {torch.float32}


def test_lora_dropout_zero_keeps_no_copy_and_modules_share_one_otherwise(tiny_llama: Path) -> None:
    from loratui.models.llm.shared_dropout import SharedDropout

    def dropouts(model) -> list[torch.nn.Module]:
        return [m.lora_dropout["default"] for m in model.modules() if hasattr(m, "lora_dropout")]

    none = dropouts(_lora_model(tiny_llama, lora_dropout=0.0))
    some = dropouts(_lora_model(tiny_llama, lora_dropout=0.05))
    assert none and all(isinstance(d, torch.nn.Identity) for d in none)
    assert len(some) == len(none) and all(d.p == 0.05 for d in some)
    shared = [d for d in some if isinstance(d, SharedDropout)]
    assert shared and len({id(d) for d in shared}) == 1  # see tests/test_llm_shared_dropout.py


def test_activation_offload_is_a_no_op_off_the_gpu(tiny_llama: Path) -> None:
    from loratui.models.checkpointing import offload_available, offloaded_activations

    assert not offload_available(torch.device("cpu")) and offload_available(torch.device("cuda"))
    model = _lora_model(tiny_llama)
    batch = _batch(1000)
    with torch.no_grad(), offloaded_activations(torch.device("cpu"), True):
        loss = causal_loss_sum(model, batch, chunked=True)
        assert float(loss) == pytest.approx(float(token_loss_sum(model, batch)), rel=1e-5)


# --- the planner --------------------------------------------------------------------------------------------


@pytest.fixture
def llama8b(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from loratui.memory.arch import bundled_llm_config

    monkeypatch.setenv("LORATUI_CACHE_DIR", str(tmp_path / "cache"))
    clear_memory_cache()
    folder = tmp_path / "llama-3.1-8b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(bundled_llm_config("llama-3.1-8b")))
    return folder


def _predict(base: Path, device: str = "cuda", **values) -> dict[str, int]:
    from loratui.memory.estimate import estimate_peak

    cfg = TrainConfig(
        task_type="text-generation",
        base_model=str(base),
        batch_size=2,
        max_seq_len=2048,
        gradient_checkpointing=True,
        mixed_precision="bf16",
        **values,
    )
    estimate = estimate_peak(cfg, device=device)
    return {"total": estimate.total_bytes, **estimate.breakdown}


def test_the_planner_changes_with_every_lean_option(llama8b: Path) -> None:
    """Llama-3.1-8B shape, batch 2 x 2048 tokens, checkpointing, bf16 on a GPU."""
    lean = _predict(llama8b)
    full = _predict(llama8b, chunked_loss=False)
    logits_fp32 = 2 * 2047 * 128256 * 4  # one fp32 copy of the full logits
    assert 1.5 * logits_fp32 < full["total"] - lean["total"] < 4 * logits_fp32

    offload = _predict(llama8b, activation_offload=True)
    checkpoints = 32 * 2 * 2048 * 4096 * 2  # each layer's bf16 input, held until backward
    assert 0.5 * checkpoints < lean["total"] - offload["total"] < 1.5 * checkpoints
    assert _predict(llama8b, "cpu", activation_offload=True)["total"] == _predict(llama8b, "cpu")["total"]

    half = _predict(llama8b, lora_dtype="bf16")
    assert (
        half["lora_params"] * 2 == lean["lora_params"]
        and half["optimizer_state"] * 2 == lean["optimizer_state"]
    )
    assert 0 < lean["total"] - half["total"] < 4 * lean["lora_params"]

    dropout = _predict(llama8b, lora_dropout=0.05)
    assert 0 < dropout["total"] - lean["total"] < 1 * GIB
    assert _predict(llama8b, lora_dropout=0.0)["total"] == lean["total"]


def test_the_analytic_fallback_models_the_lean_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loratui.memory.estimate import estimate_peak

    monkeypatch.setenv("LORATUI_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "unknown"
    folder.mkdir()
    config = {
        "model_type": "no-such-model",
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "vocab_size": 128256,
    }
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 8192}))

    def total(**values) -> int:
        cfg = TrainConfig(
            task_type="text-generation",
            base_model=str(folder),
            max_seq_len=2048,
            gradient_checkpointing=True,
            **values,
        )
        estimate = estimate_peak(cfg, family="llm")
        assert "analytic" in estimate.method
        return estimate.total_bytes

    from loratui.memory import analytic
    from loratui.models.llm import loss

    assert analytic.VOCAB_PER_CHUNK == loss.VOCAB_PER_CHUNK
    lean = total()
    assert total(chunked_loss=False) - lean > 1 * GIB
    assert 0 < lean - total(activation_offload=True) < 1 * GIB
    assert 0 < lean - total(lora_dtype="bf16") < 100 * MIB


def test_small_shape_prediction_within_5_percent_of_the_meter_with_chunked_loss(
    wide_vocab_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real LLM step (chunked loss, two chunks, checkpointing) under the CPU meter vs the planner."""
    from loratui.memory.estimate import estimate_peak
    from loratui.train.memory_check.realstep import llm_real_step, measure_real_peak

    monkeypatch.setenv("LORATUI_CACHE_DIR", str(tmp_path / "cache"))
    clear_memory_cache()
    cfg = TrainConfig(
        task_type="text-generation",
        model_family="llm",
        base_model=str(wide_vocab_llama),
        train_data_dir=str(tmp_path),
        max_seq_len=128,
        batch_size=2,
        gradient_checkpointing=True,
        mixed_precision="no",
        chunked_loss=True,
    )
    metered = measure_real_peak(llm_real_step(cfg), steps=1).peak_bytes
    predicted = estimate_peak(cfg, device="cpu").total_bytes
    assert abs(predicted / metered - 1) <= 0.05, (predicted, metered)
    full = measure_real_peak(
        llm_real_step(cfg.model_copy(update={"chunked_loss": False})), steps=1
    ).peak_bytes
    assert metered < full


@pytest.mark.parametrize(("device", "offload"), [("cuda:0", True), ("cpu", False)])
def test_a_restarted_worker_gets_activation_offload_only_where_it_trained_on_a_gpu(
    tmp_path: Path, device: str, offload: bool
) -> None:
    from loratui.config import ResolvedConfig
    from loratui.runs.config_file import read_run_config, write_run_config
    from loratui.runs.events import EventWriter
    from loratui.runs.rundir import create_run_dir
    from loratui.train.process.supervisor import Supervisor

    run = create_run_dir(tmp_path / "runs", "restart")
    cfg = TrainConfig(
        task_type="text-generation", model_family="llm", batch_size=1, gradient_checkpointing=True
    )
    write_run_config(run.path, ResolvedConfig(cfg, {}, "llm"))
    events = EventWriter(run.events_path)
    events.write("run_started", 0, device=device)
    events.close()
    assert Supervisor(run)._lower_one_rung(3)
    lowered = read_run_config(run.path).config
    assert lowered.activation_offload is offload
    assert (
        lowered.max_seq_len < cfg.max_seq_len
    ) is not offload  # without a GPU the next rung is the quality one
