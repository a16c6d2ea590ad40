"""A one-line memory bar: coloured segments over a card's total, an optional marker, free space after."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

# Segment kinds and the character drawn for each (characters differ so the bar reads without colour).
SEGMENT_CHARS = {"others": "█", "used": "▓", "own": "█", "predicted": "▒", "over": "!"}


class MemoryBar(Widget):
    """Memory of one card: `segments` (bytes, kind) from the left, free space (░) to `total`.

    `marker` draws a │ at a byte position (e.g. the predicted peak over what is used now). A segment
    that runs past the card's end is cut and the bar ends with `!` cells in the "over" style.
    """

    COMPONENT_CLASSES = {
        "memory-bar--others",
        "memory-bar--used",
        "memory-bar--own",
        "memory-bar--predicted",
        "memory-bar--over",
        "memory-bar--free",
        "memory-bar--marker",
    }

    total: reactive[int | None] = reactive(None)
    segments: reactive[tuple[tuple[int, str], ...]] = reactive(())
    marker: reactive[int | None] = reactive(None)

    def render(self) -> Text:
        width = max(1, self.size.width)
        total = self.total
        if not total:
            return Text("░" * width, style=self.get_component_rich_style("memory-bar--free"))
        cells: list[str] = []
        position = 0
        overflow = False
        for size, kind in self.segments:
            if size <= 0:
                continue
            start = position
            position += size
            first = round(start / total * width)
            last = min(width, round(position / total * width))
            if size > 0 and last == first and first < width:
                last = first + 1  # a non-empty segment is at least one cell
            cells.extend([kind] * max(0, last - len(cells)))
            overflow = overflow or position > total
        cells = cells[:width]
        if overflow:
            over_cells = max(1, min(3, width // 10))
            cells = cells[: width - over_cells] + ["over"] * over_cells
        cells.extend(["free"] * (width - len(cells)))
        marker_cell = None
        if self.marker is not None and self.marker >= 0:
            marker_cell = min(width - 1, round(self.marker / total * width))
        text = Text()
        for index, kind in enumerate(cells):
            if index == marker_cell:
                text.append("│", self.get_component_rich_style("memory-bar--marker"))
                continue
            char = "░" if kind == "free" else SEGMENT_CHARS.get(kind, "█")
            text.append(char, self.get_component_rich_style(f"memory-bar--{kind}"))
        return text
