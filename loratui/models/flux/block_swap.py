"""Block swap: transformer blocks live in CPU memory and visit the compute device one at a time.

`count` is kohya sd-scripts' `blocks_to_swap`: the last `count // 2` double-stream blocks and the last
`2 x (count - count // 2)` single-stream blocks (`loratui.config.flux_checks.swap_split`; one block of each
kind always stays on the device) keep their frozen weights in (pinned) CPU memory. A block's weights are brought to the device just before it runs, and the next
swapped block's copy starts meanwhile on a side stream (prefetch); once the block's work is done they leave
again. Trained LoRA weights never move (the optimizer holds them), and NF4 weights stay on the device.

Training needs a block's weights twice: in the forward, and in the backward (autograd saved the weight
tensors themselves, and gradient checkpointing reruns the block). Weights move by re-pointing each tensor's
`.data` (never copying into it), so the saved tensors see whatever storage is current: a hook on the
block's outputs brings the weights back when their gradient arrives, and a hook on its inputs' gradient
sends them away after the block's backward. Without gradient (sampling), they leave right after the forward.

On the CPU every move is a no-op (the same tensors), while the code path (hooks, order, prefetch) runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from loratui.config.flux_checks import swap_split

CONTAINERS = ("transformer_blocks", "single_transformer_blocks")


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks in execution order (double-stream, then single-stream)."""
    return [block for name in CONTAINERS for block in getattr(model, name, [])]


@dataclass
class _Swapped:
    """One swapped block: its frozen tensors' CPU copies and where they are now."""

    block: torch.nn.Module
    tensors: list[tuple[torch.Tensor, torch.Tensor]]  # (live tensor, its CPU master copy)
    on_device: bool = False
    ready: Any = None  # a CUDA event that the prefetch copy has finished


@dataclass
class BlockSwapper:
    """Keeps kohya's `blocks_to_swap: count` blocks of `model` in CPU memory; `attach()` installs the hooks.
    Each kind is capped so that one of its blocks stays on the device (the config check refuses a `count`
    above `max_blocks_to_swap`; the OOM ladder's steps may ask for more than a small model has)."""

    model: torch.nn.Module
    count: int
    device: torch.device
    swapped: list[_Swapped] = field(default_factory=list)
    handles: list[Any] = field(default_factory=list)
    moves: int = 0  # blocks brought to the device (statistics, tests)
    stream: Any = None
    backward: bool = False  # the backward of this step has begun (checkpointing reruns blocks in it)

    def attach(self) -> BlockSwapper:
        double = list(getattr(self.model, CONTAINERS[0], []))
        single = list(getattr(self.model, CONTAINERS[1], []))
        self.count = max(0, int(self.count))
        swap_double, swap_single = swap_split(self.count, len(double), len(single))
        chosen = double[len(double) - swap_double :] + single[len(single) - swap_single :]
        pin = self.device.type == "cuda"
        for block in chosen:  # execution order: the prefetch brings the next one
            tensors = []
            for tensor in _frozen_tensors(block):
                master = tensor.data.detach().to("cpu")
                if pin:
                    master = master.pin_memory()
                tensors.append((tensor, master))
            entry = _Swapped(block, tensors, on_device=True)
            self.swapped.append(entry)
            self._evict(entry)
        if pin:
            self.stream = torch.cuda.Stream(self.device)
        for position, entry in enumerate(self.swapped):
            self.handles.append(
                entry.block.register_forward_pre_hook(self._before(position), with_kwargs=True)
            )
            self.handles.append(entry.block.register_forward_hook(self._after(position), with_kwargs=True))
        self.handles.append(self.model.register_forward_pre_hook(lambda *_: self.evict_all()))
        return self

    def detach(self, *, to_device: bool = True) -> None:
        """Remove the hooks; the swapped blocks' weights come back to the device, or with `to_device=False`
        stay in CPU memory (to swap again with another count without the whole model on the device)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for entry in self.swapped:
            if to_device:
                self._bring(entry)
            self._wait(entry)
        self.swapped.clear()

    def evict_all(self) -> None:
        """Send every swapped block to the CPU (the start of a forward: nothing of the last step is left)."""
        self.backward = False
        for entry in self.swapped:
            self._evict(entry)

    # --- hooks ---------------------------------------------------------------------------------------------

    def _before(self, position: int):
        def hook(_module, args, kwargs):
            entry = self.swapped[position]
            self._bring(entry)
            self._wait(entry)
            if self.backward:  # a checkpointed block rerun in the backward: the input hook evicts it
                return args, kwargs
            if position + 1 < len(self.swapped):
                self._bring(self.swapped[position + 1])  # prefetch the next one
            if torch.is_grad_enabled():
                args, kwargs = self._evict_after_backward(entry, args, kwargs)
            return args, kwargs

        return hook

    def _after(self, position: int):
        def hook(_module, _args, _kwargs, output):
            if self.backward:
                return output  # the rerun's backward comes next; the block stays until it is done
            entry = self.swapped[position]
            self._evict(entry)
            if torch.is_grad_enabled():
                for tensor in _tensors(output):
                    if tensor.requires_grad:
                        tensor.register_hook(self._bring_for_backward(position))
            return output

        return hook

    def _bring_for_backward(self, position: int):
        def hook(grad):
            self.backward = True
            entry = self.swapped[position]
            self._bring(entry)
            self._wait(entry)
            if position > 0:
                self._bring(self.swapped[position - 1])  # backward runs the blocks in reverse
            return grad

        return hook

    def _evict_after_backward(self, entry: _Swapped, args, kwargs):
        """Wrap the block's first grad-requiring input so that its gradient evicts the block."""

        def evict(grad):
            self._evict(entry)
            return grad

        def wrap(value):
            if isinstance(value, torch.Tensor) and value.requires_grad:
                value = value.view_as(value)
                value.register_hook(evict)
                return value, True
            return value, False

        args = list(args)
        for i, value in enumerate(args):
            args[i], done = wrap(value)
            if done:
                return tuple(args), kwargs
        for key, value in kwargs.items():
            kwargs[key], done = wrap(value)
            if done:
                return tuple(args), kwargs
        return tuple(args), kwargs

    # --- moves ---------------------------------------------------------------------------------------------

    def _bring(self, entry: _Swapped) -> None:
        if entry.on_device:
            return
        entry.on_device = True
        self.moves += 1
        if self.stream is None:
            for tensor, master in entry.tensors:
                tensor.data = master.to(self.device)
            return
        with torch.cuda.stream(self.stream):
            for tensor, master in entry.tensors:
                tensor.data = master.to(self.device, non_blocking=True)
            entry.ready = torch.cuda.Event()
            entry.ready.record(self.stream)

    def _wait(self, entry: _Swapped) -> None:
        if entry.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(entry.ready)
            for tensor, _ in entry.tensors:  # the copies were made on the side stream
                tensor.data.record_stream(torch.cuda.current_stream(self.device))
            entry.ready = None

    def _evict(self, entry: _Swapped) -> None:
        if not entry.on_device:
            return
        self._wait(entry)
        entry.on_device = False
        for tensor, master in entry.tensors:
            tensor.data = master


def _frozen_tensors(block: torch.nn.Module) -> list[torch.Tensor]:
    """The block's frozen parameters and buffers, except bitsandbytes 4-bit weights (they stay put)."""
    out = []
    for param in block.parameters():
        if param.requires_grad or type(param).__name__ == "Params4bit":
            continue
        out.append(param)
    out += list(block.buffers())
    return out


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensors(item)
