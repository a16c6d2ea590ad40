"""`MemoryMeter`: live tensor bytes during real training steps, on any device, with a simulated card.

A `TorchDispatchMode` sees every tensor an operator returns. Each untyped storage is counted once (keyed by
its data pointer; on the meta device, which has none, by the storage object) with its `nbytes`, and released by
a weak-reference callback when the storage dies. Storages are put into categories:

- ``weights``: frozen parameters (with a 4-bit weight's quantisation state) and buffers registered with
  `register_model`;
- ``lora``: trainable parameters registered with `register_model`;
- ``gradients``: `.grad` of registered trainable parameters (post-accumulate-grad hooks);
- ``optimizer``: optimizer state, and anything allocated while `optimizer.step()` runs;
- ``activations``: everything else allocated inside the meter (activations and temporaries).

With `budget_bytes` the meter behaves like a card of that size: an operator whose result would take the live
total over the budget raises a real `torch.OutOfMemoryError` instead of returning.

Only tensors seen by the meter (allocated inside it, or registered) count; kernel-internal workspaces, the
CUDA context and allocator fragmentation are outside its view (the estimator adds them for GPUs).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from loratui.util.sizes import format_bytes, parse_size

CATEGORIES = ("weights", "lora", "gradients", "optimizer", "activations")
ENV_SIMULATE = "LORATUI_SIMULATE_VRAM"


def simulated_out_of_memory(requested: int, live: int, budget: int) -> torch.OutOfMemoryError:
    """A `torch.OutOfMemoryError` worded like PyTorch's CUDA message, for a simulated card."""
    return torch.OutOfMemoryError(
        f"out of memory (simulated card of {format_bytes(budget)}): tried to allocate {format_bytes(requested)}; "
        f"{format_bytes(live)} already in use, {format_bytes(max(0, budget - live))} free"
    )


def simulated_budget_from_env_or_config(cfg: Any = None) -> int | None:
    """Budget in bytes from the config key `simulate_vram`, else `$LORATUI_SIMULATE_VRAM`, else None.

    `cfg` may be a `TrainConfig`, a `ResolvedConfig`, a mapping, or None.
    """
    value = None
    if cfg is not None:
        inner = getattr(cfg, "config", cfg)
        value = (
            inner.get("simulate_vram") if isinstance(inner, dict) else getattr(inner, "simulate_vram", None)
        )
    if not value:
        value = os.environ.get(ENV_SIMULATE) or None
    return parse_size(value) if value else None


def quant_state_tensors(param: torch.Tensor) -> list[torch.Tensor]:
    """The tensors a 4-bit weight keeps beside its packed values (bitsandbytes' `quant_state`: block absmax,
    code, offset and, with double quantisation, the second level's absmax and code); empty for other weights."""
    found: list[torch.Tensor] = []
    state = getattr(param, "quant_state", None)
    while state is not None and len(found) < 16:
        found += [v for v in vars(state).values() if isinstance(v, torch.Tensor)]
        state = getattr(state, "state2", None)
    return found


