"""LyCORIS/kohya tensors of a trained adapter: the key layout ComfyUI's and A1111/Forge's loaders read.

Per module `<name>` (the kohya name, `lora_unet_...`, `lora_te_...`; see `loratui.models.sd.kohya`):

- lora/locon: `<name>.lora_down.weight` [r, in(, kh, kw)], `<name>.lora_up.weight` [out, r(, 1, 1)], `<name>.alpha`;
- dora: the same plus `<name>.dora_scale` [out, 1(, 1, 1)] (the magnitude per output channel);
- loha: `<name>.hada_w1_a` [out, r], `hada_w1_b` [r, in*kh*kw], `hada_w2_a`, `hada_w2_b` (`hada_t1`/`hada_t2`
  with Tucker), `<name>.alpha`;
- lokr: `<name>.lokr_w1` (or `lokr_w1_a`/`lokr_w1_b`), `lokr_w2` (or `lokr_w2_a`/`lokr_w2_b`, `lokr_t2`), `alpha`.

The loaders scale a module by alpha / r, r read from the low-rank tensor (`lora_down`, `hada_w1_b`,
`lokr_w1_a`/`lokr_w2_a`); a LoKr module with two full factors has no rank and is applied at scale 1, so its
PEFT scale is folded into `lokr_w2`. PEFT's tensors are otherwise the LyCORIS ones (same shapes and products).
"""

from __future__ import annotations

import torch

from loratui.models.sd.kohya import kohya_name

_MARKERS = (".lora_A.", ".lora_B.", ".lora_magnitude_vector.", ".hada_", ".lokr_")


def group_state(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """`<component>.<path>` -> {param name: tensor} for a checkpoint's adapter state (`lora_state`)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        cut = min((key.find(m) for m in _MARKERS if m in key), default=-1)
        if cut < 0:
            raise ValueError(f"{key} is not an adapter tensor")
        out.setdefault(key[:cut], {})[key[cut + 1 :]] = tensor
    return out


def module_tensors(params: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """One module's LyCORIS/kohya tensors (suffix -> tensor) from its PEFT tensors and PEFT scale."""
    if "lora_A.weight" in params:
        down, up = params["lora_A.weight"], params["lora_B.weight"]
        out = {"lora_down.weight": down, "lora_up.weight": up, "alpha": _alpha(scale * down.shape[0])}
        magnitude = params.get("lora_magnitude_vector.weight")
        if magnitude is not None:  # PEFT: [out] (Linear) or [1, out, 1, 1] (Conv2d) -> [out, 1(, 1, 1)]
            out["dora_scale"] = magnitude.reshape(up.shape[0], *[1] * (up.dim() - 1))
        return out
    if "hada_w1_a" in params:
        out = dict(params)
        rank = params["hada_w1_b"].shape[0]
        out["alpha"] = _alpha(scale * rank)
        return out
    out = dict(params)
    if "lokr_w1" in params and "lokr_w2" in params:
        out["lokr_w2"] = params["lokr_w2"] * scale
        out["alpha"] = _alpha(1.0)
        return out
    low = params["lokr_w1_a"] if "lokr_w1_a" in params else params["lokr_w2_a"]
    rank = low.shape[1] if "lokr_t2" not in params or "lokr_w1_a" in params else low.shape[0]
    out["alpha"] = _alpha(scale * rank)
    return out


def _alpha(value: float) -> torch.Tensor:
    return torch.tensor(float(value), dtype=torch.float32)


def to_lycoris_state(
    state: dict[str, torch.Tensor],
    scales: dict[str, float],
    family: str,
    *,
    layers_per_block: int = 2,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Every module of a checkpoint's adapter state under its kohya name (tensors in `dtype`)."""
    out: dict[str, torch.Tensor] = {}
    for stem, params in sorted(group_state(state).items()):
        component, _, path = stem.partition(".")
        if stem not in scales:
            raise ValueError(f"no scale recorded for {stem}")
        name = kohya_name(component, path, family, layers_per_block)
        for suffix, tensor in module_tensors(params, scales[stem]).items():
            tensor = tensor.detach().cpu()
            if dtype is not None:
                tensor = tensor.to(dtype)
            out[f"{name}.{suffix}"] = tensor.contiguous()
    return out
