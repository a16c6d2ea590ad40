"""The Flux autoencoder (`ae.safetensors`) in its original layout <-> diffusers' `AutoencoderKL` names.

The original layout is the latent-diffusion one (`encoder.down.0.block.1.conv1`, `decoder.up.3.upsample.conv`,
`encoder.mid.attn_1.q` as 1x1 convolutions); decoder up blocks are numbered from the lowest resolution in
diffusers and from the highest in the original. Sizes come from the tensors' shapes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

#: keys inside an all-in-one checkpoint that hold the autoencoder
VAE_PREFIXES = ("vae.", "first_stage_model.")

_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTENTION_BACK = {v: k for k, v in _ATTENTION.items()}
_TOP = {"norm_out": "conv_norm_out"}
_TOP_BACK = {v: k for k, v in _TOP.items()}


class AELayoutError(ValueError):
    """A state dict that is not a Flux-style autoencoder."""


def _count(keys, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def up_block_count(keys) -> int:
    """Decoder up blocks in an original-layout state dict."""
    return _count(keys, r"^decoder\.up\.(\d+)\.")


def _resnet(name: str) -> str:
    return name.replace("nin_shortcut", "conv_shortcut")


def _resnet_back(name: str) -> str:
    return name.replace("conv_shortcut", "nin_shortcut")


def original_key_to_diffusers(key: str, num_up: int) -> str:
    """One original-layout key -> its diffusers name (`num_up`: decoder up blocks)."""
    part, _, rest = key.partition(".")
    if part not in ("encoder", "decoder"):
        return key  # quant_conv / post_quant_conv keep their names
    if m := re.match(r"^down\.(\d+)\.block\.(\d+)\.(.+)$", rest):
        return f"{part}.down_blocks.{m[1]}.resnets.{m[2]}.{_resnet(m[3])}"
    if m := re.match(r"^down\.(\d+)\.downsample\.(.+)$", rest):
        return f"{part}.down_blocks.{m[1]}.downsamplers.0.{m[2]}"
    if m := re.match(r"^up\.(\d+)\.block\.(\d+)\.(.+)$", rest):
        return f"{part}.up_blocks.{num_up - 1 - int(m[1])}.resnets.{m[2]}.{_resnet(m[3])}"
    if m := re.match(r"^up\.(\d+)\.upsample\.(.+)$", rest):
        return f"{part}.up_blocks.{num_up - 1 - int(m[1])}.upsamplers.0.{m[2]}"
    if m := re.match(r"^mid\.block_(\d)\.(.+)$", rest):
        return f"{part}.mid_block.resnets.{int(m[1]) - 1}.{_resnet(m[2])}"
    if m := re.match(r"^mid\.attn_1\.(\w+)\.(\w+)$", rest):
        return f"{part}.mid_block.attentions.0.{_ATTENTION.get(m[1], m[1])}.{m[2]}"
    if m := re.match(r"^(\w+)\.(\w+)$", rest):
        return f"{part}.{_TOP.get(m[1], m[1])}.{m[2]}"
    raise AELayoutError(f"{key!r} is not a key of the autoencoder layout")


def diffusers_key_to_original(key: str, num_up: int) -> str:
    """One diffusers `AutoencoderKL` key -> its original-layout name."""
    part, _, rest = key.partition(".")
    if part not in ("encoder", "decoder"):
        return key
    if m := re.match(r"^down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", rest):
        return f"{part}.down.{m[1]}.block.{m[2]}.{_resnet_back(m[3])}"
    if m := re.match(r"^down_blocks\.(\d+)\.downsamplers\.0\.(.+)$", rest):
        return f"{part}.down.{m[1]}.downsample.{m[2]}"
    if m := re.match(r"^up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", rest):
        return f"{part}.up.{num_up - 1 - int(m[1])}.block.{m[2]}.{_resnet_back(m[3])}"
    if m := re.match(r"^up_blocks\.(\d+)\.upsamplers\.0\.(.+)$", rest):
        return f"{part}.up.{num_up - 1 - int(m[1])}.upsample.{m[2]}"
    if m := re.match(r"^mid_block\.resnets\.(\d+)\.(.+)$", rest):
        return f"{part}.mid.block_{int(m[1]) + 1}.{_resnet_back(m[2])}"
    if m := re.match(r"^mid_block\.attentions\.0\.(.+)\.(\w+)$", rest):
        return f"{part}.mid.attn_1.{_ATTENTION_BACK.get(m[1], m[1])}.{m[2]}"
    if m := re.match(r"^(\w+)\.(\w+)$", rest):
        return f"{part}.{_TOP_BACK.get(m[1], m[1])}.{m[2]}"
    raise AELayoutError(f"{key!r} is not a key of diffusers' AutoencoderKL")


def _is_attention_projection(original_key: str) -> bool:
    return bool(re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", original_key))


def ae_to_diffusers(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """An original-layout autoencoder state dict (prefix removed) with diffusers' names and linear attention."""
    num_up = up_block_count(state_dict)
    if not num_up or "encoder.conv_in.weight" not in state_dict:
        raise AELayoutError(
            "no encoder.conv_in / decoder.up.N keys: not an autoencoder in the original layout"
        )
    out: dict[str, Any] = {}
    for key, tensor in state_dict.items():
        if _is_attention_projection(key) and tensor.ndim == 4:
            tensor = tensor[:, :, 0, 0]
        out[original_key_to_diffusers(key, num_up)] = tensor
    return out


def ae_to_original(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers `AutoencoderKL` state dict in the original layout (attention projections as 1x1 convs)."""
    num_up = _count(state_dict, r"^decoder\.up_blocks\.(\d+)\.")
    out: dict[str, Any] = {}
    for key, tensor in state_dict.items():
        name = diffusers_key_to_original(key, num_up)
        if _is_attention_projection(name) and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        out[name] = tensor.contiguous()
    return out


def ae_config_from_shapes(shapes: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """`AutoencoderKL` kwargs: widths and depths from an original-layout state dict, the rest from `base`
    (the shipped FLUX.1 `vae` config). `norm_num_groups` is kept from `base` when it divides every width."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise AELayoutError(f"the autoencoder key {key!r} is missing")
        value = shapes[key]
        return tuple(int(d) for d in (value.shape if hasattr(value, "shape") else value))

    keys = list(shapes)
    num_down = _count(keys, r"^encoder\.down\.(\d+)\.")
    widths = [shape(f"encoder.down.{i}.block.0.conv1.weight")[0] for i in range(num_down)]
    layers = _count(keys, r"^encoder\.down\.0\.block\.(\d+)\.")
    config = dict(base)
    groups = int(config.get("norm_num_groups", 32))
    if any(w % groups for w in widths):
        groups = next(g for g in (32, 16, 8, 4, 2, 1) if all(w % g == 0 for w in widths))
    config.update(
        in_channels=shape("encoder.conv_in.weight")[1],
        out_channels=shape("decoder.conv_out.weight")[0],
        block_out_channels=widths,
        down_block_types=["DownEncoderBlock2D"] * num_down,
        up_block_types=["UpDecoderBlock2D"] * num_down,
        layers_per_block=layers,
        latent_channels=shape("decoder.conv_in.weight")[1],
        norm_num_groups=groups,
        use_quant_conv="quant_conv.weight" in shapes,
        use_post_quant_conv="post_quant_conv.weight" in shapes,
    )
    return config
