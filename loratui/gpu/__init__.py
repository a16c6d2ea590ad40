"""GPU inspection through NVML: lazy, never raises to callers, typed snapshots.

"No driver" and "no GPU" are normal states (`SystemSnapshot.available is False`), not errors.
"""

from loratui.gpu.nvml import GpuProcess, GpuSnapshot, SystemSnapshot, snapshot

__all__ = ["GpuProcess", "GpuSnapshot", "SystemSnapshot", "snapshot"]
