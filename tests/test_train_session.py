"""Start-up and shut-down shared by both trainers: signal handlers come back, the Reporter is always closed.

`training_session` installs a `StopRequest` and opens the run's `Reporter`; whatever way a run ends (finished,
stopped by a signal, an exception, KeyboardInterrupt) the handlers it replaced are put back and the Reporter's
event log and TensorBoard writer are closed. Checked on the session itself and on in-process runs of the tiny
SD 1.5 and Llama models.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import llm_helpers
import pytest
import sd_helpers
import torch

from loratui.config import load_config
from loratui.runs.events import EventWriter, read_events
from loratui.runs.rundir import RunDir, create_run_dir
from loratui.train.job import WorkerJob
from loratui.train.llm.trainer import run_training
from loratui.train.loop import session as session_module
from loratui.train.loop import signals
from loratui.train.loop.reporting import Reporter
from loratui.train.loop.session import training_session
from loratui.train.loop.signals import StopRequest
from loratui.train.oom.recovering import RecoveringStep
from loratui.train.sd.trainer import train as train_sd

REPLACED = [
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1", "SIGHUP") if hasattr(signal, name)
]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class CallerHandlers:
    """The handlers a caller had before training: one recording function for every signal StopRequest replaces."""

    def __init__(self) -> None:
        self.received: list[int] = []

    def __call__(self, signum: int, _frame: object) -> None:
        self.received.append(signum)

    def in_place(self) -> bool:
        return all(signal.getsignal(sig) is self for sig in REPLACED)


@pytest.fixture
def caller() -> Iterator[CallerHandlers]:
    saved = {sig: signal.getsignal(sig) for sig in REPLACED}
    handlers = CallerHandlers()
    for sig in REPLACED:
        signal.signal(sig, handlers)
    yield handlers
    for sig, handler in saved.items():
        signal.signal(sig, handler)


class Opened:
    """Every Reporter the session opened and every event log that was closed."""

    def __init__(self) -> None:
        self.reporters: list[Reporter] = []
        self.closed_logs: list[EventWriter] = []

    def all_closed(self) -> bool:
        return bool(self.reporters) and all(
            reporter.closed and reporter.events in self.closed_logs for reporter in self.reporters
        )


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> Opened:
    record = Opened()
    close_log = EventWriter.close

    class RecordedReporter(Reporter):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            record.reporters.append(self)

    def recorded_close(writer: EventWriter) -> None:
        record.closed_logs.append(writer)
        close_log(writer)

    monkeypatch.setattr(session_module, "Reporter", RecordedReporter)
    monkeypatch.setattr(EventWriter, "close", recorded_close)
    return record


def _step_then(monkeypatch: pytest.MonkeyPatch, after_step: int, action: Callable[[], None]) -> None:
    """Run every optimizer step as usual; after step `after_step`, do `action` (raise, send a signal)."""
    real_run = RecoveringStep.run

    def run(self, step, *args, **kwargs):
        result = real_run(self, step, *args, **kwargs)
        if step == after_step:
            action()
        return result

    monkeypatch.setattr(RecoveringStep, "run", run)


def _raise() -> None:
    raise RuntimeError("injected failure in the loop")


def _send_sigint() -> None:
    os.kill(os.getpid(), signal.SIGINT)


def _events(run: RunDir, kind: str) -> list[dict]:
    return [e for e in read_events(run.events_path) if e["type"] == kind]


# --- the pieces ------------------------------------------------------------------------------------------


def test_stop_request_restores_the_handlers_it_replaced(caller: CallerHandlers) -> None:
    before = signals.current()
    request = StopRequest().install()
    assert not any(signal.getsignal(sig) is caller for sig in REPLACED)
    assert signals.current() is request
    os.kill(os.getpid(), signal.SIGTERM)
    assert request.requested and request.signal_name == "SIGTERM" and caller.received == []
    request.restore()
    assert caller.in_place()
    assert signals.current() is before
    os.kill(os.getpid(), signal.SIGUSR1)
    assert caller.received == [signal.SIGUSR1]  # the caller's handler answers again


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()], ids=["exception", "ctrl-c"])
def test_session_closes_the_reporter_and_restores_handlers_on_errors(
    tmp_path: Path, caller: CallerHandlers, opened: Opened, error: BaseException
) -> None:
    run = create_run_dir(tmp_path / "runs", "session")
    with pytest.raises(type(error)), training_session(run, console=False) as session:
        assert isinstance(session.stop, StopRequest) and signals.current() is session.stop
        assert not caller.in_place()
        session.reporter.event("warning", message="written before the error")
        raise error
    assert opened.all_closed()
    assert caller.in_place()
    assert signals.current() is None
    assert [e["message"] for e in _events(run, "warning")] == ["written before the error"]


def test_session_with_the_callers_stop_flag_installs_nothing(
    tmp_path: Path, caller: CallerHandlers, opened: Opened
) -> None:
    flag = llm_helpers.StopAfter(1)
    with training_session(create_run_dir(tmp_path / "runs", "own-flag"), stop=flag) as session:
        assert session.stop is flag
        assert caller.in_place()
    assert opened.all_closed()


# --- the SD trainer ---------------------------------------------------------------------------------------


def _sd_job(tiny_sd15: Path, tmp_path: Path, max_steps: int):
    data = sd_helpers.make_image_dataset(tmp_path / "data", 2)
    config = sd_helpers.seed_like_config(
        tmp_path, tiny_sd15, data, batch_size=1, max_steps=max_steps, save_steps=None
    )
    resolved = load_config(config)
    resolved.config.model_family = resolved.family
    return WorkerJob(
        create_run_dir(Path(resolved.config.runs_dir), resolved.config.name), resolved, None, False
    )


def test_sd_run_puts_handlers_back_and_closes_the_reporter(
    tiny_sd15: Path, tmp_path: Path, caller: CallerHandlers, opened: Opened
) -> None:
    job = _sd_job(tiny_sd15, tmp_path, max_steps=1)
    assert train_sd(job) == "finished"
    assert caller.in_place()
    assert len(opened.reporters) == 1 and opened.all_closed()
    assert _events(job.run, "run_finished")


def test_sd_run_whose_loop_raises_still_closes_everything(
    tiny_sd15: Path, tmp_path: Path, caller: CallerHandlers, opened: Opened, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = _sd_job(tiny_sd15, tmp_path, max_steps=3)
    _step_then(monkeypatch, 1, _raise)
    with pytest.raises(RuntimeError, match="injected failure"):
        train_sd(job)
    assert caller.in_place()
    assert opened.all_closed()
    assert not _events(job.run, "run_finished")


def test_sd_run_stopped_by_sigint_checkpoints_and_closes_everything(
    tiny_sd15: Path, tmp_path: Path, caller: CallerHandlers, opened: Opened, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = _sd_job(tiny_sd15, tmp_path, max_steps=3)
    _step_then(monkeypatch, 1, _send_sigint)
    assert train_sd(job) == "stopped"
    assert caller.received == []  # the run's StopRequest took the signal, not the caller's handler
    assert [e["reason"] for e in _events(job.run, "run_stopped")] == ["SIGINT"]
    assert job.run.latest_checkpoint().name == "step-1"
    assert caller.in_place()
    assert opened.all_closed()


# --- the LLM trainer (in-process, as the text demo runs it) ---------------------------------------------------


def _llm_job(tiny_llama: Path, tmp_path: Path, max_steps: int):
    data = llm_helpers.write_jsonl(tmp_path / "data" / "qa.jsonl", llm_helpers.records("prompt_response", 8))
    return llm_helpers.make_job(llm_helpers.make_config(tiny_llama, data, tmp_path, max_steps=max_steps))


def test_llm_run_puts_handlers_back_and_closes_the_reporter(
    tiny_llama: Path, tmp_path: Path, caller: CallerHandlers, opened: Opened
) -> None:
    job = _llm_job(tiny_llama, tmp_path, max_steps=2)
    assert run_training(job, console=False).state == "finished"
    assert caller.in_place()
    assert len(opened.reporters) == 1 and opened.all_closed()
    assert _events(job.run, "run_finished")


def test_llm_run_whose_loop_raises_still_closes_everything(
    tiny_llama: Path, tmp_path: Path, caller: CallerHandlers, opened: Opened, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = _llm_job(tiny_llama, tmp_path, max_steps=3)
    _step_then(monkeypatch, 1, _raise)
    with pytest.raises(RuntimeError, match="injected failure"):
        run_training(job, console=False)
    assert caller.in_place()
    assert opened.all_closed()
    assert not _events(job.run, "run_finished")


def test_llm_run_stopped_by_sigint_checkpoints_and_closes_everything(
    tiny_llama: Path, tmp_path: Path, caller: CallerHandlers, opened: Opened, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = _llm_job(tiny_llama, tmp_path, max_steps=3)
    _step_then(monkeypatch, 1, _send_sigint)
    result = run_training(job, console=False)
    assert result.state == "stopped" and result.step == 1
    assert caller.received == []
    assert [e["reason"] for e in _events(job.run, "run_stopped")] == ["SIGINT"]
    assert job.run.latest_checkpoint().name == "step-1"
    assert caller.in_place()
    assert opened.all_closed()


# --- the demos, which train in-process -----------------------------------------------------------------------


class PlainConsole:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def print(self, text: object = "", **_: object) -> None:
        self.lines.append(str(text))


def test_text_demo_closes_its_reporter_and_gives_back_ctrl_c(
    tmp_path: Path, tiny_llama: Path, caller: CallerHandlers, opened: Opened
) -> None:
    from loratui.demo.text_demo import run_demo

    shutil.copytree(tiny_llama, tmp_path / "models" / "tiny-llama")  # reused: same build settings
    assert run_demo(tmp_path, steps=2, console=PlainConsole()) == 0
    assert len(opened.reporters) == 1 and opened.all_closed()
    assert caller.in_place()


def test_image_demo_closes_its_reporter_and_gives_back_ctrl_c(
    tmp_path: Path, caller: CallerHandlers, opened: Opened
) -> None:
    from loratui.demo.image_demo import run_demo

    assert run_demo(tmp_path, steps=2, console=PlainConsole()) == 0
    assert len(opened.reporters) == 1 and opened.all_closed()
    assert caller.in_place()


def test_demo_command_names_the_extra_for_a_missing_optional_package(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import loratui.demo.text_demo as text_demo
    from loratui.cli.app import app

    def needs_bitsandbytes(*_args: object, **_kwargs: object) -> int:
        raise ModuleNotFoundError("No module named 'bitsandbytes'", name="bitsandbytes")

    monkeypatch.setattr(text_demo, "run_demo", needs_bitsandbytes)
    result = CliRunner().invoke(app, ["demo", "--task", "text"])
    assert result.exit_code == 2
    assert 'pip install "loratui[quant]"' in result.output and "not implemented" not in result.output


def test_demo_command_raises_other_import_errors_as_they_are(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from typer.testing import CliRunner

    from loratui.cli.app import app

    monkeypatch.setitem(sys.modules, "loratui.demo.image_demo", None)  # importing it fails
    result = CliRunner().invoke(app, ["demo", "--task", "image"])
    assert isinstance(result.exception, ModuleNotFoundError)
    assert result.exception.name == "loratui.demo.image_demo"
    assert "not implemented" not in result.output
