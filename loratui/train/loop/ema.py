"""Exponential moving average (EMA) of the trained adapter weights.

    ema = LoraEMA(named_params, decay=0.999, update_every=1, on_cpu=False)
    ...  # after each optimizer step:
    ema.update(step)                 # every `update_every`-th step: shadow = decay * shadow + (1 - decay) * weight
    with ema.applied():              # the live parameters hold the EMA weights inside the block
        render_samples(...)

The shadow copy is fp32 (on the parameters' device, or in CPU memory with `on_cpu`), starts equal to the
weights it is created from, and is saved and restored exactly (`state_dict` / `load_state_dict`, tensors by the
same names as the adapter's checkpoint tensors, so an exporter reads it like `lora.safetensors`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


class LoraEMA:
    """An fp32 EMA copy of named parameters, updated every `update_every` optimizer steps."""

    def __init__(
        self,
        params: dict[str, torch.nn.Parameter],
        decay: float,
        *,
        update_every: int = 1,
        on_cpu: bool = False,
    ):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be between 0 and 1 (e.g. 0.999), not {decay}")
        self.params = params
        self.decay = float(decay)
        self.update_every = max(1, int(update_every))
        self.on_cpu = on_cpu
        self.updates = 0
        self.shadow = {name: self._copy(param) for name, param in params.items()}

    def _copy(self, param: torch.Tensor) -> torch.Tensor:
        device = torch.device("cpu") if self.on_cpu else param.device
        return param.detach().to(device=device, dtype=torch.float32, copy=True)

    @torch.no_grad()
    def reset(self) -> None:
        """Start over from the parameters' current values."""
        self.updates = 0
        for name, param in self.params.items():
            self.shadow[name].copy_(param.detach().float())

    @torch.no_grad()
    def update(self, step: int) -> bool:
        """After optimizer step `step` (1-based): fold the weights in when `step` is a multiple of
        `update_every`; True when it did."""
        if step % self.update_every:
            return False
        for name, param in self.params.items():
            shadow = self.shadow[name]
            shadow.mul_(self.decay).add_(
                param.detach().to(shadow.device, torch.float32), alpha=1 - self.decay
            )
        self.updates += 1
        return True

    def weights(self) -> dict[str, torch.Tensor]:
        """The EMA tensors by name (CPU fp32 copies)."""
        return {name: tensor.detach().cpu().clone() for name, tensor in self.shadow.items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "update_every": self.update_every,
            "updates": self.updates,
            "shadow": self.weights(),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Undo `state_dict()`; every tensor must be present with the same shape."""
        saved = state["shadow"]
        missing = sorted(set(self.shadow) - set(saved))
        if missing:
            raise KeyError(f"the saved EMA weights lack {len(missing)} tensor(s), e.g. {missing[0]}")
        for name, tensor in self.shadow.items():
            if saved[name].shape != tensor.shape:
                raise ValueError(
                    f"the saved EMA tensor {name} has shape {tuple(saved[name].shape)}, this run's is "
                    f"{tuple(tensor.shape)}"
                )
            tensor.copy_(saved[name])
        self.updates = int(state.get("updates", 0))

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Inside the block the parameters hold the EMA weights; the trained weights come back after it."""
        backup = {name: param.detach().clone() for name, param in self.params.items()}
        try:
            with torch.no_grad():
                for name, param in self.params.items():
                    param.copy_(self.shadow[name].to(param.device, param.dtype))
            yield
        finally:
            with torch.no_grad():
                for name, param in self.params.items():
                    param.copy_(backup[name])

    def move_to(self, device: str | torch.device) -> None:
        """Keep the shadow copy on `device` from now on (the OOM ladder moves it to CPU memory)."""
        self.on_cpu = torch.device(device).type == "cpu"
        self.shadow = {name: tensor.to(device) for name, tensor in self.shadow.items()}

    def nbytes(self) -> int:
        """Bytes the shadow copy holds."""
        return sum(t.numel() * t.element_size() for t in self.shadow.values())
