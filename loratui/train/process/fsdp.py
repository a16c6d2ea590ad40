"""FSDP: the frozen base, the LoRA and its optimizer state sharded over the training processes (`fsdp: true`).

`loratui train --gpus N --fsdp` trains a causal LM whose frozen weights do not fit one GPU. Each decoder layer
(and the input embeddings and the LM head, when they are not tied) becomes one FSDP2 group
(`torch.distributed.fsdp.fully_shard`): every parameter of the model - frozen base weights (16-bit, or 4-bit
packed in a bf16 `quant_storage`), the LoRA, and with it the optimizer state - is split in N shards, one per
process. A group's full weights exist only while it runs (all-gathered before its forward and again in
backward, the next one prefetched); LoRA gradients are reduce-scattered in backward, so no separate gradient
all-reduce is needed.

What stays as with data parallelism (`loratui.train.process.distributed`): the global batch and its split,
the per-step exchange (out of memory, stop, loss, memory), rank 0 writes the run. What differs:

- checkpoints and the exported adapter are gathered (`full_lora_state`, `full_optimizer_state`: every rank
  takes part, rank 0 writes) into exactly the files of a one-process run, so a checkpoint resumes with or
  without FSDP, on any number of processes;
- every rank runs the same number of micro-batches (a rank with fewer samples runs zero-weighted ones), since
  each forward and backward is a collective;
- an out-of-memory error inside a step cannot be recovered in-process (the other ranks wait inside an
  all-gather): the worker restarts the group from the last checkpoint with the OOM ladder's next rung;
- samples during training are not rendered (generation would need every rank); evaluation runs on every rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

#: optimizers whose state is made of tensors shaped like the parameters (sharded along with them)
FSDP_OPTIMIZERS = ("adamw",)


class FsdpUnavailable(ValueError):
    """A setting FSDP training cannot use (shown to the user as is)."""


def check_fsdp_settings(cfg: Any) -> None:
    """Refuse settings that cannot work with FSDP, before anything is loaded."""
    if cfg.optimizer not in FSDP_OPTIMIZERS:
        why = (
            "keeps quantised state that is not sharded with the weights"
            if cfg.optimizer == "adamw8bit"
            else "is not supported on sharded parameters (its state layout and global statistics are not "
            "verified under FSDP)"
        )
        raise FsdpUnavailable(
            f"fsdp: optimizer {cfg.optimizer} {why}; "
            "use optimizer: adamw (with fsdp its state is already split over the processes)"
        )
    if getattr(cfg, "method", "sft") != "sft":
        raise FsdpUnavailable(
            f"fsdp: method {cfg.method} is not supported with FSDP yet (its reference pass and pair batches are "
            "not sharded); train it on one GPU (with load_in_4bit: true if the base does not fit) or use method: sft"
        )


# --- the process group ---------------------------------------------------------------------------------------


class _OwnGroup:
    """A one-process group opened here (FSDP needs a group also when one process trains)."""

    opened = False


def ensure_process_group(device: Any) -> None:
    """Open a one-process group when FSDP trains in a single process (the launcher opens it otherwise)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "gloo" if device.type == "cpu" else "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    _OwnGroup.opened = True


def close_own_group() -> None:
    """Close a group `ensure_process_group` opened (a later run in the same process starts clean)."""
    import torch.distributed as dist

    if _OwnGroup.opened and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    _OwnGroup.opened = False


# --- sharding ----------------------------------------------------------------------------------------------


def decoder_layers(model: Any) -> list[Any]:
    """The repeated blocks of a causal LM (the classes its `_no_split_modules` names), outermost first."""
    from loratui.models.llm.loss import causal_lm

    lm = causal_lm(model)
    names = set(getattr(lm, "_no_split_modules", None) or ())
    found = [m for m in lm.modules() if type(m).__name__ in names]
    if found:
        return [m for m in found if not any(m is not o and _contains(o, m) for o in found)]
    import torch

    lists = [m for m in lm.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1]
    if not lists:
        raise FsdpUnavailable(
            f"fsdp: cannot find the decoder layers of {type(lm).__name__}; train it without fsdp"
        )
    return list(max(lists, key=len))


def _contains(outer: Any, inner: Any) -> bool:
    return any(m is inner for m in outer.modules())


def shard_groups(model: Any) -> list[Any]:
    """The modules that become FSDP groups, innermost first: decoder layers, then the untied embeddings and
    LM head (a tied pair stays in the root group)."""
    from loratui.models.llm.loss import causal_lm

    lm = causal_lm(model)
    groups = decoder_layers(model)
    embed, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    tied = embed is not None and head is not None and head.weight is embed.weight
    if not tied:
        groups += [m for m in (embed, head) if m is not None]
    return groups


