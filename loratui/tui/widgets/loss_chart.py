"""The loss curve: raw loss (dim) and its smoothed line (accent) drawn in braille, with the y range; the
evaluation (validation) loss, when the run measures one, as a third line beside them."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from loratui.tui.chart import plot
from loratui.tui.formatting import fmt_number

LABEL_WIDTH = 7


class LossChart(Widget):
    """Plots `raw` and `smoothed` over the steps seen so far; `last_step` labels the x axis."""

    COMPONENT_CLASSES = {"loss-chart--raw", "loss-chart--smooth", "loss-chart--eval", "loss-chart--axis"}

    raw: reactive[tuple[float, ...]] = reactive(())
    smoothed: reactive[tuple[float, ...]] = reactive(())
    last_step: reactive[int] = reactive(0)
    evals: reactive[tuple[tuple[float, float], ...]] = reactive(())  # (x in [0, 1], eval loss)
    chart_title = "loss"
    chart_subtitle = "⣀ raw  ⣿ smoothed"
    eval_subtitle = "  ⣿ validation"

    def on_mount(self) -> None:
        self.border_title = self.chart_title
        self.border_subtitle = self.chart_subtitle

    def watch_evals(self, evals: tuple[tuple[float, float], ...]) -> None:
        shown = f"{self.eval_subtitle} {fmt_number(evals[-1][1], 4)}" if evals else ""
        self.border_subtitle = self.chart_subtitle + shown

    def render(self) -> Text:
        width, height = self.size.width, self.size.height
        axis = self.get_component_rich_style("loss-chart--axis")
        if not self.raw:
            return Text("waiting for the first step…", style=axis)
        chart_w = max(1, width - LABEL_WIDTH - 1)
        chart_h = max(1, height - 1)
        chart = plot([self.raw, self.smoothed], chart_w, chart_h, points=self.evals)
        styles = (
            self.get_component_rich_style("loss-chart--raw"),
            self.get_component_rich_style("loss-chart--smooth"),
            self.get_component_rich_style("loss-chart--eval"),
        )
        text = Text(no_wrap=True, overflow="crop")
        for row in range(chart_h):
            if row == 0:
                label = fmt_number(chart.high, 3)
            elif row == chart_h - 1:
                label = fmt_number(chart.low, 3)
            else:
                label = ""
            text.append(f"{label:>{LABEL_WIDTH}}┤" if label else " " * LABEL_WIDTH + "│", axis)
            for col in range(chart_w):
                owner = chart.owner[row][col]
                char = chr(0x2800 + chart.bits[row][col])
                text.append(char, styles[owner] if owner >= 0 else axis)
            text.append("\n")
        left = "step 1"
        right = f"step {self.last_step}"
        gap = max(1, chart_w - len(left) - len(right))
        text.append(" " * (LABEL_WIDTH + 1) + left + " " * gap + right, axis)
        return text
