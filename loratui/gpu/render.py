"""Human and JSON renderings of a `SystemSnapshot` (rich, imported lazily)."""

from __future__ import annotations

import json

from loratui.gpu.nvml import GpuSnapshot, SystemSnapshot
from loratui.util.sizes import format_bytes


def _opt(value: object, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def no_gpu_line(snap: SystemSnapshot) -> str:
    """The one line printed on a machine without a usable NVIDIA GPU."""
    return f"No NVIDIA GPU available ({snap.reason}); loratui will run on the CPU."


def gpu_table(snap: SystemSnapshot):
    """A rich Table of the GPUs."""
    from rich.table import Table

    title = f"NVIDIA driver {snap.driver_version or '?'} · CUDA {snap.cuda_driver_version or '?'}"
    table = Table(title=title, title_justify="left")
    for column in ("#", "name", "memory used / total", "free", "util", "temp", "power", "processes"):
        table.add_column(column, justify="right" if column in ("#", "free", "util", "temp") else "left")
    for gpu in snap.gpus:
        table.add_row(
            str(gpu.index),
            gpu.name,
            f"{format_bytes(gpu.memory_used, short=True)} / {format_bytes(gpu.memory_total, short=True)}",
            format_bytes(gpu.memory_free, short=True),
            _opt(gpu.utilization_gpu, "{}%"),
            _opt(gpu.temperature, "{}°C"),
            _power(gpu),
            _processes(gpu),
        )
    return table


def _power(gpu: GpuSnapshot) -> str:
    if gpu.power_draw is None:
        return "-"
    limit = f" / {gpu.power_limit:.0f} W" if gpu.power_limit is not None else " W"
    return f"{gpu.power_draw:.0f}{limit}"


def _processes(gpu: GpuSnapshot) -> str:
    if not gpu.processes:
        return "none"
    parts = [f"{p.pid} {p.name or '?'} ({format_bytes(p.used_memory, short=True)})" for p in gpu.processes]
    return "; ".join(parts)


def snapshot_json(snap: SystemSnapshot) -> str:
    """Machine-readable output (bytes, watts, °C)."""
    return json.dumps(snap.to_dict(), indent=2)
