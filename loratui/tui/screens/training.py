"""The live training view: loss chart, numbers, VRAM, log and result of one run directory.

A thread worker tails `events.jsonl` and `status.json` (read-only, so any number of viewers can watch the
same run) and posts replaceable `RunProgress` snapshots. Keys send signals to the worker process whose pid
`status.json` holds: `s` SIGUSR1 (checkpoint now), `c` SIGINT (checkpoint, then stop); `d` detaches.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import replace
from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import Footer
from textual.worker import get_current_worker

from loratui.gpu.nvml import GpuSnapshot, SystemSnapshot
from loratui.memory.facade import EstimateView, MemoryPlanner
from loratui.runs.events import EventReader
from loratui.runs.launch_file import read_launch_or_default
from loratui.runs.status import RunStatus, effective_state, pid_alive
from loratui.tui.background import Cancelled, call_cancellable
from loratui.tui.messages import ControlSent, EstimateReady, RunProgress
from loratui.tui.run_model import RunModel, RunView
from loratui.tui.screens.confirm import ConfirmScreen
from loratui.tui.screens.message_box import MessageBox
from loratui.tui.widgets.loss_chart import LossChart
from loratui.tui.widgets.reward_chart import RewardChart
from loratui.tui.widgets.run_header import RunHeader
from loratui.tui.widgets.run_log import RunLog
from loratui.tui.widgets.run_result import RunResult
from loratui.tui.widgets.run_stats import RunStats

EXIT_CODES = {"finished": 0, "stopped": 130, "failed": 1}

HELP = """\
d      detach: close this view; training goes on. Re-open it with `loratui attach RUN`.
s      save a checkpoint now (training continues).
c      stop: the worker saves a checkpoint, then stops (asks first).
q      quit once the run has ended (before that, the same as d).
?      this help.   Ctrl+T  light/dark theme.

The view only reads the run directory: several viewers can watch one run, and closing this terminal
(or losing the SSH connection) does not stop training. Without a terminal, `loratui attach --no-tui`
prints plain progress lines."""


def default_gpu_index(run_dir: Path | None = None) -> int:
    """The GPU the run's worker uses: the one recorded in its launch.json (picked in the wizard), else the
    first of this environment's CUDA_VISIBLE_DEVICES, else 0."""
    recorded = read_launch_or_default(run_dir).gpu if run_dir is not None else None
    first = (recorded or os.environ.get("CUDA_VISIBLE_DEVICES", "0")).split(",")[0].strip()
    return int(first) if first.isdigit() else 0


def load_run_epochs(run_dir: Path) -> int | None:
    """Total epochs of the run (None when max_steps sets the length or the config is unreadable)."""
    try:
        from loratui.config import load_config

        resolved = load_config(run_dir / "config.yaml")
    except Exception:
        return None
    return None if resolved.config.max_steps else resolved.config.epochs


def predict_peak(run_dir: Path) -> EstimateView | None:
    """The memory planner's predicted peak for the run's config (None when it cannot be predicted)."""
    try:
        from loratui.config import load_config

        resolved = load_config(run_dir / "config.yaml")
        if not resolved.config.base_model:
            return None
        return MemoryPlanner().estimate(resolved)
    except Exception:
        return None


def read_state(status: RunStatus | None) -> tuple[str, str, int | None]:
    """(state, note, pid to signal) from status.json. A freshly prepared run without a pid is starting;
    signals go to the supervisor while it runs (it forwards them and knows the stop was deliberate)."""
    if status is None or (status.state == "starting" and status.pid is None):
        return "starting", "", None
    state, note = effective_state(status)
    supervisor = status.extra.get("supervisor_pid") if isinstance(status.extra, dict) else None
    target = supervisor if isinstance(supervisor, int) and pid_alive(supervisor) else status.pid
    return state, note, target


