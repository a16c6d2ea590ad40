"""LoRA dropout shared by the adapted modules that read the same tensor (`loratui.models.llm.shared_dropout`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loratui.config import TrainConfig
from loratui.memory.meter import MemoryMeter
from loratui.models.llm.shared_dropout import SharedDropout

P = 0.1


def _model(base: Path, *, share: bool = True, **values):
    from peft import get_peft_model

    from loratui.models.llm.loading import load_base
    from loratui.models.llm.lora import freeze_base, lora_config, setup_lora

    model, _, _ = load_base(str(base))
    model = model.float()
    values.setdefault("target_modules", ["all-linear"])
    cfg = TrainConfig(task_type="text-generation", base_model=str(base), lora_dropout=P, **values)
    if share:
        model = setup_lora(cfg, model)
    else:  # PEFT as it comes: one dropout layer (and mask) per adapted module
        freeze_base(model, cfg.gradient_checkpointing)
        torch.manual_seed(cfg.seed)
        model = get_peft_model(model, lora_config(cfg, model))
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # non-zero B, so that every LoRA weight gets a gradient
            param.data.normal_(0, 0.05)
    model.train()
    return model


def _ids(model) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return torch.randint(3, int(model.config.vocab_size), (2, 48), generator=generator)


def _step(model, ids: torch.Tensor, seed: int = 7) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads


def _lora_inputs(model) -> tuple[dict[str, torch.Tensor], list]:
    """Hooks recording the input of every `lora_A` (the dropped-out copy of its module's input)."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if name.endswith("lora_A.default"):
            short = name[: -len(".lora_A.default")]
            handles.append(
                module.register_forward_pre_hook(
                    lambda m, args, short=short: seen.__setitem__(short, args[0])
                )
            )
    return seen, handles


@pytest.fixture(scope="module")
def shared(tiny_llama: Path) -> torch.nn.Module:
    return _model(tiny_llama)


@pytest.fixture(scope="module")
def per_module(tiny_llama: Path) -> torch.nn.Module:
    return _model(tiny_llama, share=False)


def test_modules_reading_one_tensor_share_one_dropout_output(shared: torch.nn.Module) -> None:
    model = shared
    dropouts = {n: m.lora_dropout["default"] for n, m in model.named_modules() if hasattr(m, "lora_dropout")}
    assert len({id(d) for d in dropouts.values() if isinstance(d, SharedDropout)}) == 1
    assert all(isinstance(d, SharedDropout) != n.endswith("down_proj") for n, d in dropouts.items())
    seen, handles = _lora_inputs(model)
    _step(model, _ids(model))
    layer = next(k.rsplit(".", 1)[0] for k in seen if k.endswith("self_attn.q_proj"))
    mlp = layer.replace("self_attn", "mlp")
    q, k, v, o = (seen[f"{layer}.{n}_proj"] for n in "qkvo")
    assert q is k and k is v  # one dropped-out copy for the three projections
    assert o is not q
    assert seen[f"{mlp}.gate_proj"] is seen[f"{mlp}.up_proj"]
    assert seen[f"{mlp}.down_proj"] is not seen[f"{mlp}.gate_proj"]
    dropped = float((q == 0).float().mean())
    assert 0.02 < dropped < 0.3  # p = 0.1 of the elements dropped
    for handle in handles:
        handle.remove()
    del seen, q, k, v, o
    dropout = next(d for d in dropouts.values() if isinstance(d, SharedDropout))
    assert not dropout._outputs and dropout.source is None  # nothing held after the step


class _Replay(torch.nn.Module):
    """A per-module dropout that applies a given mask (PEFT's layout, masks chosen by the test)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.mask = mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask / (1 - P)


def test_equals_per_module_dropout_when_the_masks_are_equal(
    tiny_llama: Path, shared: torch.nn.Module
) -> None:
    seen, handles = _lora_inputs(shared)
    ids = _ids(shared)
    loss, grads = _step(shared, ids)
    for handle in handles:
        handle.remove()
    reference = _model(tiny_llama, share=False)
    for name, module in reference.named_modules():
        if hasattr(module, "lora_dropout") and name in seen:
            module.lora_dropout["default"] = _Replay((seen[name] != 0).float())
    ref_loss, ref_grads = _step(reference, ids)
    assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-7)


def test_checkpoint_recomputation_draws_the_same_masks(tiny_llama: Path, shared: torch.nn.Module) -> None:
    plain = shared
    ids = _ids(plain)
    loss, grads = _step(plain, ids)
    checkpointed = _model(tiny_llama, gradient_checkpointing=True)
    ckpt_loss, ckpt_grads = _step(checkpointed, ids)
    assert abs(loss - ckpt_loss) <= 1e-6 * abs(loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ckpt_grads[name], rtol=1e-5, atol=1e-7)


def test_metered_memory_drops_by_the_shared_copies(
    shared: torch.nn.Module, per_module: torch.nn.Module
) -> None:
    def held(model) -> int:
        """Bytes the forward pass leaves held for backward."""
        ids = _ids(model)
        meter = MemoryMeter()
        meter.register_model(model)
        meter.reset_peak()
        with meter:
            start = meter.breakdown("live")["activations"]
            loss = model(input_ids=ids, labels=ids).loss
            after = meter.breakdown("live")["activations"]
            loss.backward()
        return after - start

    config = shared.config
    tokens = 2 * 48
    # per layer k and v reuse q's dropped-out copy and up reuses gate's: 3 copies, each at least its output and
    # mask (fp32: 4 + 1 bytes an element), at most 12 (the CPU kernel keeps a float noise tensor too)
    copies = 3 * tokens * config.hidden_size * config.num_hidden_layers
    drop = held(per_module) - held(shared)
    assert 5 * copies <= drop <= 12 * copies, (drop, copies)


def test_a_module_reading_the_same_tensor_again_draws_again(shared: torch.nn.Module) -> None:
    """A checkpointed function recomputed from its saved input calls its modules on the same tensor objects."""
    q_proj = next(m for n, m in shared.named_modules() if n.endswith("self_attn.q_proj"))
    seen, handles = _lora_inputs(shared)
    x = torch.randn(2, 5, shared.config.hidden_size)
    q_proj(x)
    first = next(v for k, v in seen.items() if k.endswith("self_attn.q_proj"))
    q_proj(x)
    second = next(v for k, v in seen.items() if k.endswith("self_attn.q_proj"))
    for handle in handles:
        handle.remove()
    assert first is not second and not torch.equal(first, second)


def test_chunked_loss_with_an_adapted_output_head_under_checkpointing(tiny_llama: Path) -> None:
    from loratui.models.llm.batches import Unit, collate
    from loratui.models.llm.loss import chunked_token_loss_sum

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    model = _model(tiny_llama, gradient_checkpointing=True, target_modules=targets)
    head = model.get_base_model().lm_head
    assert isinstance(head.lora_dropout["default"], torch.nn.Dropout)  # no sibling: PEFT's own dropout
    row = _ids(model)[0].tolist()
    batch = collate([Unit(row, [-100] + row[1:], len(row) - 1)], 0)
    loss = chunked_token_loss_sum(model, batch, chunk_tokens=16)
    loss.backward()
    assert torch.isfinite(loss) and head.lora_A["default"].weight.grad is not None
