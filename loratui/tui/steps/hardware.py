"""Step 1: the GPUs NVML reports (live memory bars, utilization, temperature) and which one to use."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.widgets import Button, ListItem, ListView, Static

from loratui.gpu.nvml import GpuSnapshot, SystemSnapshot
from loratui.tui.messages import DemoRequested, GpuChosen
from loratui.tui.steps.base import WizardStep
from loratui.tui.widgets.gpu_card import GpuCard
from loratui.tui.wizard_state import GpuChoice
from loratui.util.sizes import format_bytes

GIB = 1024**3
CARD_SIZES = (8, 12, 16, 24, 48, 80)  # hypothetical cards offered on machines without a GPU
DEMO_LABEL = "Try the demo: train a LoRA on a small bundled model (CPU, about a minute)"
IMAGE_DEMO_LABEL = "Try the image demo: teach a small bundled picture model a star (CPU, about a minute)"


def usable_bytes(gpu: GpuSnapshot) -> int | None:
    """Memory a new job can use on this GPU now (free memory)."""
    return gpu.memory_free


def hardware_summary(snap: SystemSnapshot) -> str:
    """Plain sentences about the machine's GPUs."""
    if not snap.available:
        return (
            f"No NVIDIA GPU available ({snap.reason}). Training would run on the CPU: fine for the tiny "
            "demo model, far too slow for real models. To plan settings for a GPU machine you will rent, "
            "pick a card size below."
        )
    count = len(snap.gpus)
    versions = f"driver {snap.driver_version or '?'}, CUDA {snap.cuda_driver_version or '?'}"
    lines = [f"Found {count} NVIDIA GPU{'s' if count != 1 else ''} ({versions})."]
    best = max(snap.gpus, key=lambda g: g.memory_free or 0)
    if count > 1:
        lines.append(
            f"GPU {best.index} ({best.name}) has the most free memory: {format_bytes(best.memory_free, short=True)}."
        )
    for gpu in snap.gpus:
        if gpu.memory_used_by_others:
            lines.append(
                f"GPU {gpu.index} is shared: other processes hold {format_bytes(gpu.memory_used_by_others, short=True)}."
            )
    return " ".join(lines)


def default_choice(snap: SystemSnapshot) -> GpuChoice:
    """The GPU with the most free memory, or the CPU."""
    if not snap.available or not snap.gpus:
        return GpuChoice(None, "CPU", None, None)
    best = max(snap.gpus, key=lambda g: g.memory_free or 0)
    return GpuChoice(best.index, best.name, best.memory_total, usable_bytes(best))


class HardwareStep(WizardStep):
    """GPU cards from the app's telemetry (`app.gpu`); Enter on a card chooses it."""

    STEP_TITLE = "Hardware: which GPU to train on"

    def __init__(self, state, **kwargs) -> None:
        super().__init__(state, **kwargs)
        self._layout: tuple[int, ...] | None = None  # GPU indexes the list was built for

    def compose(self) -> ComposeResult:
        yield self.heading()
        yield self.summary()
        yield ListView(id="gpu-list")
        yield Static("", markup=False, id="chosen")
        yield Button(DEMO_LABEL, id="try-demo", compact=True)
        yield Button(IMAGE_DEMO_LABEL, id="try-image-demo", compact=True)

    def on_mount(self) -> None:
        self.watch(self.app, "gpu", self._telemetry)

    def enter(self) -> None:
        self._show_choice()

    def _telemetry(self, snap: SystemSnapshot | None) -> None:
        if snap is None:
            self.say("Reading the GPUs…")
            return
        self.say(hardware_summary(snap))
        layout = tuple(g.index for g in snap.gpus) if snap.available else ()
        if layout != self._layout or not self.query(ListItem):
            self._layout = layout
            self._rebuild(snap)
        else:
            for gpu in snap.gpus:
                self.query_one(f"#gpu-card-{gpu.index}", GpuCard).gpu = gpu
        if self.state.gpu is None:
            self.post_message(GpuChosen(default_choice(snap)))

    def _rebuild(self, snap: SystemSnapshot) -> None:
        listing = self.query_one(ListView)
        listing.clear()
        items: list[ListItem] = []
        if snap.available:
            for gpu in snap.gpus:
                items.append(ListItem(GpuCard(gpu, id=f"gpu-card-{gpu.index}"), id=f"gpu-{gpu.index}"))
            items.append(ListItem(Static("CPU only (slow: for the tiny demo model)", markup=False), id="cpu"))
        else:
            items.append(ListItem(Static("CPU only (this machine)", markup=False), id="cpu"))
            for size in CARD_SIZES:
                label = f"Plan for a {size} GB card (train on a GPU machine later)"
                items.append(ListItem(Static(label, markup=False), id=f"card-{size}"))
        listing.extend(items)
        self.call_after_refresh(self._highlight_choice)

    def _highlight_choice(self) -> None:
        """Put the list cursor on the chosen item."""
        choice = self.state.gpu
        if choice is None:
            return
        wanted = f"gpu-{choice.index}" if choice.index is not None else "cpu"
        if choice.index is None and choice.total_bytes:
            wanted = f"card-{choice.total_bytes // GIB}"
        listing = self.query_one(ListView)
        for position, item in enumerate(listing.children):
            if item.id == wanted:
                listing.index = position

    def choice_for(self, item_id: str) -> GpuChoice:
        """The `GpuChoice` a list item stands for."""
        snap = self.app.gpu
        if item_id.startswith("gpu-") and snap is not None:
            index = int(item_id.removeprefix("gpu-"))
            gpu = next((g for g in snap.gpus if g.index == index), None)
            if gpu is not None:
                return GpuChoice(gpu.index, gpu.name, gpu.memory_total, usable_bytes(gpu))
        if item_id.startswith("card-"):
            size = int(item_id.removeprefix("card-")) * GIB
            return GpuChoice(None, f"{item_id.removeprefix('card-')} GB card (planned)", size, size)
        return GpuChoice(None, "CPU", None, None)

    @on(ListView.Selected)
    def _selected(self, event: ListView.Selected) -> None:
        event.stop()
        if event.item.id:
            self.post_message(GpuChosen(self.choice_for(event.item.id)))

    @on(Button.Pressed, "#try-demo, #try-image-demo")
    def _try_demo(self, event: Button.Pressed) -> None:
        event.stop()
        for button in self.query(Button):
            if button.id in ("try-demo", "try-image-demo"):
                button.disabled = True
        self.post_message(DemoRequested("image" if event.button.id == "try-image-demo" else "text"))

    def state_changed(self, key: str) -> None:
        if key == "gpu":
            self._show_choice()
            self._highlight_choice()

    def _show_choice(self) -> None:
        choice = self.state.gpu
        if choice is None:
            text = "Nothing chosen yet."
        elif choice.index is not None:
            text = f"Chosen: GPU {choice.index} ({choice.name}), {format_bytes(choice.usable_bytes, short=True)} usable now."
        elif choice.total_bytes:
            text = f"Chosen: plan for a {choice.name}; training here runs on the CPU."
        else:
            text = "Chosen: CPU only."
        self.query_one("#chosen", Static).update(text + "  ↑/↓ Enter: choose · Ctrl+N: next step")
