"""Start-up and shut-down shared by the trainers: the stop request and the run's `Reporter`.

    with training_session(job.run, console=console) as session:
        ...  # setup, then the loop; session.reporter, session.stop

On every way out (the run finished or stopped, an exception, KeyboardInterrupt) the Reporter is closed (event
log and TensorBoard flushed) and the signal handlers `StopRequest` replaced are put back; the worker records
a failure itself, after this. A caller's own stop flag (tests: stop after n steps) is used as given and installs
nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from loratui.runs.rundir import RunDir
from loratui.train.loop.loggers import LoggerSettings
from loratui.train.loop.reporting import Reporter
from loratui.train.loop.signals import StopFlag, StopRequest, current


@dataclass
class TrainingSession:
    """What every trainer gets from `training_session`."""

    reporter: Reporter
    stop: StopFlag


@contextlib.contextmanager
def training_session(
    run: RunDir,
    *,
    stop: StopFlag | None = None,
    console: bool = True,
    loggers: LoggerSettings | None = None,
) -> Iterator[TrainingSession]:
    """Install a `StopRequest` (unless `stop` is given) and open the run's Reporter (scalar loggers as
    `loggers` says; None: TensorBoard); undo both on exit."""
    earlier = current()
    installed = StopRequest().install() if stop is None else None
    if installed is not None and earlier is not None and earlier.raw_requested:
        installed.request(earlier.signal_name or "requested")  # a stop that came during start-up
    try:
        reporter = Reporter(run, total_steps=0, console=console, loggers=loggers)
        try:
            yield TrainingSession(reporter, installed or stop)
        finally:
            reporter.close()
    finally:
        if installed is not None:
            installed.restore()
