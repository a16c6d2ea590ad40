"""The supervisor with real processes: a worker killed with SIGKILL is restarted from its last checkpoint and
the run finishes with the planned number of steps; a deliberate stop is not restarted."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from llm_helpers import make_config, records, write_jsonl

from loratui.config import ResolvedConfig
from loratui.runs.config_file import read_run_config, write_run_config
from loratui.runs.events import read_events
from loratui.runs.launch_file import LaunchSpec, read_launch, write_launch
from loratui.train.process.launch import prepare_run, start_worker

TIMEOUT_S = 240


def _kill_group(process: subprocess.Popen) -> None:
    """Kill whatever is left of the supervisor's process group (it leads its own session: pgid == pid)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def _wait_for(condition, deadline: float, what: str, process: subprocess.Popen) -> None:
    while not condition():
        assert process.poll() is None or condition(), (
            f"supervisor exited ({process.returncode}) before {what}"
        )
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _start(tmp_path: Path, tiny_llama: Path, **overrides) -> tuple:
    data = write_jsonl(tmp_path / "data" / "qa.jsonl", records("prompt_response", 8))
    cfg = make_config(tiny_llama, data, tmp_path, **overrides)
    run, _ = prepare_run(ResolvedConfig(cfg, {}, "llm"), resume=None, overwrite=False)
    return run, start_worker(run)


def test_sigkilled_worker_is_restarted_from_its_checkpoint(tmp_path, tiny_llama, subprocess_env) -> None:
    steps = 40
    run, supervisor = _start(tmp_path, tiny_llama, max_steps=steps, save_steps=4, batch_size=2)
    deadline = time.time() + TIMEOUT_S
    try:
        _wait_for(
            lambda: (run.checkpoints_dir / "step-8").is_dir(), deadline, "checkpoint step-8", supervisor
        )
        worker_pid = json.loads(run.status_path.read_text())["pid"]
        assert worker_pid != supervisor.pid
        os.kill(worker_pid, signal.SIGKILL)
        code = supervisor.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        _kill_group(supervisor)
    events = read_events(run.events_path)
    log = (run.path / "worker.log").read_text(errors="replace")
    assert code == 0, log[-3000:]
    restarts = [e for e in events if e["type"] == "warning" and e.get("restart")]
    assert len(restarts) == 1 and "SIGKILL" in restarts[0]["message"], restarts
    resumed_from = int(Path(restarts[0]["resume_from"]).name.split("-")[1])
    assert resumed_from >= 8
    finished = [e for e in events if e["type"] == "run_finished"]
    assert len(finished) == 1 and finished[0]["step"] == steps
    step_events = [e["step"] for e in events if e["type"] == "step"]
    second = step_events[len(step_events) - (steps - resumed_from) :]
    assert second == list(range(resumed_from + 1, steps + 1))  # continued right after the checkpoint
    assert set(step_events) == set(range(1, steps + 1))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads(run.status_path.read_text())["state"] == "finished"


@pytest.mark.slow
def test_deliberate_stop_is_not_restarted(tmp_path, tiny_llama, subprocess_env) -> None:
    run, supervisor = _start(tmp_path, tiny_llama, max_steps=400, batch_size=2)
    deadline = time.time() + TIMEOUT_S
    try:
        _wait_for(
            lambda: any(e["type"] == "step" for e in read_events(run.events_path)),
            deadline,
            "a step",
            supervisor,
        )
        supervisor.send_signal(signal.SIGINT)  # what `loratui train`'s Ctrl-C does
        code = supervisor.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        _kill_group(supervisor)
    events = read_events(run.events_path)
    assert code == 130
    assert [e["type"] for e in events].count("run_started") == 1
    assert not any(e["type"] == "warning" and e.get("restart") for e in events)
    assert events[-1]["type"] == "run_stopped" and run.latest_checkpoint() is not None


# --- the supervisor's decisions, with a scripted stand-in for the worker (fast) ------------------------------