def shard_model(model: Any, device: Any) -> Any:
    """`fully_shard` every group and the root over all processes; the shards move to `device`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from loratui.train.process.distributed import world_size

    ensure_process_group(device)
    mesh = init_device_mesh(device.type, (world_size(),))
    for module in shard_groups(model):
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    _move_quant_states(model, device)
    return model


def _move_quant_states(model: Any, device: Any) -> None:
    """4-bit layers (bitsandbytes `Linear4bit`) keep their quantisation constants on the module (FSDP turns the
    weight into a plain shard): they go to the device with the shards."""
    for module in model.modules():
        state = getattr(module, "quant_state", None)
        if state is not None and hasattr(state, "to"):
            state.to(device)


def autocast_forward(model: Any, accelerator: Any) -> None:
    """The mixed-precision forward accelerate's `prepare` gives a model it wraps (autocast, fp32 outputs); a
    sharded model is not passed to `prepare` (it would wrap it in DDP)."""
    from types import MethodType

    from accelerate.utils import convert_outputs_to_fp32, get_mixed_precision_context_manager

    if not getattr(accelerator, "native_amp", False):
        return
    autocast = get_mixed_precision_context_manager(True, accelerator.autocast_handler)
    forward = autocast(model.forward.__func__)
    model.forward = MethodType(convert_outputs_to_fp32(forward), model)


def check_precision(precision: str) -> None:
    """FSDP trains in bf16 or fp32: fp16's loss scaling does not handle sharded gradients here."""
    if precision == "fp16":
        raise FsdpUnavailable(
            "fsdp: mixed_precision fp16 is not supported (its gradient scaler does not see sharded "
            "gradients); use mixed_precision: bf16 (Ampere or newer GPUs) or no"
        )


def is_sharded(model_or_params: Any) -> bool:
    """Whether a model (or a list of parameters) holds FSDP-sharded parameters (DTensors)."""
    from torch.distributed.tensor import DTensor

    params = (
        model_or_params if isinstance(model_or_params, list | tuple) else list(model_or_params.parameters())
    )
    return any(isinstance(p, DTensor) for p in params)


def local(tensor: Any) -> Any:
    """This rank's part of a sharded tensor (the tensor itself when it is not sharded)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def full(tensor: Any) -> Any:
    """The whole tensor (a collective for a sharded one: every rank must call it)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


# --- gathered state: the one-process files ------------------------------------------------------------------


def full_lora_state(model: Any) -> dict[str, Any]:
    """The LoRA tensors under PEFT's saved names, gathered on every rank (on the CPU): the same dict as
    `loratui.models.llm.adapter_files.lora_tensors` of a one-process model. Every rank must call it."""
    from peft import get_peft_model_state_dict

    trainable = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            trainable[name] = full(param.detach()).to("cpu")
    return get_peft_model_state_dict(model, state_dict=trainable, save_embedding_layers=False)


def _optimizer(optimizer: Any) -> Any:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper


def _param_names(model: Any, optimizer: Any) -> list[str]:
    """The optimizer's parameters by name, in its own order (the order of a one-process state dict)."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in _optimizer(optimizer).param_groups for p in group["params"]]


def full_optimizer_state(model: Any, optimizer: Any) -> dict[str, Any]:
    """The optimizer state gathered in the format of `optimizer.state_dict()` of one process (state keyed by
    parameter position); rank 0 gets it, the other ranks an empty dict. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    names = _param_names(model, optimizer)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    by_name = get_optimizer_state_dict(model, _optimizer(optimizer), options=options)
    if not by_name:
        return {}
    position = {name: index for index, name in enumerate(names)}
    groups = []
    for group in by_name["param_groups"]:
        groups.append({**group, "params": [position[name] for name in group["params"]]})
    state = {position[name]: value for name, value in by_name["state"].items()}
    return {"state": state, "param_groups": groups}


def load_optimizer_state(model: Any, optimizer: Any, saved: dict[str, Any]) -> None:
    """Load a one-process optimizer state dict (every rank reads the checkpoint) into the sharded optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(model, optimizer)
    state = {names[int(index)]: value for index, value in saved["state"].items()}
    groups = [
        {**group, "params": [names[int(i)] for i in group["params"]]} for group in saved["param_groups"]
    ]
    set_optimizer_state_dict(
        model,
        _optimizer(optimizer),
        {"state": state, "param_groups": groups},
        options=StateDictOptions(full_state_dict=True),
    )


def gradients_finite_everywhere(params: Sequence[Any]) -> bool:
    """False when any rank's gradient shard holds nan or inf (all ranks agree)."""
    import torch

    from loratui.train.process.oom_dist import any_rank

    grads = [local(p.grad) for p in params if p.grad is not None]
    bad = bool(grads) and not bool(torch.stack([torch.isfinite(g).all().cpu() for g in grads]).all())
    return not any_rank(bad)
