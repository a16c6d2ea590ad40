"""What a GPU step would do, reproduced on the meta device or a CPU: CUDA autocast and fused attention.

`TraceMode` is a `TorchFunctionMode` used while tracing a reference training step:

- with ``amp_dtype`` set it applies CUDA autocast's casting policy (matmul/conv/linear/attention in 16-bit;
  norms, upsampling, softmax, exp/pow and losses in fp32; casts of trainable leaf tensors cached for the
  forward pass) — CUDA autocast cannot run on the meta device or without a GPU, so its rules are applied here;
- on the meta device ``scaled_dot_product_attention`` is replaced by a stand-in with the memory behaviour of
  the fused kernels (flash / memory-efficient): it keeps q, k, v, the output and a float32 log-sum-exp per row,
  and never materialises the attention matrix (the meta device would otherwise pick the math kernel).

The casts go through autograd exactly as autocast's do, so saved tensors and their dtypes match a GPU run.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

LOW_PRECISION = {
    "linear",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "matmul",
    "__matmul__",
    "__rmatmul__",
    "mm",
    "mv",
    "bmm",
    "baddbmm",
    "addmm",
    "addbmm",
    "einsum",
    "scaled_dot_product_attention",
}
FP32 = {
    "group_norm",
    "layer_norm",
    "interpolate",
    "exp",
    "expm1",
    "log",
    "log1p",
    "log2",
    "log10",
    "rsqrt",
    "reciprocal",
    "pow",
    "__pow__",
    "softplus",
    "mse_loss",
    "l1_loss",
    "smooth_l1_loss",
    "nll_loss",
    "cross_entropy",
    "binary_cross_entropy_with_logits",
    "logsumexp",
    "cosine_similarity",
}
FP32_OUTPUT = {"softmax", "log_softmax", "sum", "cumsum", "prod"}  # autocast passes dtype=float32


class _FusedAttention(torch.autograd.Function):
    """Memory stand-in for flash / memory-efficient attention: saves q, k, v, out and a fp32 LSE."""

    @staticmethod
    def forward(ctx, query, key, value):
        out = query.new_empty((*query.shape[:-1], value.shape[-1]))
        lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, _, _ = ctx.saved_tensors
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _floating(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _low_precision(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype in (torch.float16, torch.bfloat16)


class TraceMode(TorchFunctionMode):
    """Autocast emulation (``amp_dtype``) and fused-attention stand-in (``fused_attention``) while tracing."""

    def __init__(self, amp_dtype: torch.dtype | None = None, *, fused_attention: bool = True):
        super().__init__()
        self.amp_dtype = amp_dtype
        self.fused_attention = fused_attention
        self.autocast_active = amp_dtype is not None
        self._cache: dict[int, torch.Tensor] = {}

    def clear_cache(self) -> None:
        """Forget cached casts of trainable weights (autocast does this when the forward pass ends)."""
        self._cache.clear()

    def _cast(self, value: object, dtype: torch.dtype) -> object:
        if not _floating(value) or value.dtype == dtype:
            if isinstance(value, list | tuple):
                return type(value)(self._cast(v, dtype) for v in value)
            return value
        if value.is_leaf and value.requires_grad:
            cached = self._cache.get(id(value))
            if cached is None:
                cached = value.to(dtype)
                self._cache[id(value)] = cached
            return cached
        return value.to(dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if self.autocast_active:
            if name in LOW_PRECISION:
                args = tuple(self._cast(a, self.amp_dtype) for a in args)
                kwargs = {k: self._cast(v, self.amp_dtype) for k, v in kwargs.items()}
            elif name in FP32:
                args = tuple(self._cast(a, torch.float32) for a in args)
                kwargs = {k: self._cast(v, torch.float32) for k, v in kwargs.items()}
            elif name in FP32_OUTPUT and kwargs.get("dtype") is None and args and _low_precision(args[0]):
                kwargs["dtype"] = torch.float32
        if name == "scaled_dot_product_attention" and self.fused_attention:
            qkv = [*args[:3], *(kwargs.get(k) for k in ("query", "key", "value")[len(args[:3]) :])]
            if isinstance(qkv[0], torch.Tensor) and qkv[0].is_meta:  # diffusers passes them by keyword
                return _FusedAttention.apply(*qkv)
        return func(*args, **kwargs)