FAKE_WORKER = r"""
import json, os, signal, sys
run = sys.argv[1]
with open(os.path.join(run, "plan.json")) as handle:
    plan = json.load(handle)
call = plan["calls"]
plan["calls"] += 1
with open(os.path.join(run, "plan.json"), "w") as handle:
    json.dump(plan, handle)
action, step = plan["actions"][call]
with open(os.path.join(run, "status.json")) as handle:
    status = json.load(handle)
status.update(pid=os.getpid(), step=step, state="running")
with open(os.path.join(run, "status.json"), "w") as handle:
    json.dump(status, handle)
def event(kind, **fields):
    with open(os.path.join(run, "events.jsonl"), "a") as handle:
        handle.write(json.dumps({"type": kind, "step": step, **fields}) + "\n")
event("run_started")
if action == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
codes = {"restart": 75, "finish": 0, "stopped": 130, "fail": 1, "crash": 1}
if action in ("finish", "stopped", "fail"):
    event({"finish": "run_finished", "stopped": "run_stopped", "fail": "run_failed"}[action])
sys.exit(codes[action])
"""


class _ScriptedSupervisor:
    """A `Supervisor` whose workers follow `actions` [(action, step reached)] one call at a time."""

    @staticmethod
    def make(tmp_path: Path, actions: list[tuple[str, int]], **cfg_values):
        import sys

        from loratui.config import TrainConfig
        from loratui.runs.rundir import create_run_dir
        from loratui.runs.status import RunStatus
        from loratui.train.process.supervisor import Supervisor

        run = create_run_dir(tmp_path / "runs", "scripted")
        cfg = TrainConfig(task_type="text-generation", model_family="llm", batch_size=4, **cfg_values)
        write_run_config(run.path, ResolvedConfig(cfg, {}, "llm"))
        write_launch(run.path, LaunchSpec())
        (run.path / "plan.json").write_text(json.dumps({"calls": 0, "actions": actions}))
        RunStatus().write(run.status_path)

        class Scripted(Supervisor):
            def start_worker(self) -> subprocess.Popen:
                return subprocess.Popen([sys.executable, "-c", FAKE_WORKER, str(self.run.path)])

        return Scripted(run), run


def _calls(run) -> int:
    return json.loads((run.path / "plan.json").read_text())["calls"]


def test_restart_after_kill_and_after_in_process_failure(tmp_path: Path) -> None:
    supervisor, run = _ScriptedSupervisor.make(tmp_path, [("kill", 3), ("restart", 5), ("finish", 9)])
    (run.checkpoints_dir / "step-2").mkdir()
    assert supervisor.supervise() == 0 and _calls(run) == 3
    warnings = [e for e in read_events(run.events_path) if e["type"] == "warning"]
    assert [w["restart"] for w in warnings] == [1, 2]
    assert "SIGKILL" in warnings[0]["message"] and "out-of-memory" in warnings[1]["message"]
    assert str(supervisor.resume_from).endswith("step-2") and warnings[1]["resume_from"].endswith("step-2")
    assert read_launch(run.path).resume_from is None  # launch.json keeps how the run was started


def test_deliberate_stops_and_ordinary_failures_are_not_restarted(tmp_path: Path) -> None:
    for actions, code in (([("stopped", 3)], 130), ([("fail", 3)], 1), ([("crash", 3)], 1)):
        supervisor, run = _ScriptedSupervisor.make(
            tmp_path / str(len(actions)) / str(code), actions + [("finish", 9)]
        )
        assert supervisor.supervise() == code and _calls(run) == 1
    supervisor, run = _ScriptedSupervisor.make(tmp_path / "signal", [("kill", 3), ("finish", 9)])
    supervisor.stop_signal = "SIGINT"  # a stop arrived: the killed worker is not replaced
    assert supervisor.supervise() == 130 and _calls(run) == 0
    assert read_events(run.events_path)[-1]["type"] == "run_stopped"


def test_restarts_are_limited_and_repeated_deaths_lower_the_settings(tmp_path: Path) -> None:
    supervisor, run = _ScriptedSupervisor.make(tmp_path, [("kill", 3)] * 4, oom_max_restarts=2)
    assert supervisor.supervise() == 1 and _calls(run) == 3
    events = read_events(run.events_path)
    assert events[-1]["type"] == "run_failed" and "2 restart(s) are used up" in events[-1]["error"]
    lowered = [e for e in events if e["type"] == "oom"]
    assert len(lowered) == 1 and lowered[0]["new"]["batch_size"] == 2  # died twice at step 3
    assert "batch_size: 2\n" in read_run_config(run.path).to_yaml()  # the next worker's settings (oom.json)
    assert "batch_size: 4\n" in run.config_path.read_text()
    off, run = _ScriptedSupervisor.make(tmp_path / "off", [("kill", 3), ("finish", 4)], oom_recovery=False)
    assert off.supervise() == 1 and _calls(run) == 1
