"""The run-directory contract shared by the trainers, the TUI, `runs`/`attach` and the OOM supervisor.

Every file of a run directory is defined here, with typed read/write functions; every write is atomic
(`loratui.util.atomic`) or an append of whole lines, and each file has one writer:

runs/<name>-<timestamp>/
    config.yaml       resolved config (loadable with `loratui train --config`)   config_file; launch
    launch.json       how the run starts (resume point, processes, GPU)           launch_file; launch
    oom.json          settings out-of-memory recovery changed, and when           oom_file; train.oom.record
    status.json       {"pid", "pid_started", "state", "step", ...}                status (the worker's processes)
    events.jsonl      one JSON object per line: {"type", "time", "step", ...}     events (the worker's processes)
    checkpoints/      step-N/ folders written atomically, manifest.json last      checkpoints; train.loop
    logs/             TensorBoard event files
    samples/          images or texts rendered during training
    run.lock          held (flock) by the run's processes while it runs            lock; train.process.launch

`liveness` tells whether the pid in status.json is still the run's process; `stop` stops a running run;
`lock` keeps a second run off a running run's directory and off its output_dir.
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
