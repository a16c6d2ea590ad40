"""Numbers of a run: step, epoch, loss, learning rate, speed, ETA, VRAM (used vs predicted vs card), GPU."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.reactive import reactive
from textual.widget import Widget
from textual.widgets import Static

from loratui.gpu.nvml import GpuSnapshot
from loratui.tui.formatting import fmt_number
from loratui.tui.run_model import RunView
from loratui.tui.widgets.memory_bar import MemoryBar
from loratui.util.sizes import format_bytes


def stats_lines(view: RunView) -> list[tuple[str, str]]:
    """(label, value) rows shown above the VRAM bar."""
    total = f"/{view.total_steps}" if view.total_steps else ""
    epochs = f"/{view.total_epochs}" if view.total_epochs else ""
    speed = f"{view.samples_per_s:.2f} samples/s" if view.samples_per_s is not None else "-"
    rows = [
        ("step", f"{view.step}{total}" + (f" · epoch {view.epoch}{epochs}" if view.epoch else "")),
        (
            "loss",
            f"{fmt_number(view.loss, 3)} (smooth {fmt_number(view.smoothed_loss, 3)})"
            if view.loss is not None
            else "-",
        ),
        ("lr", fmt_number(view.lr) if view.lr is not None else "-"),
        ("speed", speed),
        ("checkpoint", _short(view.checkpoint) if view.checkpoint else "none yet"),
    ]
    if len(view.rank_memory) > 1:  # one run on several processes: each one's memory, in rank order
        rows.append(rank_memory_row(view))
    if view.ooms:
        last = view.ooms[-1]
        rows.append(("OOM", f"{len(view.ooms)}× {last.short_change}"))
    if view.samples:
        rows.append(("sample", _short(view.samples[-1])))
    return rows


def rank_memory_row(view: RunView) -> tuple[str, str]:
    """('per GPU', '0: 3.1 GiB · 1: 3.0 GiB') for a run on several processes."""
    label = "per GPU" if view.rank_memory_kind == "gpu" else "per proc"
    return label, " · ".join(
        f"{rank}: {format_bytes(value, short=True)}" for rank, value in enumerate(view.rank_memory)
    )


def _short(path: str) -> str:
    """The last two parts of a path (the run folder is known)."""
    parts = path.replace("\\", "/").rstrip("/").split("/")
    return "/".join(parts[-2:])


def vram_lines(view: RunView, gpu: GpuSnapshot | None) -> list[tuple[str, str]]:
    """(label, value) rows under the VRAM bar: run memory vs prediction vs card, GPU load."""
    predicted = f" · pred {format_bytes(view.memory_predicted, short=True)}" if view.memory_predicted else ""
    if gpu is None:
        device = view.device or "no GPU reported"
        return [("vram", f"{format_bytes(view.memory_used, short=True)}{predicted}"), ("device", device)]
    util = f"{gpu.utilization_gpu}%" if gpu.utilization_gpu is not None else "-"
    temp = f"{gpu.temperature}°C" if gpu.temperature is not None else "-"
    return [
        (
            "vram",
            f"{format_bytes(view.memory_used, short=True)} of {format_bytes(gpu.memory_total, short=True)}{predicted}",
        ),
        (f"gpu {gpu.index}", f"util {util} · {temp}"),
    ]


class RunStats(Widget):
    """The numbers panel. `view` and `gpu` are set by the training screen."""

    COMPONENT_CLASSES = {"run-stats--label", "run-stats--value", "run-stats--warning"}

    view: reactive[RunView | None] = reactive(None)
    gpu: reactive[GpuSnapshot | None] = reactive(None)

    def compose(self) -> ComposeResult:
        yield Static(id="numbers")
        yield MemoryBar()
        yield Static(id="vram")

    def on_mount(self) -> None:
        self.border_title = "progress"

    def watch_view(self) -> None:
        self._refresh()

    def watch_gpu(self) -> None:
        self._refresh()

    def _refresh(self) -> None:
        view = self.view
        if view is None or not self.is_mounted:
            return
        gpu = self.gpu
        self.query_one("#numbers", Static).update(self._rows(stats_lines(view)))
        bar = self.query_one(MemoryBar)
        if gpu is not None and gpu.memory_total:
            own = view.memory_used or 0
            others = max(0, (gpu.memory_used or 0) - own) if view.state == "running" else 0
            bar.total = gpu.memory_total
            bar.segments = ((others, "others"), (own, "own"))
            bar.marker = others + view.memory_predicted if view.memory_predicted else None
        else:
            bar.total = None
        self.query_one("#vram", Static).update(self._rows(vram_lines(view, gpu)))

    def _rows(self, rows: list[tuple[str, str]]) -> Text:
        label_style = self.get_component_rich_style("run-stats--label")
        warn_style = self.get_component_rich_style("run-stats--warning")
        text = Text(no_wrap=True, overflow="ellipsis")
        for index, (label, value) in enumerate(rows):
            if index:
                text.append("\n")
            text.append(f"{label:<10} ", label_style)
            text.append(value, warn_style if label == "OOM" else "")
        return text
