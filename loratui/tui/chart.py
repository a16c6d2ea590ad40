"""A braille line chart as plain data (no Textual): each character cell holds 2x4 dots.

`plot()` draws several series into a grid of cells; each cell records its dot bits and the index of the
last series that drew in it, so a widget can colour cells per series.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

# Bit of each dot in a braille cell, indexed [row][column] (rows top to bottom).
_DOT_BITS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))
BRAILLE_BASE = 0x2800


@dataclass
class Chart:
    """The drawn grid: `bits[row][col]` and `owner[row][col]` (series index, -1 for empty cells)."""

    width: int
    height: int
    low: float
    high: float
    bits: list[list[int]]
    owner: list[list[int]]

    def row_text(self, row: int) -> str:
        """One row of braille characters (blank braille for empty cells)."""
        return "".join(chr(BRAILLE_BASE + b) for b in self.bits[row])


def finite(values: Sequence[float]) -> list[float]:
    """The finite numbers in `values`."""
    return [v for v in values if isinstance(v, int | float) and math.isfinite(v)]


def resample(values: Sequence[float], points: int) -> list[float]:
    """Average `values` into `points` buckets (or return them as they are when there are fewer)."""
    clean = finite(values)
    if len(clean) <= points or points <= 0:
        return clean
    out = []
    for i in range(points):
        start = i * len(clean) // points
        stop = max(start + 1, (i + 1) * len(clean) // points)
        bucket = clean[start:stop]
        out.append(sum(bucket) / len(bucket))
    return out


def value_range(series: Sequence[Sequence[float]]) -> tuple[float, float]:
    """(low, high) over all series with a little padding; (0, 1) when there is nothing."""
    values = [v for s in series for v in finite(s)]
    if not values:
        return 0.0, 1.0
    low, high = min(values), max(values)
    if high - low < 1e-12:
        pad = abs(high) * 0.05 or 0.5
        return low - pad, high + pad
    pad = (high - low) * 0.04
    return low - pad, high + pad


def plot(
    series: Sequence[Sequence[float]],
    width: int,
    height: int,
    points: Sequence[tuple[float, float]] = (),
) -> Chart:
    """Draw each series as a connected line across the whole width; later series draw on top.

    `points` are (x in [0, 1] of the width, value) pairs, e.g. a loss measured every few steps: they are
    joined as one more series (index `len(series)`), drawn last, from their first x to their last."""
    width, height = max(1, width), max(1, height)
    bits = [[0] * width for _ in range(height)]
    owner = [[-1] * width for _ in range(height)]
    marks = [(x, v) for x, v in points if finite([x, v]) == [x, v]]
    low, high = value_range([*series, [v for _, v in marks]])
    dots_x, dots_y = width * 2, height * 4

    def set_dot(x: int, y: int, index: int) -> None:
        row, col = y // 4, x // 2
        bits[row][col] |= _DOT_BITS[y % 4][x % 2]
        owner[row][col] = index

    for index, values in enumerate(series):
        points = resample(values, dots_x)
        if not points:
            continue
        count = len(points)
        previous: tuple[int, int] | None = None
        for i, value in enumerate(points):
            x = 0 if count == 1 else round(i * (dots_x - 1) / (count - 1))
            level = (value - low) / (high - low)
            y = dots_y - 1 - min(dots_y - 1, max(0, round(level * (dots_y - 1))))
            if previous is not None:
                px, py = previous
                for step_x in range(px + 1, x + 1):
                    # interpolate the height between the two points, then fill the vertical gap
                    t = (step_x - px) / max(1, x - px)
                    y_here = round(py + (y - py) * t)
                    y_prev = round(py + (y - py) * (step_x - 1 - px) / max(1, x - px))
                    for fill in range(min(y_here, y_prev), max(y_here, y_prev) + 1):
                        set_dot(step_x, fill, index)
            else:
                set_dot(x, y, index)
            previous = (x, y)
    line: list[tuple[int, int]] = []
    for fraction, value in marks:
        x = round(min(1.0, max(0.0, fraction)) * (dots_x - 1))
        level = (value - low) / (high - low)
        line.append((x, dots_y - 1 - min(dots_y - 1, max(0, round(level * (dots_y - 1))))))
    for i, (x, y) in enumerate(line):
        px, py = line[i - 1] if i else (x, y)
        for step_x in range(px, x + 1):
            t = 1.0 if x == px else (step_x - px) / (x - px)  # one column: the whole jump is drawn in it
            y_here = round(py + (y - py) * t)
            y_prev = py if x == px else round(py + (y - py) * max(0.0, t - 1 / (x - px)))
            for fill in range(min(y_here, y_prev), max(y_here, y_prev) + 1):
                set_dot(step_x, fill, len(series))
    return Chart(width, height, low, high, bits, owner)
