"""Fold a run's events into what the training view shows (no Textual; used from a worker thread).

`RunModel.feed(events)` takes events in file order; `RunModel.view()` returns an immutable `RunView`
snapshot that the UI can render and that a newer snapshot can replace.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from loratui.runs.follow import FINAL_EVENTS, format_event
from loratui.tui.chart import resample
from loratui.tui.formatting import fmt_settings_change

SERIES_POINTS = 600  # loss points kept per snapshot (the chart resamples to its own width)
LOG_TAIL = 400  # log lines carried by a snapshot
SMOOTHING = 0.9  # TensorBoard-style exponential smoothing weight
FINAL_STATES = {"run_finished": "finished", "run_failed": "failed", "run_stopped": "stopped"}


@dataclass(frozen=True)
class OomRecovery:
    """One out-of-memory event and the settings change that followed."""

    step: int | None
    change: str
    short_change: str
    rung: str
    recovered: bool


@dataclass(frozen=True)
class RunView:
    """Everything the training view shows, at one moment."""

    name: str
    state: str = "starting"
    note: str = ""
    step: int = 0
    total_steps: int | None = None
    epoch: int = 0  # 1-based once training started
    total_epochs: int | None = None
    loss: float | None = None
    smoothed_loss: float | None = None
    lr: float | None = None
    samples_per_s: float | None = None
    eta_s: float | None = None
    memory_used: int | None = None
    memory_peak: int | None = None
    memory_predicted: int | None = None
    rank_memory: tuple[int, ...] = ()  # several training processes: each one's memory (rank order)
    rank_memory_kind: str = "gpu"  # "gpu" (CUDA peak reserved) or "rss" (CPU processes)
    processes: int = 1
    device: str = ""
    family: str = ""
    loss_series: tuple[float, ...] = ()
    smooth_series: tuple[float, ...] = ()
    eval_points: tuple[tuple[float, float], ...] = ()  # (x in [0, 1] along loss_series, eval/validation loss)
    eval_loss: float | None = None
    margin_series: tuple[float, ...] = ()  # preference runs (DPO/ORPO): reward margin per step
    smooth_margin_series: tuple[float, ...] = ()
    reward_margin: float | None = None
    reward_accuracy: float | None = None
    checkpoint: str | None = None
    samples: tuple[str, ...] = ()
    ooms: tuple[OomRecovery, ...] = ()
    exports: tuple[tuple[str, str], ...] = ()  # (path, usage)
    log: tuple[str, ...] = ()
    log_total: int = 0  # lines produced so far (the tail is in `log`)
    pid: int | None = None
    error: str = ""

    @property
    def ended(self) -> bool:
        return self.state in ("finished", "failed", "stopped")

    @property
    def progress(self) -> float | None:
        if not self.total_steps:
            return None
        return min(1.0, self.step / self.total_steps)


@dataclass
class RunModel:
    """Mutable accumulator behind `RunView` (one per viewer, fed from events.jsonl)."""

    name: str
    total_epochs: int | None = None
    memory_predicted: int | None = None
    state: str = "starting"
    note: str = ""
    step: int = 0
    total_steps: int | None = None
    epoch: int = 0
    loss: float | None = None
    smoothed: float | None = None
    lr: float | None = None
    samples_per_s: float | None = None
    memory_used: int | None = None
    memory_peak: int | None = None
    rank_memory: tuple[int, ...] = ()
    rank_memory_kind: str = "gpu"
    processes: int = 1
    device: str = ""
    family: str = ""
    losses: list[float] = field(default_factory=list)
    smooth: list[float] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)  # (losses seen when it came, eval loss)
    margins: list[float] = field(default_factory=list)
    smooth_margins: list[float] = field(default_factory=list)
    reward_margin: float | None = None
    reward_accuracy: float | None = None
    checkpoint: str | None = None
    samples: deque = field(default_factory=lambda: deque(maxlen=8))
    ooms: list[OomRecovery] = field(default_factory=list)
    exports: list[tuple[str, str]] = field(default_factory=list)
    log: deque = field(default_factory=lambda: deque(maxlen=LOG_TAIL))
    log_total: int = 0
    pid: int | None = None
    error: str = ""
    _ema: float = 0.0
    _ema_n: int = 0
    _margin_ema: float = 0.0
    _first_step: tuple[int, float] | None = None
    _last_step: tuple[int, float] | None = None

    def feed(self, events: list[dict[str, Any]]) -> bool:
        """Apply events in order; True when anything changed."""
        for event in events:
            self._apply(event)
        return bool(events)

    def set_status(self, state: str, note: str, pid: int | None) -> bool:
        """Take the state from status.json (events win once a final event was seen)."""
        if self.state in ("finished", "failed", "stopped"):
            changed = pid != self.pid
            self.pid = pid
            return changed
        changed = (state, note, pid) != (self.state, self.note, self.pid)
        self.state, self.note, self.pid = state, note, pid
        return changed

    def _add_log(self, line: str) -> None:
        for part in line.splitlines():
            self.log.append(part)
            self.log_total += 1

    def _apply(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        step = event.get("step")
        if kind == "run_started":
            self.total_steps = _int(event.get("total_steps")) or self.total_steps
            self.device = str(event.get("device") or "")
            self.family = str(event.get("family") or "")
            self.memory_predicted = _int(event.get("predicted_peak")) or self.memory_predicted
            self.processes = _int(event.get("processes")) or 1
            if self.state == "starting":
                self.state = "running"
        elif kind == "step":
            self._apply_step(event)
        elif kind == "eval":
            value = event.get("eval_loss")
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                self.evals.append((len(self.losses), float(value)))
        elif kind == "checkpoint":
            self.checkpoint = str(event.get("path") or "")
        elif kind == "sample" and (event.get("path") or event.get("text")):
            self.samples.append(str(event.get("path") or event.get("text")))
        elif kind in ("oom", "oom_recovered"):
            old, new = event.get("old"), event.get("new")
            self.ooms.append(
                OomRecovery(
                    _int(step),
                    fmt_settings_change(old, new),
                    fmt_settings_change(old, new, short=True),
                    str(event.get("label") or event.get("rung") or ""),
                    kind == "oom_recovered",
                )
            )
        elif kind == "export":
            self.exports.append((str(event.get("path") or ""), str(event.get("usage") or "")))
        elif kind in FINAL_EVENTS:
            self.state = FINAL_STATES[kind]
            self.note = str(event.get("reason") or "")
            self.error = str(event.get("error") or "")
        if kind == "step":
            every = max(1, (self.total_steps or 0) // 200)
            if _int(step) in (None, 1) or (_int(step) or 0) % every == 0 or step == self.total_steps:
                self._add_log(format_event(event) or "")
        else:
            line = format_event(event)
            if kind in ("oom", "oom_recovered"):
                recovery = self.ooms[-1]
                verb = "recovered" if recovery.recovered else "out of memory"
                line = f"{verb} at step {step}: {recovery.change}" + (
                    f" ({recovery.rung})" if recovery.rung else ""
                )
            if line:
                self._add_log(line)

    def _apply_step(self, event: dict[str, Any]) -> None:
        step = _int(event.get("step")) or self.step
        self.step = step
        self.epoch = (_int(event.get("epoch")) or 0) + 1
        loss = event.get("loss")
        if isinstance(loss, int | float) and math.isfinite(loss):
            self.loss = float(loss)
            self._ema = SMOOTHING * self._ema + (1 - SMOOTHING) * self.loss
            self._ema_n += 1
            self.smoothed = self._ema / (1 - SMOOTHING**self._ema_n)
            self.losses.append(self.loss)
            self.smooth.append(self.smoothed)
        self._apply_rewards(event)
        if isinstance(event.get("lr"), int | float):
            self.lr = float(event["lr"])
        if isinstance(event.get("samples_per_s"), int | float):
            self.samples_per_s = float(event["samples_per_s"])
        for key, attr in (("memory_reserved", "memory_used"), ("memory_peak", "memory_peak")):
            if isinstance(event.get(key), int | float):
                setattr(self, attr, int(event[key]))
        ranks = event.get("rank_memory")
        if isinstance(ranks, list) and all(isinstance(v, int | float) for v in ranks):
            self.rank_memory = tuple(int(v) for v in ranks)
            self.rank_memory_kind = str(event.get("rank_memory_kind") or "gpu")
        when = event.get("time")
        if isinstance(when, int | float):
            if self._first_step is None:
                self._first_step = (step, float(when))
            self._last_step = (step, float(when))

    def _apply_rewards(self, event: dict[str, Any]) -> None:
        """Preference runs: the reward margin (raw and smoothed) and the reward accuracy."""
        margin = event.get("reward_margin")
        if isinstance(margin, int | float) and not isinstance(margin, bool) and math.isfinite(margin):
            self.reward_margin = float(margin)
            self._margin_ema = SMOOTHING * self._margin_ema + (1 - SMOOTHING) * self.reward_margin
            self.margins.append(self.reward_margin)
            self.smooth_margins.append(self._margin_ema / (1 - SMOOTHING ** len(self.margins)))
        accuracy = event.get("reward_accuracy")
        if isinstance(accuracy, int | float) and not isinstance(accuracy, bool) and math.isfinite(accuracy):
            self.reward_accuracy = float(accuracy)

    def _eval_points(self) -> tuple[tuple[float, float], ...]:
        """Evaluation losses placed along the loss curve: at the position of the last step logged before
        each (the chart spans the first to the last logged step)."""
        span = max(1, len(self.losses) - 1)
        points = [(max(0, seen - 1) / span, value) for seen, value in self.evals[-SERIES_POINTS:]]
        return tuple(points)

    def eta_s(self) -> float | None:
        """Seconds left from the step rate seen in the events (None before two timed steps)."""
        if not self.total_steps or self._first_step is None or self._last_step is None:
            return None
        (s0, t0), (s1, t1) = self._first_step, self._last_step
        if s1 <= s0 or t1 <= t0:
            return None
        return (self.total_steps - s1) * (t1 - t0) / (s1 - s0)

    def view(self) -> RunView:
        """An immutable snapshot for the UI."""
        ended = self.state in ("finished", "failed", "stopped")
        return RunView(
            name=self.name,
            state=self.state,
            note=self.note,
            step=self.step,
            total_steps=self.total_steps,
            epoch=self.epoch,
            total_epochs=self.total_epochs,
            loss=self.loss,
            smoothed_loss=self.smoothed,
            lr=self.lr,
            samples_per_s=self.samples_per_s,
            eta_s=0.0 if ended else self.eta_s(),
            memory_used=self.memory_used,
            memory_peak=self.memory_peak,
            memory_predicted=self.memory_predicted,
            rank_memory=self.rank_memory,
            rank_memory_kind=self.rank_memory_kind,
            processes=self.processes,
            device=self.device,
            family=self.family,
            loss_series=tuple(resample(self.losses, SERIES_POINTS)),
            smooth_series=tuple(resample(self.smooth, SERIES_POINTS)),
            eval_points=self._eval_points(),
            eval_loss=self.evals[-1][1] if self.evals else None,
            margin_series=tuple(resample(self.margins, SERIES_POINTS)),
            smooth_margin_series=tuple(resample(self.smooth_margins, SERIES_POINTS)),
            reward_margin=self.reward_margin,
            reward_accuracy=self.reward_accuracy,
            checkpoint=self.checkpoint,
            samples=tuple(self.samples),
            ooms=tuple(self.ooms),
            exports=tuple(self.exports),
            log=tuple(self.log),
            log_total=self.log_total,
            pid=self.pid,
            error=self.error,
        )


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return int(value)
    return None
