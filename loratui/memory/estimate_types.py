"""The result of a memory prediction (`Estimate`) and the CUDA overheads every prediction adds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MIB = 2**20


CUDA_CONTEXT = 450 * MIB  # torch 2.x / CUDA 12-13 context (memory.md: 0.3-0.6 GB, 426 MiB measured)


WORKSPACE = {"llm": 64 * MIB, "sd": 256 * MIB}  # cuBLAS/cuBLASLt handles; cuDNN convolution workspaces


FRAGMENTATION = 0.10  # caching-allocator reserve over live tensors, as a share of the per-step memory


NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit values + 8-bit block absmax + fp32 second-level absmax


BAND = {"cpu": 0.05, "meta": 0.10, "analytic": 0.35}


CUDA_EXTRA_BAND = 0.05  # context/workspace/fragmentation are not measured on a GPU here


@dataclass
class Estimate:
    """A predicted peak with its parts (they sum to `total_bytes`)."""

    total_bytes: int
    breakdown: dict[str, int]
    method: str
    error_band: float
    notes: list[str] = field(default_factory=list)
    phase: str = ""  # what the peak happens in: micro-batch, optimizer step, VAE encoding, ...
    device: str = "cuda"

    @property
    def low_bytes(self) -> int:
        return int(self.total_bytes * (1 - self.error_band))

    @property
    def high_bytes(self) -> int:
        return int(self.total_bytes * (1 + self.error_band))

    def to_dict(self) -> dict[str, Any]:
        from loratui.util.sizes import format_bytes

        return {
            "total_bytes": self.total_bytes,
            "total": format_bytes(self.total_bytes),
            "breakdown": dict(self.breakdown),
            "method": self.method,
            "error_band": self.error_band,
            "phase": self.phase,
            "device": self.device,
            "notes": list(self.notes),
        }


def cuda_overheads(kind: str, dynamic: int, static: int) -> dict[str, int]:
    return {
        "cuda_context": CUDA_CONTEXT,
        "workspace": WORKSPACE[kind],
        "fragmentation": int(FRAGMENTATION * dynamic + 0.01 * static),
    }


def _band(source: str, residual: float, device: str) -> float:
    band = max(BAND[source], round(residual + 0.03, 3))
    return round(band + (CUDA_EXTRA_BAND if device == "cuda" else 0.0), 3)
