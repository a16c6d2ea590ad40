"""`loratui stop` on real detached runs of the tiny LLM, and liveness that does not trust a bare pid."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from llm_helpers import make_config, records, write_jsonl
from typer.testing import CliRunner

from loratui.cli.app import app
from loratui.config import ResolvedConfig
from loratui.runs.events import read_events
from loratui.runs.liveness import pid_alive, process_start_time
from loratui.runs.rundir import create_run_dir, list_runs
from loratui.runs.status import RunStatus, effective_state
from loratui.train.process.launch import prepare_run, start_worker

TIMEOUT_S = 180


# --- liveness ---------------------------------------------------------------------------------------------


def test_a_reused_pid_reads_as_not_running(tmp_path: Path) -> None:
    me = os.getpid()
    mine = process_start_time(me)
    assert mine is not None and process_start_time(me) == mine  # stable for one process
    assert effective_state(RunStatus(state="running", pid=me, pid_started=mine)) == ("running", "")
    # the pid is alive but belongs to another process than the one that wrote status.json
    stale = RunStatus(state="running", pid=me, pid_started=mine + "0")
    assert effective_state(stale) == ("failed", "worker exited without finishing")

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = process_start_time(other.pid)
        assert started is not None and started != mine
        assert pid_alive(other.pid, started) and not pid_alive(other.pid, mine)
        # what `loratui runs` shows for a status.json whose pid another live process now holds
        run = create_run_dir(tmp_path, "reused")
        data = {"state": "running", "pid": other.pid, "pid_started": mine, "step": 3}
        run.status_path.write_text(json.dumps(data))
        assert list_runs(tmp_path)[0].state == "failed"
        run.status_path.write_text(json.dumps({**data, "pid_started": started}))
        assert list_runs(tmp_path)[0].state == "running"
    finally:
        other.kill()
        other.wait()
    assert not pid_alive(other.pid, started)


def test_status_written_by_a_process_records_its_start_time(tmp_path: Path) -> None:
    run = create_run_dir(tmp_path, "r")
    RunStatus(state="running", pid=os.getpid()).write(run.status_path)
    assert RunStatus.read(run.status_path).pid_started == process_start_time(os.getpid())
    RunStatus(state="running", pid=1).write(run.status_path)  # another process's pid: not stamped with ours
    assert RunStatus.read(run.status_path).pid_started is None


# --- loratui stop --------------------------------------------------------------------------------------------


def _start(tmp_path: Path, tiny_llama: Path) -> tuple:
    data = write_jsonl(tmp_path / "data" / "qa.jsonl", records("prompt_response", 8))
    cfg = make_config(tiny_llama, data, tmp_path, max_steps=400, batch_size=2)
    run, _ = prepare_run(ResolvedConfig(cfg, {}, "llm"), resume=None, overwrite=False)
    return run, start_worker(run)


def _wait_for_a_step(run, supervisor: subprocess.Popen) -> None:
    deadline = time.time() + TIMEOUT_S
    while not any(e["type"] == "step" for e in read_events(run.events_path)):
        assert supervisor.poll() is None, (run.path / "worker.log").read_text(errors="replace")[-3000:]
        assert time.time() < deadline, "timed out waiting for the first step"
        time.sleep(0.1)


def _kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def _stop(*args: str):
    return CliRunner().invoke(app, ["stop", *args])


def test_stop_checkpoints_a_detached_run(tmp_path: Path, tiny_llama: Path, subprocess_env) -> None:
    runs = str(tmp_path / "runs")
    assert _stop("--runs-dir", runs).exit_code == 2  # nothing running
    run, supervisor = _start(tmp_path, tiny_llama)
    try:
        _wait_for_a_step(run, supervisor)
        status = RunStatus.read(run.status_path)
        assert status.pid != supervisor.pid and status.pid_started == process_start_time(status.pid)
        assert effective_state(status)[0] == "running"  # the real worker, with its own start time
        assert _stop("no-such-run", "--runs-dir", runs).exit_code == 2
        result = _stop("--runs-dir", runs, "--timeout", str(TIMEOUT_S))  # the latest running run
        code = supervisor.wait(timeout=30)
    finally:
        _kill_group(supervisor)
    log = (run.path / "worker.log").read_text(errors="replace")[-3000:]
    assert result.exit_code == 0, result.output + log
    assert f"run {run.name} stopped" in result.output and code == 130
    assert RunStatus.read(run.status_path).state == "stopped"
    checkpoint = run.latest_checkpoint()
    assert checkpoint is not None and int(checkpoint.name.split("-")[1]) < 400
    assert read_events(run.events_path)[-1]["type"] == "run_stopped"
    assert _stop(run.name, "--runs-dir", runs).exit_code == 2  # no longer running


def test_stop_that_runs_out_of_time_says_the_run_is_still_running(tmp_path: Path) -> None:
    """A run that does not end within --timeout (here a worker that ignores SIGTERM): exit 1, still running."""
    stubborn = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)",
        ]
    )
    try:
        time.sleep(0.3)  # the SIGTERM handler is in place
        run = create_run_dir(tmp_path / "runs", "stubborn")
        status = RunStatus(
            state="running", pid=stubborn.pid, pid_started=process_start_time(stubborn.pid), step=3
        )
        status.write(run.status_path)
        result = _stop(run.name, "--runs-dir", str(tmp_path / "runs"), "--timeout", "0.5")
        assert result.exit_code == 1 and "still running" in result.output, result.output
        assert stubborn.poll() is None  # asked, not killed
        assert RunStatus.read(run.status_path).state == "running"
    finally:
        stubborn.kill()
        stubborn.wait()


def test_stop_now_kills_the_run_without_a_checkpoint(
    tmp_path: Path, tiny_llama: Path, subprocess_env
) -> None:
    run, supervisor = _start(tmp_path, tiny_llama)
    try:
        _wait_for_a_step(run, supervisor)
        worker = RunStatus.read(run.status_path).pid
        result = _stop(str(run.path), "--now", "--runs-dir", str(tmp_path / "runs"))
        code = supervisor.wait(timeout=30)
    finally:
        _kill_group(supervisor)
    assert result.exit_code == 0, result.output
    assert code == -signal.SIGKILL and not pid_alive(worker)
    status = RunStatus.read(run.status_path)
    assert status.state == "stopped" and "no checkpoint written" in status.message
    assert effective_state(status)[0] == "stopped"
    last = read_events(run.events_path)[-1]
    assert last["type"] == "run_stopped" and last["checkpoint_written"] is False
    assert run.latest_checkpoint() is None  # save_steps is off: nothing was saved


def test_stop_help_names_the_exit_codes() -> None:
    result = CliRunner().invoke(app, ["stop", "--help"])
    assert result.exit_code == 0
    for line in ("0  the run stopped as asked", "1  it did not stop", "2  no such run", "--now", "--timeout"):
        assert line in result.output
