"""Human and JSON renderings of a `SystemSnapshot` (rich, imported lazily)."""

from __future__ import annotations

import json

from loratui.gpu.nvml import GpuSnapshot, SystemSnapshot


def human_bytes(value: int | None) -> str:
    """1536 MiB -> '1.5 GiB'; None -> '-'."""
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit not in ("B", "KiB") else f"{size:.0f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


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
            f"{human_bytes(gpu.memory_used)} / {human_bytes(gpu.memory_total)}",
            human_bytes(gpu.memory_free),
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
    parts = [f"{p.pid} {p.name or '?'} ({human_bytes(p.used_memory)})" for p in gpu.processes]
    return "; ".join(parts)


def snapshot_json(snap: SystemSnapshot) -> str:
    """Machine-readable output (bytes, watts, °C)."""
    return json.dumps(snap.to_dict(), indent=2)
