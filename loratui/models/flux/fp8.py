"""How the frozen transformer is stored (`base_weights_dtype`): bf16, fp8 (e4m3) or NF4.

- ``fp8``: each frozen Linear of the transformer blocks keeps its weight in float8_e4m3fn (1 byte a weight,
  plainly cast as kohya's `fp8_base` and the ComfyUI fp8 files do) and upcasts it to the activations' dtype
  for the one matmul (`Fp8Linear`); the LoRA layers stay in fp32.
- ``nf4``: those Linears become bitsandbytes `Linear4bit` (NF4, compute in the activations' dtype); an fp8
  base is upcast first (the OOM ladder's fp8 -> nf4 rung).

Only the blocks' Linears are converted (for NF4, those whose input width is a multiple of 64, which is every
one of FLUX.1's) (over 95 % of FLUX.1's weights); the embedders, the final layer and the
norms stay in the compute dtype. LoRA layers must be injected first: they wrap the original Linears, which
are then replaced inside them, so the adapters never see a quantised dtype.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
BLOCK_CONTAINERS = ("transformer_blocks", "single_transformer_blocks")
#: weights per NF4 quantisation block; Linears whose input width is not a multiple stay in the compute dtype
NF4_BLOCK = 64


class _UpcastLinear(torch.autograd.Function):
    """x @ upcast(W).T + b for a frozen float8 W, saving only W (not its upcast copy) for the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return grad @ weight.to(grad.dtype), None, None


class Fp8Linear(torch.nn.Linear):
    """A frozen Linear whose weight is stored in float8 e4m3 and upcast per forward (and per backward)."""

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> Fp8Linear:
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = torch.nn.Parameter(linear.weight.detach().to(FP8), requires_grad=False)
        new.bias = linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _UpcastLinear.apply(x, self.weight, self.bias)


def _frozen_linears(model: torch.nn.Module) -> Iterator[tuple[torch.nn.Module, str, torch.nn.Linear]]:
    """(parent, attribute, Linear) for every plain frozen Linear inside the transformer blocks."""
    for container in BLOCK_CONTAINERS:
        blocks = getattr(model, container, None)
        if blocks is None:
            continue
        for parent in list(blocks.modules()):
            for name, child in list(parent.named_children()):
                if type(child) not in (torch.nn.Linear, Fp8Linear) or child.weight.requires_grad:
                    continue  # LoRA A/B layers are trained; NF4 layers are final
                yield parent, name, child


def quantise_base(model: torch.nn.Module, mode: str, compute_dtype: torch.dtype) -> int:
    """Store the blocks' frozen Linears as `mode` ("bf16": unchanged, "fp8", "nf4"); returns how many.

    Weights of an fp8 file loaded as float8 (`fp8_weights`) arrive here as they are: the blocks' Linears keep
    them (fp8), and every other float8 tensor (embedders, final layer; or all of them for bf16 / nf4) is
    widened to `compute_dtype`, the dtype those layers compute in."""
    count = _convert(model, mode, compute_dtype) if mode in ("fp8", "nf4") else 0
    if mode not in ("bf16", "fp16", "fp32", None, "fp8", "nf4"):
        raise ValueError(f"base_weights_dtype {mode!r}: choose bf16, fp8 or nf4")
    for module in model.modules():
        if isinstance(module, Fp8Linear):
            continue
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if tensor.dtype == FP8:
                tensor.data = tensor.data.to(compute_dtype)
    return count


def _convert(model: torch.nn.Module, mode: str, compute_dtype: torch.dtype) -> int:
    count = 0
    for parent, name, linear in list(_frozen_linears(model)):
        if mode == "fp8" and isinstance(linear, Fp8Linear):
            continue
        if mode == "nf4" and linear.in_features % NF4_BLOCK:
            continue  # bitsandbytes quantises rows in blocks of 64 weights
        setattr(parent, name, Fp8Linear.from_linear(linear) if mode == "fp8" else _nf4(linear, compute_dtype))
        count += 1
    return count


def _nf4(linear: torch.nn.Linear, compute_dtype: torch.dtype) -> torch.nn.Module:
    import bitsandbytes as bnb

    from loratui.models.quant import quiet_cpu_kernel_notice

    quiet_cpu_kernel_notice()
    device = linear.weight.device
    new = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        quant_type="nf4",
        device="cpu",
    )
    weight = linear.weight.detach().cpu().to(compute_dtype)  # an fp8 weight is upcast first
    new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    if linear.bias is not None:
        new.bias = torch.nn.Parameter(linear.bias.detach().cpu(), requires_grad=False)
    return new.to(device)


def stored_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's parameters and buffers occupy as stored."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
