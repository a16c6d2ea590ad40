"""Create, find and list run directories."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from loratui.runs.config_file import config_path
from loratui.runs.events import EventWriter
from loratui.runs.launch_file import launch_path
from loratui.runs.oom_file import oom_path
from loratui.runs.status import RunStatus, effective_state

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory."""

    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config_path(self) -> Path:
        """`config.yaml` (read and written through `loratui.runs.config_file`)."""
        return config_path(self.path)

    @property
    def launch_path(self) -> Path:
        """`launch.json` (read and written through `loratui.runs.launch_file`)."""
        return launch_path(self.path)

    @property
    def oom_path(self) -> Path:
        """`oom.json` (read and written through `loratui.runs.oom_file`)."""
        return oom_path(self.path)

    @property
    def events_path(self) -> Path:
        return self.path / "events.jsonl"

    @property
    def status_path(self) -> Path:
        return self.path / "status.json"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def logs_dir(self) -> Path:
        return self.path / "logs"

    @property
    def samples_dir(self) -> Path:
        return self.path / "samples"

    def status(self) -> RunStatus | None:
        return RunStatus.read(self.status_path)

    def write_status(self, status: RunStatus) -> None:
        status.write(self.status_path)

    def event_writer(self) -> EventWriter:
        return EventWriter(self.events_path)

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints (`step-N/`), oldest first."""
        found = []
        if self.checkpoints_dir.is_dir():
            for path in self.checkpoints_dir.iterdir():
                match = re.fullmatch(r"step-(\d+)", path.name)
                if match and path.is_dir():
                    found.append((int(match.group(1)), path))
        return [p for _, p in sorted(found)]

    def latest_checkpoint(self) -> Path | None:
        items = self.checkpoints()
        return items[-1] if items else None


def create_run_dir(runs_dir: Path, name: str, *, now: float | None = None) -> RunDir:
    """Make `runs_dir/<name>-<YYYYmmdd-HHMMSS>/` with its subfolders (never reuses an existing one)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now or time.time()))
    base = f"{_SAFE.sub('-', name).strip('-') or 'run'}-{stamp}"
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(1000):
        candidate = runs_dir / (base if attempt == 0 else f"{base}-{attempt}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        run = RunDir(candidate)
        for sub in (run.checkpoints_dir, run.logs_dir, run.samples_dir):
            sub.mkdir()
        return run
    raise RuntimeError(f"could not create a run directory under {runs_dir}")


@dataclass
class RunSummary:
    """One row of `loratui runs`."""

    run: RunDir
    state: str
    note: str
    step: int
    total_steps: int | None
    started_at: float | None
    updated_at: float | None

    @property
    def progress(self) -> str:
        if self.total_steps:
            return f"{self.step}/{self.total_steps} ({100 * self.step / self.total_steps:.0f}%)"
        return str(self.step)


def list_runs(runs_dir: Path) -> list[RunSummary]:
    """Every run under `runs_dir`, newest first."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    summaries = []
    for path in runs_dir.iterdir():
        if not path.is_dir() or not (path / "events.jsonl").exists() and not (path / "status.json").exists():
            continue
        run = RunDir(path)
        status = run.status()
        state, note = effective_state(status)
        summaries.append(
            RunSummary(
                run=run,
                state=state,
                note=note,
                step=status.step if status else 0,
                total_steps=status.total_steps if status else None,
                started_at=status.started_at if status else None,
                updated_at=status.updated_at if status else None,
            )
        )
    summaries.sort(key=lambda s: (s.started_at or 0, s.run.name), reverse=True)
    return summaries


def find_run(runs_dir: Path, name: str | None) -> RunDir | None:
    """A run by directory path, exact name or unique prefix; the newest run when `name` is None."""
    if name:
        direct = Path(name)
        if direct.is_dir() and (direct / "events.jsonl").exists():
            return RunDir(direct)
    runs = list_runs(runs_dir)
    if not name:
        return runs[0].run if runs else None
    exact = [s.run for s in runs if s.run.name == name]
    if exact:
        return exact[0]
    prefixed = [s.run for s in runs if s.run.name.startswith(name)]
    return prefixed[0] if len(prefixed) >= 1 else None
