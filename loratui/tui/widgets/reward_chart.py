"""The reward margin of a preference run (DPO/ORPO): raw and smoothed, drawn like the loss curve, with the
reward accuracy (share of pairs whose chosen answer is rewarded above the rejected one) in the subtitle."""

from __future__ import annotations

from textual.reactive import reactive

from loratui.tui.widgets.loss_chart import LossChart


class RewardChart(LossChart):
    """Plots the chosen-minus-rejected reward margin over the steps; hidden for SFT runs."""

    chart_title = "reward margin"
    accuracy: reactive[float | None] = reactive(None)

    def watch_accuracy(self, accuracy: float | None) -> None:
        shown = f"  accuracy {accuracy:.0%}" if accuracy is not None else ""
        self.border_subtitle = self.chart_subtitle + shown
