"""The typed interface the TUI plans memory through (the CLI's side is `loratui.memory.integration`).

    planner = MemoryPlanner()
    view = planner.estimate(resolved)                      # EstimateView
    options = planner.recommend(resolved, usable_bytes)   # list[Suggestion], best first; [] when nothing fits
    why = planner.no_fit_message(resolved, usable_bytes)  # when the list is empty

`PlannerFacade` is the Protocol: the screens depend on it, `MemoryPlanner` implements it with the real planner
(predictions for a CUDA device), and test fakes implement it with fixed answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from loratui.config import ResolvedConfig
from loratui.memory.estimate import Estimate, estimate_peak
from loratui.memory.recommend import Option, no_fit_message, recommend


@dataclass(frozen=True)
class EstimateView:
    """A predicted peak as the TUI shows it."""

    total_bytes: int
    method: str = ""  # how it was predicted, e.g. "traced reference step"
    error_band: float = 0.0  # relative: 0.1 is ± 10%
    breakdown: dict[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @classmethod
    def from_estimate(cls, estimate: Estimate) -> EstimateView:
        return cls(
            total_bytes=int(estimate.total_bytes),
            method=estimate.method,
            error_band=float(estimate.error_band),
            breakdown=dict(estimate.breakdown),
            notes=tuple(estimate.notes),
        )


@dataclass(frozen=True)
class Suggestion:
    """One set of changes that fits the card, with its prediction."""

    changes: dict[str, object]  # config key -> value; empty: the config as it is
    estimate: EstimateView
    headroom_bytes: int
    relative_speed: float  # 1.0 = as fast as the config as it is
    quality_note: str

    @classmethod
    def from_option(cls, option: Option) -> Suggestion:
        return cls(
            changes=dict(option.changes),
            estimate=EstimateView.from_estimate(option.estimate),
            headroom_bytes=int(option.headroom_bytes),
            relative_speed=float(option.relative_speed),
            quality_note=option.quality_note,
        )


@runtime_checkable
class PlannerFacade(Protocol):
    """What the TUI asks the memory planner."""

    def estimate(self, resolved: ResolvedConfig) -> EstimateView:
        """The predicted peak of training `resolved` on a GPU."""
        ...

    def recommend(self, resolved: ResolvedConfig, usable_bytes: int, *, top: int = 5) -> list[Suggestion]:
        """Up to `top` changes that fit `usable_bytes`, best first (empty when nothing fits)."""
        ...

    def no_fit_message(self, resolved: ResolvedConfig, usable_bytes: int) -> str:
        """Why nothing fits `usable_bytes`, and what would."""
        ...


class MemoryPlanner:
    """`PlannerFacade` backed by the real memory planner."""

    def estimate(self, resolved: ResolvedConfig) -> EstimateView:
        return EstimateView.from_estimate(estimate_peak(resolved))

    def recommend(self, resolved: ResolvedConfig, usable_bytes: int, *, top: int = 5) -> list[Suggestion]:
        return [Suggestion.from_option(option) for option in recommend(resolved, usable_bytes, top=top)]

    def no_fit_message(self, resolved: ResolvedConfig, usable_bytes: int) -> str:
        return no_fit_message(resolved, usable_bytes)
