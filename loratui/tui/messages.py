"""Messages posted by workers and widgets ("messages up"). Small dataclasses; handlers own the state.

Messages a newer one may replace (telemetry, progress) say so in `can_replace`, so a busy UI never queues
a flood of stale updates.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from textual.message import Message

from loratui.gpu.nvml import SystemSnapshot
from loratui.memory.facade import EstimateView, Suggestion
from loratui.tui.run_model import RunView
from loratui.tui.wizard_state import GpuChoice


class _Replaceable(Message):
    """A message superseded by a newer message of the same class."""

    def can_replace(self, message: Message) -> bool:
        return type(message) is type(self)


# --- telemetry ----------------------------------------------------------------------------------


@dataclass
class GpuTelemetry(_Replaceable):
    """A fresh NVML snapshot from the telemetry worker."""

    snapshot: SystemSnapshot


# --- wizard navigation and choices -------------------------------------------------------------


@dataclass
class StepShown(Message):
    """The wizard switched to step `index` (0-based)."""

    index: int
    name: str


@dataclass
class GpuChosen(Message):
    """The user picked the GPU (or CPU / a card size) to plan and train for."""

    choice: GpuChoice


@dataclass
class ValueChosen(Message):
    """The user set config key `key` to `value` (None: back to the file/preset/default value)."""

    key: str
    value: Any


@dataclass
class PresetChosen(Message):
    """The user picked a preset (None: no preset)."""

    name: str | None


@dataclass
class ModelInspected(Message):
    """The base-model inspection worker finished."""

    path: str
    info: Any  # loratui.config.base_model.ModelInfo


@dataclass
class ChecksStarted(Message):
    """The dataset-check worker started on `path`."""

    path: str


@dataclass
class ChecksFinished(Message):
    """The dataset-check worker finished."""

    path: str
    report: Any  # loratui.data.findings.Report


@dataclass
class FileIgnored(Message):
    """A dataset file (and its caption) was moved aside so training skips it."""

    path: str
    moved_to: str


@dataclass
class CaptionProgress(_Replaceable):
    """Captioning progress: `done` of `total` images."""

    done: int
    total: int
    elapsed_s: float


@dataclass
class CaptionsReady(Message):
    """Captioning finished: (image path, caption) rows to review."""

    rows: list[tuple[str, str]]


@dataclass
class CaptionsWritten(Message):
    """Captions were written (a metadata.csv or .txt files)."""

    target: str
    count: int
    metadata_path: str | None


@dataclass
class EstimateReady(_Replaceable):
    """The memory planner's estimate for the current settings."""

    estimate: EstimateView | None  # None: no prediction (`note` says why)
    note: str = ""


@dataclass
class OptionsReady(Message):
    """The memory planner's ranked options for the chosen card."""

    options: list[Suggestion]
    note: str = ""


@dataclass
class ConfigSaved(Message):
    """The config was written to `path`."""

    path: Path


@dataclass
class TrainingStarted(Message):
    """A worker process was started for `run_dir`."""

    run_dir: Path
    pid: int


@dataclass
class DemoRequested(Message):
    """The person asked to try a demo (train a LoRA on a shipped small model and watch it): `text` or `image`."""

    task: str = "text"


@dataclass
class WorkFailed(Message):
    """A worker raised: shown once in the error modal."""

    what: str
    error: str


# --- training view -------------------------------------------------------------------------------


@dataclass
class RunProgress(_Replaceable):
    """A new snapshot of the run being viewed."""

    view: RunView


@dataclass
class ControlSent(Message):
    """A key asked the worker for something: "checkpoint" (SIGUSR1), "stop" (SIGINT) or "detach"."""

    action: str
    delivered: bool
    detail: str = ""


@dataclass
class GoToStep(Message):
    """A step asks the wizard to show another step (e.g. Dataset → Captions for missing captions)."""

    index: int
    reason: str = ""