class MemoryMeter(TorchDispatchMode):
    """Count live tensor bytes (peak and breakdown by category) while active; optional simulated budget.

    Use as a context manager around training steps (it may be entered many times)::

        meter = MemoryMeter(budget_bytes=3 * 2**30)
        meter.register_model(model)
        meter.register_optimizer(optimizer)
        with meter:
            loss = model(batch).loss
            loss.backward()
            optimizer.step()
        meter.peak_bytes, meter.breakdown()

    `device` limits counting to tensors of one device type ("cuda", "cpu", "meta"); None counts all.
    `record=True` keeps (activations, gradients, operator) after every allocation in `timeline` (used to fit
    where the peak of a step occurs).
    """

    def __init__(self, budget_bytes: int | None = None, *, device: str | None = None, record: bool = False):
        super().__init__()
        self.timeline: list[tuple[int, int, str]] | None = [] if record else None
        self._op = "register"
        self.budget_bytes = int(budget_bytes) if budget_bytes else None
        self.device_type = torch.device(device).type if device else None
        self._lock = threading.RLock()
        self._entries: dict[int, list[Any]] = {}  # key -> [nbytes, category, weakref]
        self._by_category = dict.fromkeys(CATEGORIES, 0)
        self._peak_by_category = dict(self._by_category)
        self._max_by_category = dict(self._by_category)
        self._phase = "activations"
        self._hooks: list[Any] = []
        self._optimizers: list[Any] = []
        self.live_bytes = 0
        self.peak_bytes = 0
        self.ops = 0

    # --- public API ------------------------------------------------------------------------------------

    def breakdown(self, at: str = "peak") -> dict[str, int]:
        """Bytes per category at the peak (`at="peak"`) or now (`at="live"`)."""
        with self._lock:
            return dict(self._peak_by_category if at == "peak" else self._by_category)

    def category_peaks(self) -> dict[str, int]:
        """The highest value each category reached on its own (not necessarily at the same moment)."""
        with self._lock:
            return dict(self._max_by_category)

    def reset_peak(self) -> None:
        """Start a new peak measurement from the bytes live now."""
        with self._lock:
            self.peak_bytes = self.live_bytes
            self._peak_by_category = dict(self._by_category)
            self._max_by_category = dict(self._by_category)
            if self.timeline is not None:
                self.timeline.clear()

    def register(self, tensors: Iterable[torch.Tensor], category: str) -> None:
        """Count already-existing tensors (e.g. loaded weights) under `category`."""
        if category not in CATEGORIES:
            raise ValueError(f"unknown category {category!r}; one of {', '.join(CATEGORIES)}")
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                self._track(tensor, category, recategorise=True)

    def register_model(self, model: torch.nn.Module) -> None:
        """Count a model's parameters (frozen: weights, trainable: lora) and buffers; watch its gradients."""
        trainable = [p for p in model.parameters() if p.requires_grad]
        frozen = [p for p in model.parameters() if not p.requires_grad]
        self.register(frozen, "weights")
        self.register([t for p in frozen for t in quant_state_tensors(p)], "weights")
        self.register(list(model.buffers()), "weights")
        self.register(trainable, "lora")
        self.watch_gradients(trainable)

    def watch_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Categorise the `.grad` of these parameters as gradients as soon as backward accumulates it."""
        for param in params:
            if param.grad is not None:
                self._track(param.grad, "gradients", recategorise=True)
            self._hooks.append(param.register_post_accumulate_grad_hook(self._grad_hook))

    def register_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Count optimizer state (now and as `step()` creates it); allocations inside `step()` are optimizer.

        A wrapper holding the real optimizer in `.optimizer` (accelerate's `AcceleratedOptimizer`) is unwrapped."""
        inner = getattr(optimizer, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer):
            optimizer = inner
        self._optimizers.append(weakref.ref(optimizer))
        self._register_state(optimizer)
        self._hooks.append(optimizer.register_step_pre_hook(self._step_pre_hook))
        self._hooks.append(optimizer.register_step_post_hook(self._step_post_hook))

    def close(self) -> None:
        """Remove hooks and forget every storage (the meter holds no tensors, only weak references)."""
        for handle in self._hooks:
            handle.remove()
        with self._lock:
            self._hooks.clear()
            self._entries.clear()
            self._by_category = dict.fromkeys(CATEGORIES, 0)
            self._max_by_category = dict(self._by_category)
            self.live_bytes = 0

    def summary(self) -> str:
        """One line: peak and its breakdown."""
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.breakdown().items() if v)
        return f"peak {format_bytes(self.peak_bytes)} ({parts})"

    # --- dispatch ----------------------------------------------------------------------------------------

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        """No torch.compile frames run inside the meter: skip the per-call dynamo guard wrapper (overhead)."""
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        if self.timeline is not None:
            self._op = func.__name__
        with torch._C.DisableTorchFunction():
            self._track_output(out)
        return out

    def _track_output(self, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            self._track(out, self._phase)
        elif isinstance(out, tuple | list):
            for item in out:
                if isinstance(item, torch.Tensor):
                    self._track(item, self._phase)
                elif isinstance(item, tuple | list):
                    for inner in item:
                        if isinstance(inner, torch.Tensor):
                            self._track(inner, self._phase)

    # --- bookkeeping --------------------------------------------------------------------------------------

    def _track(self, tensor: torch.Tensor, category: str, *, recategorise: bool = False) -> None:
        if hasattr(tensor, "to_local"):  # an FSDP shard (DTensor): this process holds its local part
            tensor = tensor.to_local()
        if self.device_type is not None and tensor.device.type != self.device_type:
            return
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
            return
        nbytes = storage.nbytes()
        if not nbytes:
            return
        key = storage.data_ptr() or storage._cdata
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                if entry[2]() is not storage:  # a dead storage's address reused before its callback ran
                    self._forget(key)
                    entry = None
                else:
                    if entry[0] != nbytes:  # resized in place
                        self._add(entry[1], nbytes - entry[0])
                        entry[0] = nbytes
                    if recategorise and entry[1] != category:
                        self._move(entry, category)
                    return
            self._check_budget(nbytes)
            ref = weakref.ref(storage, self._make_release(key))
            self._entries[key] = [nbytes, category, ref]
            self._add(category, nbytes)

    def _check_budget(self, nbytes: int) -> None:
        if self.budget_bytes is not None and self.live_bytes + nbytes > self.budget_bytes:
            raise simulated_out_of_memory(nbytes, self.live_bytes, self.budget_bytes)

    def _add(self, category: str, delta: int) -> None:
        value = self._by_category[category] + delta
        self._by_category[category] = value
        if value > self._max_by_category[category]:
            self._max_by_category[category] = value
        self.live_bytes += delta
        if self.timeline is not None and delta > 0:
            self.timeline.append((self._by_category["activations"], self._by_category["gradients"], self._op))
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes
            self._peak_by_category = dict(self._by_category)

    def _move(self, entry: list[Any], category: str) -> None:
        self._by_category[entry[1]] -= entry[0]
        value = self._by_category[category] + entry[0]
        self._by_category[category] = value
        self._max_by_category[category] = max(self._max_by_category[category], value)
        entry[1] = category

    def _forget(self, key: int) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._by_category[entry[1]] -= entry[0]
            self.live_bytes -= entry[0]

    def _make_release(self, key: int):
        meter_ref = weakref.ref(self)

        def release(ref: weakref.ref) -> None:
            meter = meter_ref()
            if meter is None:
                return
            with meter._lock:
                entry = meter._entries.get(key)
                if entry is not None and entry[2] is ref:
                    meter._forget(key)

        return release

    def _grad_hook(self, param: torch.Tensor) -> None:
        if param.grad is not None:
            self._track(param.grad, "gradients", recategorise=True)

    def _register_state(self, optimizer: torch.optim.Optimizer) -> None:
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    self._track(value, "optimizer", recategorise=True)

    def _step_pre_hook(self, optimizer, args, kwargs) -> None:
        self._phase = "optimizer"

    def _step_post_hook(self, optimizer, args, kwargs) -> None:
        self._phase = "activations"
        self._register_state(optimizer)
