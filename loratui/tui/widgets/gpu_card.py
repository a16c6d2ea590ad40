"""One GPU: name, utilization, temperature, and a memory bar of what others use vs what is free."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.reactive import reactive
from textual.widget import Widget
from textual.widgets import Static

from loratui.gpu.nvml import GpuSnapshot
from loratui.tui.widgets.memory_bar import MemoryBar
from loratui.util.sizes import format_bytes


def gpu_title(gpu: GpuSnapshot) -> str:
    """'GPU 0  NVIDIA GeForce RTX 4090   util 37%  61°C'."""
    util = f"util {gpu.utilization_gpu}%" if gpu.utilization_gpu is not None else "util -"
    temp = f"{gpu.temperature}°C" if gpu.temperature is not None else "temp -"
    return f"GPU {gpu.index}  {gpu.name}   {util}  {temp}"


def memory_segments(gpu: GpuSnapshot) -> tuple[tuple[int, str], ...]:
    """(bytes, kind): memory held by other processes, the rest of the used memory (driver, unlisted)."""
    used = gpu.memory_used or 0
    others = min(used, gpu.memory_used_by_others or 0)
    return ((others, "others"), (max(0, used - others), "used"))


def memory_line(gpu: GpuSnapshot) -> str:
    """Legend of the bar: '█ other processes 5.0 GiB · ▓ other 1.0 GiB · ░ free 17.5 of 24.0 GiB'."""
    if gpu.memory_total is None:
        return "memory not reported by the driver"
    parts = []
    others = gpu.memory_used_by_others or 0
    rest = max(0, (gpu.memory_used or 0) - others)
    if others:
        parts.append(f"█ other processes {format_bytes(others, short=True)}")
    if rest:
        parts.append(f"▓ {'other' if others else 'used'} {format_bytes(rest, short=True)}")
    free, total = format_bytes(gpu.memory_free, short=True), format_bytes(gpu.memory_total, short=True)
    if free.endswith(" GiB") and total.endswith(" GiB"):
        free = free.removesuffix(" GiB")
    parts.append(f"░ free {free} of {total}")
    return " · ".join(parts)


class GpuCard(Widget):
    """Three lines for one GPU; `gpu` is replaced with every telemetry snapshot."""

    gpu: reactive[GpuSnapshot | None] = reactive(None)

    def __init__(self, gpu: GpuSnapshot, **kwargs) -> None:
        super().__init__(**kwargs)
        self.set_reactive(GpuCard.gpu, gpu)

    def compose(self) -> ComposeResult:
        yield Static(markup=False, classes="gpu-card--title")
        yield MemoryBar()
        yield Static(markup=False, classes="gpu-card--memory")

    def on_mount(self) -> None:
        self._ready = True
        self.watch_gpu(self.gpu)

    def watch_gpu(self, gpu: GpuSnapshot | None) -> None:
        if gpu is None or not getattr(self, "_ready", False):
            return
        self.query_one(".gpu-card--title", Static).update(gpu_title(gpu))
        bar = self.query_one(MemoryBar)
        bar.total = gpu.memory_total
        bar.segments = memory_segments(gpu)
        self.query_one(".gpu-card--memory", Static).update(memory_line(gpu))
