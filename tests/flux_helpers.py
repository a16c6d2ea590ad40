"""Helpers for the Flux training tests: LoRA layers on a loaded tiny model, fixed transformer inputs."""

from __future__ import annotations

import torch

from loratui.models.flux import flow_match
from loratui.models.flux.lora import TRANSFORMER, plan_flux_targets
from loratui.models.sd.lora import LoraPlan, inject_lora


def add_lora(parts, targets=None, rank: int = 4, train_clip: bool = False) -> list[torch.nn.Parameter]:
    components = {TRANSFORMER: parts.transformer, "text_encoder": parts.clip}
    plan = LoraPlan(
        targets=plan_flux_targets(targets, components, train_text_encoder=train_clip), rank=rank, alpha=rank
    )
    torch.manual_seed(0)
    params = inject_lora({k: components[k] for k in plan.targets}, plan)
    for layer in parts.transformer.modules():  # a trained-looking LoRA (B is zero at the start)
        if hasattr(layer, "lora_B"):
            torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    return params


def fixed_inputs(parts, batch: int = 2, side: int = 4):
    generator = torch.Generator().manual_seed(3)
    tokens, cfg = side * side, parts.transformer.config
    return {
        "hidden_states": torch.randn(batch, tokens, cfg.in_channels, generator=generator),
        "encoder_hidden_states": torch.randn(batch, 6, cfg.joint_attention_dim, generator=generator),
        "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, generator=generator),
        "timestep": torch.tensor([0.3, 0.8])[:batch],
        "guidance": torch.ones(batch),
        "img_ids": flow_match.image_ids(2 * side, 2 * side),
        "txt_ids": flow_match.text_ids(6),
        "return_dict": False,
    }


def loss_and_grads(parts, params, inputs) -> tuple[float, list[torch.Tensor]]:
    for param in params:
        param.grad = None
    out = parts.transformer(**inputs)[0]
    loss = (out.float() ** 2).mean()
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in params]
