"""One LoRA dropout output per distinct input: adapted modules that read the same tensor share it.

PEFT gives every adapted module its own `lora_dropout` layer, and each keeps its own dropped-out copy of the
module's input (and its mask) for backward. In a decoder layer q, k and v read one tensor, as do the MLP's gate
and up projections, so three (two) copies of the same input are held where one would do. `share_lora_dropout`
replaces the dropout layers of sibling modules by one `SharedDropout`: the first adapted module to see an input
draws the mask, and every other module called on that same tensor object reuses the dropped-out output.

- The shared output lives exactly as long as the input tensor it was drawn for (a weak reference to the input
  releases it), so nothing is held past the modules that read that input, and nothing outlives the step.
- Gradient checkpointing: the recomputed forward builds new input tensors and restores the RNG state, so its
  first module draws the same mask again and the others reuse it, as in the original forward. A module that
  reads a tensor it already read (a checkpointed function recomputed from its saved input) draws again.
- PEFT casts a module's input to the LoRA weights' dtype before its dropout; the input is recognised by the
  tensor the module was called with (recorded by a forward pre-hook), not by the cast copy.

Difference in training: q, k and v (and gate and up) see the same dropout mask instead of independent ones;
each module's LoRA input is still dropped out with probability p, so each module's expected update is the same.
litgpt's fused qkv LoRA applies one dropout to the shared input of q, k and v too (its MLP projections each draw
their own); torchtune, like PEFT, draws one mask per module.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch


class SharedDropout(torch.nn.Module):
    """Dropout whose output is reused by every module called on the same input tensor (see module docs)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)
        self.source: torch.Tensor | None = None  # the input of the adapted module being run (set by hooks)
        self.caller: int | None = None  # id() of that module
        self._outputs: dict[int, tuple[weakref.ref, dict[tuple, tuple[torch.Tensor, set]]]] = {}

    def extra_repr(self) -> str:
        return f"p={self.p}, shared per input"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        source = self.source if self.source is not None else x
        key = (x.dtype, x.device, tuple(x.shape), torch.is_grad_enabled())
        caller = self.caller
        entry = self._outputs.get(id(source))
        if entry is not None and entry[0]() is source:
            found = entry[1].get(key)
            # a module that already read this output is in a new pass over the same tensor (a checkpointed
            # function recomputed with its saved input): it draws again, as PEFT's own dropout would
            if found is not None and caller not in found[1]:
                found[1].add(caller)
                return found[0]
        out = torch.nn.functional.dropout(x, self.p, training=True)
        if entry is None or entry[0]() is not source:
            entry = (weakref.ref(source, self._forget(id(source))), {})
            self._outputs[id(source)] = entry
        entry[1][key] = (out, {caller})
        return out

    def _forget(self, key: int):
        owner = weakref.ref(self)

        def release(ref: weakref.ref) -> None:
            shared = owner()
            held = shared._outputs if shared is not None else {}
            if key in held and held[key][0] is ref:
                del held[key]

        return release


def _dropout_layers(model: Any) -> list[tuple[Any, str, torch.nn.Dropout]]:
    """(LoRA layer, adapter name, its dropout) for every PEFT LoRA layer with a dropout of p > 0."""
    from peft.tuners.lora import LoraLayer

    found = []
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter, dropout in module.lora_dropout.items():
            if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
                found.append((module, adapter, dropout))
    return found


def _with_siblings(layers: list[tuple[Any, str, torch.nn.Dropout]], model: Any) -> list:
    """The layers that have a sibling (same parent module, same input width) that may read the same tensor;
    others (`down_proj`, `lm_head`, fused `qkv_proj`) keep PEFT's own dropout: nothing to share."""
    parents = {id(child): id(parent) for parent in model.modules() for child in parent.children()}
    groups: dict[tuple, int] = {}
    for module, adapter, _ in layers:
        key = (parents.get(id(module)), adapter, _in_features(module))
        groups[key] = groups.get(key, 0) + 1
    return [
        (module, adapter, dropout)
        for module, adapter, dropout in layers
        if groups[(parents.get(id(module)), adapter, _in_features(module))] > 1
    ]


def _in_features(module: Any) -> int | None:
    return getattr(getattr(module, "base_layer", module), "in_features", None)


def share_lora_dropout(model: Any) -> int:
    """Replace the LoRA dropout layers of `model` (a PEFT model) that have siblings reading the same input
    (`_with_siblings`) by one `SharedDropout` per dropout rate; returns how many layers now share. Modules
    called on different tensors still draw their own masks."""
    shared: dict[float, SharedDropout] = {}
    layers = _with_siblings(_dropout_layers(model), model)
    for module, adapter, dropout in layers:
        one = shared.setdefault(float(dropout.p), SharedDropout(dropout.p))
        one.train(dropout.training)
        module.lora_dropout[adapter] = one
        module.register_forward_pre_hook(_record_source(one))
        module.register_forward_hook(_forget_source(one), always_call=True)
    return len(layers)


def _record_source(shared: SharedDropout):
    def hook(module: torch.nn.Module, args: tuple) -> None:
        shared.source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        shared.caller = id(module)

    return hook


def _forget_source(shared: SharedDropout):
    def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
        shared.source = shared.caller = None

    return hook