class TrainingScreen(Screen):
    """Everything about one run, live. Replays the full history first."""

    BINDINGS = [
        Binding("d", "detach", "detach"),
        Binding("s", "checkpoint", "checkpoint now"),
        Binding("c", "stop", "stop"),
        Binding("q", "quit_view", "quit", show=False),
        Binding("question_mark", "help", "help", key_display="?"),
    ]

    view: reactive[RunView | None] = reactive(None)

    def __init__(
        self,
        run_dir: Path,
        *,
        poll_interval: float = 0.25,
        gpu_index: int | None = None,
        predicted_bytes: int | None = None,
    ) -> None:
        super().__init__()
        self.run_dir = Path(run_dir)
        self.predicted_bytes = predicted_bytes
        self._predicting = predicted_bytes is not None
        self.poll_interval = poll_interval
        self.gpu_index = default_gpu_index(self.run_dir) if gpu_index is None else gpu_index
        self._stop = threading.Event()
        self._ooms_seen: int | None = None

    def compose(self) -> ComposeResult:
        yield RunHeader()
        with Horizontal(id="top"):
            yield LossChart(id="loss")
            rewards = RewardChart(id="rewards")  # shown once steps carry reward margins (DPO/ORPO)
            rewards.display = False
            yield rewards
            yield RunStats()
        yield RunResult()
        yield RunLog()
        yield Footer()

    def on_mount(self) -> None:
        self.watch(self.app, "gpu", self._gpu_changed)
        self.follow()

    def on_unmount(self) -> None:
        self._stop.set()

    # --- the reader worker (never touches widgets) -------------------------------------------------
    @work(thread=True, exclusive=True, exit_on_error=False, group="events", name="events")
    def follow(self) -> None:
        """Tail events.jsonl and status.json; post a snapshot whenever something changed."""
        worker = get_current_worker()
        model = RunModel(self.run_dir.name, total_epochs=load_run_epochs(self.run_dir))
        reader = EventReader(self.run_dir / "events.jsonl")
        first = True
        while not worker.is_cancelled and not self._stop.is_set():
            changed = model.feed(reader.poll())
            state, note, pid = read_state(RunStatus.read(self.run_dir / "status.json"))
            changed = model.set_status(state, note, pid) or changed
            if changed or first:
                self.post_message(RunProgress(model.view()))
                first = False
            ended = model.state in EXIT_CODES
            self._stop.wait(self.poll_interval * (4 if ended else 1))

    @work(thread=True, exclusive=True, exit_on_error=False, group="predict", name="predict")
    def predict(self) -> None:
        """One memory-planner estimate for the VRAM panel (only started when there is a GPU)."""
        try:
            self.post_message(EstimateReady(call_cancellable(predict_peak, self.run_dir)))
        except Cancelled:
            return

    @on(EstimateReady)
    def _on_estimate(self, message: EstimateReady) -> None:
        if message.estimate is not None:
            self.predicted_bytes = message.estimate.total_bytes
            if self.view is not None:
                self._on_progress(RunProgress(self.view))

    # --- state owned by the UI thread -----------------------------------------------------------
    @on(RunProgress)
    def _on_progress(self, message: RunProgress) -> None:
        previous = self.view
        view = message.view
        if view.memory_predicted is None and self.predicted_bytes:
            view = replace(view, memory_predicted=self.predicted_bytes)
        self.view = view
        self.query_one(RunHeader).view = view
        chart = self.query_one("#loss", LossChart)
        chart.raw, chart.smoothed, chart.last_step = view.loss_series, view.smooth_series, view.step
        chart.evals = view.eval_points
        rewards = self.query_one("#rewards", RewardChart)
        rewards.display = bool(view.margin_series)
        rewards.raw, rewards.smoothed = view.margin_series, view.smooth_margin_series
        rewards.last_step, rewards.accuracy = view.step, view.reward_accuracy
        self.query_one(RunStats).view = view
        self.query_one(RunResult).view = view
        self.query_one(RunLog).show(view)
        if self._ooms_seen is not None and len(view.ooms) > self._ooms_seen:
            last = view.ooms[-1]
            verb = "Recovered from out-of-memory" if last.recovered else "Out of memory"
            self.notify(f"{verb} at step {last.step}: {last.change}", severity="warning", timeout=6)
        self._ooms_seen = len(view.ooms)
        if previous is not None and not previous.ended and view.ended:
            self.notify(f"Run {view.state}. Press q to quit.", timeout=6)
        self.refresh_bindings()

    def _gpu_changed(self, snapshot: SystemSnapshot | None) -> None:
        gpu = self._pick_gpu(snapshot)
        self.query_one(RunStats).gpu = gpu
        if gpu is not None and not self._predicting:
            self._predicting = True
            self.predict()

    def _pick_gpu(self, snapshot: SystemSnapshot | None) -> GpuSnapshot | None:
        if snapshot is None or not snapshot.available:
            return None
        for gpu in snapshot.gpus:
            if gpu.index == self.gpu_index:
                return gpu
        return snapshot.gpus[0] if snapshot.gpus else None

    # --- keys ---------------------------------------------------------------------------------
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Hide checkpoint/stop once the run has ended."""
        ended = self.view is not None and self.view.ended
        return not (ended and action in ("checkpoint", "stop"))

    def _signal(self, action: str, signum: int) -> None:
        view = self.view
        pid = view.pid if view is not None else None
        if view is None or view.ended or not pid_alive(pid):
            self.post_message(ControlSent(action, False, "the worker is not running"))
            self.notify("The worker is not running.", severity="warning")
            return
        try:
            os.kill(pid, signum)
        except OSError as exc:
            self.post_message(ControlSent(action, False, str(exc)))
            self.notify(f"Could not signal the worker: {exc}", severity="error")
            return
        self.post_message(ControlSent(action, True))
        what = "Checkpoint requested" if action == "checkpoint" else "Stopping after a checkpoint"
        self.notify(f"{what}.", timeout=4)

    def action_checkpoint(self) -> None:
        self._signal("checkpoint", signal.SIGUSR1)

    def action_stop(self) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                self._signal("stop", signal.SIGINT)

        self.app.push_screen(
            ConfirmScreen(
                "Stop training? The worker saves a checkpoint first; resume later with --resume.",
                yes="Stop",
                no="Keep training",
            ),
            answered,
        )

    def action_detach(self) -> None:
        self.post_message(ControlSent("detach", True))
        self.app.exit(0)

    def action_quit_view(self) -> None:
        view = self.view
        if view is not None and view.ended:
            self.app.exit(EXIT_CODES.get(view.state, 0))
        else:
            self.action_detach()

    def action_help(self) -> None:
        self.app.push_screen(MessageBox("Training view keys", HELP))
