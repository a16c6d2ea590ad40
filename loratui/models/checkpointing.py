"""Activation (gradient) checkpointing on a transformers model, by the name its transformers version has."""

from __future__ import annotations

from typing import Any

NON_REENTRANT = {"use_reentrant": False}


def enable_activation_checkpointing(model: Any, options: dict[str, Any] | None = None) -> None:
    """Turn on activation checkpointing; `options` go to `torch.utils.checkpoint` (None: the library default).

    transformers 5 calls it `activation_checkpointing_enable` and warns on the older
    `gradient_checkpointing_enable`, which is all that transformers 4 has."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


def offload_available(device: Any) -> bool:
    """Activation offload moves saved tensors from a GPU to host memory: nothing to gain on the CPU."""
    return getattr(device, "type", str(device)) == "cuda"


MIN_OFFLOAD_BYTES = 1 << 20  # smaller saved tensors stay on the device (a copy would cost more than it saves)


def worth_offloading(tensor: Any) -> bool:
    """A saved tensor worth moving: not a parameter or a view of one (linear layers save `weight.t()`), and at
    least `MIN_OFFLOAD_BYTES`."""
    import torch

    if isinstance(tensor, torch.nn.Parameter) or isinstance(tensor._base, torch.nn.Parameter):
        return False
    return tensor.numel() * tensor.element_size() >= MIN_OFFLOAD_BYTES


def offloaded_activations(device: Any, enabled: bool = True) -> Any:
    """A context in which the activations autograd saves for backward wait in host memory (pinned) and come
    back to the GPU when backward needs them (torchtune calls this activation offloading). Under
    non-reentrant checkpointing these are each checkpointed layer's input and what runs between layers; the
    recomputed layer's own tensors stay on the GPU. Parameters (and views of them) and tensors under
    `MIN_OFFLOAD_BYTES` stay. A no-op when not `enabled` or not on CUDA (on the CPU the tensors already are in
    host memory)."""
    import contextlib

    import torch

    if not enabled or not offload_available(device):
        return contextlib.nullcontext()

    def pack(tensor: torch.Tensor) -> Any:
        if tensor.device.type != "cuda" or not worth_offloading(tensor):
            return tensor
        host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=True)
        host.copy_(tensor)
        return (tensor.device, host)

    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=True)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)
