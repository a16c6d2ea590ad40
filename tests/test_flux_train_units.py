"""Flux training pieces on the tiny model: timestep sampling, packing, LoRA targets, fp8/NF4 storage, block swap."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from loratui.models.flux import flow_match
from loratui.models.flux.block_swap import BlockSwapper, transformer_blocks
from loratui.models.flux.fp8 import FP8, Fp8Linear, quantise_base, stored_bytes
from loratui.models.flux.loading import load_flux
from loratui.models.flux.lora import TRANSFORMER, plan_flux_targets
from loratui.models.sd.lora import LoraSetupError
from loratui.util.seeding import sample_generator
from tests.flux_helpers import add_lora, fixed_inputs, loss_and_grads

# --- timestep sampling and packing ---------------------------------------------------------------------------


def test_sigma_samplings_follow_kohya_definitions() -> None:
    draw = lambda method, **kw: flow_match.draw_sigma(sample_generator(1, 0, 5, "t"), method, **kw)  # noqa: E731
    normal = float(torch.randn((1,), generator=sample_generator(1, 0, 5, "t")))
    uniform = float(torch.rand((1,), generator=sample_generator(1, 0, 5, "t")))
    assert draw("uniform") == pytest.approx(uniform)
    sig = 1 / (1 + math.exp(-2.0 * normal))
    assert draw("sigmoid", sigmoid_scale=2.0) == pytest.approx(sig, rel=1e-6)
    assert draw("logit_normal", sigmoid_scale=2.0) == pytest.approx(1 / (1 + math.exp(-normal)), rel=1e-6)
    assert draw("shift", sigmoid_scale=2.0, discrete_flow_shift=3.0) == pytest.approx(3 * sig / (1 + 2 * sig))
    # flux_shift at 1024^2 (4096 packed tokens): mu = 1.15
    mu = 1.15
    expected = math.exp(mu) / (math.exp(mu) + 1 / sig - 1)
    assert draw("flux_shift", sigmoid_scale=2.0, image_tokens=4096) == pytest.approx(expected, rel=1e-6)
    assert flow_match.resolution_mu(256) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="timestep_sampling"):
        draw("cosine")


def test_shift_moves_sigmas_toward_noise_and_draws_are_per_sample() -> None:
    latents = torch.zeros(64, 16, 8, 8)
    plain, _ = flow_match.sample_sigmas_and_noise(latents, range(64), seed=0, epoch=0, method="sigmoid")
    shifted, _ = flow_match.sample_sigmas_and_noise(latents, range(64), seed=0, epoch=0, method="shift")
    assert bool((shifted >= plain).all()) and float(shifted.mean()) > float(plain.mean()) + 0.1
    sigmas, noise = flow_match.sample_sigmas_and_noise(
        latents[:3], [7, 2, 9], seed=0, epoch=1, method="uniform"
    )
    alone, noise_alone = flow_match.sample_sigmas_and_noise(
        latents[:1], [2], seed=0, epoch=1, method="uniform"
    )
    assert float(sigmas[1]) == float(alone[0]) and torch.equal(noise[1], noise_alone[0])


def test_packing_matches_the_pipeline_layout() -> None:
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 6, 4)
    packed = flow_match.pack_latents(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 6, 4))
    assert torch.equal(flow_match.unpack_latents(packed, 6, 4), latents)
    assert torch.equal(
        flow_match.image_ids(6, 4), FluxPipeline._prepare_latent_image_ids(2, 3, 2, "cpu", torch.float32)
    )
    noisy = flow_match.noisy_latents(latents, torch.ones_like(latents), torch.tensor([0.0, 1.0]))
    assert torch.equal(noisy[0], latents[0]) and torch.equal(noisy[1], torch.ones_like(latents[1]))


# --- LoRA targets ---------------------------------------------------------------------------------------------


def test_default_targets_are_the_block_projections(tiny_flux_dev: Path) -> None:
    parts = load_flux(tiny_flux_dev)
    plan = plan_flux_targets(
        None, {TRANSFORMER: parts.transformer, "text_encoder": parts.clip}, train_text_encoder=True
    )
    paths = plan[TRANSFORMER]
    assert (
        "transformer_blocks.0.attn.add_k_proj" in paths and "transformer_blocks.1.ff_context.net.2" in paths
    )
    assert "single_transformer_blocks.1.proj_mlp" in paths and "single_transformer_blocks.0.proj_out" in paths
    assert "proj_out" not in paths and not any("norm" in p or "embed" in p for p in paths)
    assert len(paths) == 2 * 12 + 2 * 5
    assert any(p.endswith("self_attn.q_proj") for p in plan["text_encoder"])
    only_q = plan_flux_targets(["to_q"], {TRANSFORMER: parts.transformer}, train_text_encoder=False)
    assert only_q[TRANSFORMER] == [
        "single_transformer_blocks.0.attn.to_q",
        "single_transformer_blocks.1.attn.to_q",
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.1.attn.to_q",
    ]
    with pytest.raises(LoraSetupError, match="proj_mlp"):
        plan_flux_targets(["linear1"], {TRANSFORMER: parts.transformer}, train_text_encoder=False)


# --- one training forward/backward on fixed inputs -------------------------------------------------------------


def test_fp8_base_upcasts_per_layer_and_keeps_lora_in_fp32(tiny_flux_dev: Path) -> None:
    parts = load_flux(tiny_flux_dev)
    params = add_lora(parts)
    inputs = fixed_inputs(parts)
    before = stored_bytes(parts.transformer)
    converted = quantise_base(parts.transformer, "fp8", torch.float32)
    assert converted == 40  # every frozen Linear of the 4 blocks (LoRA-wrapped or not)
    assert stored_bytes(parts.transformer) < 0.45 * before
    fp8_layers = [m for m in parts.transformer.modules() if isinstance(m, Fp8Linear)]
    assert fp8_layers and all(m.weight.dtype == FP8 and not m.weight.requires_grad for m in fp8_layers)
    assert all(p.dtype == torch.float32 for p in params)
    layer = fp8_layers[0]
    x = torch.randn(3, layer.in_features, requires_grad=True)
    y = layer(x)
    expected = torch.nn.functional.linear(x, layer.weight.float(), layer.bias)
    torch.testing.assert_close(y, expected)
    y.sum().backward()
    torch.testing.assert_close(x.grad, layer.weight.float().sum(0).expand(3, -1))
    loss, grads = loss_and_grads(parts, params, inputs)
    assert math.isfinite(loss) and all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads[:4])


def test_nf4_base_trains_on_cpu(tiny_flux_dev: Path) -> None:
    from loratui.models.quant import bitsandbytes_problem

    if bitsandbytes_problem("cpu", "nf4"):
        pytest.skip("bitsandbytes cannot run NF4 on this CPU")
    parts = load_flux(tiny_flux_dev)
    params = add_lora(parts)
    before = stored_bytes(parts.transformer)
    assert quantise_base(parts.transformer, "nf4", torch.float32) == 40
    assert stored_bytes(parts.transformer) < 0.35 * before
    assert sum(type(m).__name__ == "Linear4bit" for m in parts.transformer.modules()) == 40
    loss, grads = loss_and_grads(parts, params, fixed_inputs(parts))
    assert math.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)


class PoisonedSwapper(BlockSwapper):
    """Evicted weights read NaN: any use of a block's weights while it is 'in CPU memory' poisons the loss."""

    def _evict(self, entry) -> None:
        if not entry.on_device:
            return
        entry.on_device = False
        for tensor, master in entry.tensors:
            tensor.data = torch.full_like(master, float("nan"))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_block_swap_gives_the_same_loss_and_gradients(tiny_flux_dev: Path, checkpointing: bool) -> None:
    parts = load_flux(tiny_flux_dev)
    params = add_lora(parts)
    if checkpointing:
        parts.transformer.enable_gradient_checkpointing()
    parts.transformer.train()
    inputs = fixed_inputs(parts)
    loss, grads = loss_and_grads(parts, params, inputs)
    swapper = PoisonedSwapper(parts.transformer, 2, torch.device("cpu")).attach()
    # kohya's blocks_to_swap 2: the last 2 // 2 double and the last 2 x (2 - 1) single blocks, each kind
    # capped so that one of its blocks stays on the device (the tiny model has 2 + 2)
    double, single = parts.transformer.transformer_blocks, parts.transformer.single_transformer_blocks
    assert swapper.count == 2 and [e.block for e in swapper.swapped] == [double[1], single[1]]
    assert transformer_blocks(parts.transformer) == [*double, *single]
    swapped_loss, swapped_grads = loss_and_grads(parts, params, inputs)
    assert swapped_loss == pytest.approx(loss, abs=1e-5)
    for grad, swapped in zip(grads, swapped_grads, strict=True):
        torch.testing.assert_close(swapped, grad, atol=1e-5, rtol=1e-5)
    assert swapper.moves >= 4  # each swapped block came in for the forward and for the backward
    assert not any(entry.on_device for entry in swapper.swapped)  # and left after its backward
    with torch.no_grad():  # sampling: blocks come and go within the forward
        torch.testing.assert_close(parts.transformer(**inputs)[0], parts.transformer(**inputs)[0])
    swapper.detach()
    assert loss == pytest.approx(loss_and_grads(parts, params, inputs)[0], abs=1e-5)
