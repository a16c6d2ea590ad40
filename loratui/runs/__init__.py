"""The run-directory contract shared by the trainers, the TUI, `runs`/`attach` and the OOM supervisor.

runs/<name>-<timestamp>/
    config.yaml       resolved config (loadable with `loratui train --config`)
    events.jsonl      one JSON object per line: {"type", "time", "step", ...}
    status.json       {"pid", "state", "step", "total_steps", ...}, replaced atomically
    checkpoints/      step-N/ folders written atomically
    logs/             TensorBoard event files
    samples/          images or texts rendered during training
"""

from loratui.runs.events import EventReader, EventWriter, read_events
from loratui.runs.rundir import RunDir, RunSummary, create_run_dir, find_run, list_runs
from loratui.runs.status import RunState, RunStatus

__all__ = [
    "EventReader",
    "EventWriter",
    "RunDir",
    "RunState",
    "RunStatus",
    "RunSummary",
    "create_run_dir",
    "find_run",
    "list_runs",
    "read_events",
]
