"""Run directory contract: writer/reader (partial lines, rotation), status, listing, lookup."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from typer.testing import CliRunner

from loratui.cli.app import app
from loratui.runs import EventReader, EventWriter, RunStatus, create_run_dir, find_run, list_runs, read_events
from loratui.runs.status import effective_state, pid_alive


def test_create_run_dir_layout_and_unique_names(tmp_path) -> None:
    first = create_run_dir(tmp_path, "my style/lora", now=1_700_000_000)
    second = create_run_dir(tmp_path, "my style/lora", now=1_700_000_000)
    assert first.path != second.path and first.name.startswith("my-style-lora-")
    for sub in ("checkpoints", "logs", "samples"):
        assert (first.path / sub).is_dir()


def test_writer_flushes_each_event_and_cleans_values(tmp_path) -> None:
    path = tmp_path / "events.jsonl"
    with EventWriter(path) as writer:
        writer.write("step", 1, loss=float("nan"), path=tmp_path)
        # readable before close: flushed per event
        assert json.loads(path.read_text().splitlines()[0])["loss"] == "nan"
    event = read_events(path)[0]
    assert event["type"] == "step" and event["step"] == 1 and event["path"] == str(tmp_path)
    assert isinstance(event["time"], float)


def test_reader_keeps_partial_last_line(tmp_path) -> None:
    path = tmp_path / "events.jsonl"
    reader = EventReader(path)
    assert reader.poll() == []
    with path.open("w") as handle:
        handle.write('{"type": "step", "step": 1}\n{"type": "st')
        handle.flush()
        assert [e["step"] for e in reader.poll()] == [1]
        handle.write('ep", "step": 2}\n')
        handle.flush()
        assert [e["step"] for e in reader.poll()] == [2]
        assert reader.poll() == []


def test_reader_skips_corrupt_lines_and_follows_rotation(tmp_path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"type": "a", "step": 1}\nnot json\n{"type": "b", "step": 2}\n')
    reader = EventReader(path)
    assert [e["type"] for e in reader.poll()] == ["a", "b"] and reader.bad_lines == 1
    replacement = tmp_path / "new.jsonl"
    replacement.write_text('{"type": "c", "step": 9}\n')
    os.replace(replacement, path)  # rotated: a new file under the same name
    assert [e["type"] for e in reader.poll()] == ["c"]
    path.write_text("")  # truncated
    assert reader.poll() == []
    path.write_text('{"type": "d"}\n')
    assert [e["type"] for e in reader.poll()] == ["d"]


def test_reader_tails_a_writer_in_another_process(tmp_path) -> None:
    path = tmp_path / "events.jsonl"
    code = (
        "import sys, time; from loratui.runs import EventWriter\n"
        "w = EventWriter(sys.argv[1])\n"
        "for i in range(50):\n    w.write('step', i, loss=i * 0.1); time.sleep(0.002)\n"
        "w.write('run_finished', 50)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)])
    reader = EventReader(path)
    seen = list(reader.follow(interval=0.01, stop=lambda: proc.poll() is not None))
    proc.wait()
    seen += reader.poll()
    assert [e["step"] for e in seen if e["type"] == "step"] == list(range(50))
    assert seen[-1]["type"] == "run_finished"


def test_status_roundtrip_and_dead_worker_is_failed(tmp_path) -> None:
    run = create_run_dir(tmp_path, "r")
    run.write_status(RunStatus(state="running", pid=os.getpid(), step=5, total_steps=10))
    status = run.status()
    assert status.step == 5 and status.progress == 0.5
    assert effective_state(status) == ("running", "")
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not pid_alive(proc.pid)
    run.write_status(RunStatus(state="running", pid=proc.pid))
    state, note = effective_state(run.status())
    assert state == "failed" and "exited" in note


def test_list_and_find_runs_and_cli(tmp_path) -> None:
    old = create_run_dir(tmp_path, "alpha", now=1_600_000_000)
    old.write_status(RunStatus(state="finished", step=10, total_steps=10, started_at=1.0))
    old.event_writer().write("run_finished", 10)
    new = create_run_dir(tmp_path, "beta", now=1_700_000_000)
    new.write_status(RunStatus(state="stopped", step=3, total_steps=10, started_at=2.0))
    new.event_writer().write("run_stopped", 3)
    summaries = list_runs(tmp_path)
    assert [s.run.name for s in summaries] == [new.name, old.name]
    assert [s.state for s in summaries] == ["stopped", "finished"]
    assert find_run(tmp_path, None) == new and find_run(tmp_path, "alpha") == old
    assert find_run(tmp_path, str(old.path)) == old and find_run(tmp_path, "zzz") is None
    result = CliRunner().invoke(app, ["runs", "--runs-dir", str(tmp_path), "--json"])
    rows = json.loads(result.output)
    assert result.exit_code == 0 and rows[0]["state"] == "stopped" and rows[1]["step"] == 10
    table = CliRunner().invoke(app, ["runs", "--runs-dir", str(tmp_path)], env={"COLUMNS": "200"})
    assert "finished" in table.output and "3/10" in table.output
    empty = CliRunner().invoke(app, ["runs", "--runs-dir", str(tmp_path / "none")])
    assert empty.exit_code == 0 and "No runs" in empty.output


def test_attach_replays_history_of_a_finished_run(tmp_path) -> None:
    run = create_run_dir(tmp_path, "done")
    run.write_status(RunStatus(state="finished", step=2, total_steps=2))
    with run.event_writer() as events:
        events.write("run_started", 0, total_steps=2)
        events.write("step", 1, epoch=0, loss=0.5, lr=1e-4, samples_per_s=3.0)
        events.write("step", 2, epoch=0, loss=0.25, lr=1e-4, samples_per_s=3.0)
        events.write("export", 2, path="out/x.safetensors", usage="<lora:x:0.8>")
        events.write("run_finished", 2)
    result = CliRunner().invoke(app, ["attach", "--runs-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for text in ("step 1", "loss 0.2500", "exported: out/x.safetensors", "<lora:x:0.8>", "finished"):
        assert text in result.output
    missing = CliRunner().invoke(app, ["attach", "nope", "--runs-dir", str(tmp_path)])
    assert missing.exit_code == 2


def test_attach_stops_when_worker_is_gone(tmp_path) -> None:
    run = create_run_dir(tmp_path, "dead")
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    run.write_status(RunStatus(state="running", pid=proc.pid))
    run.event_writer().write("step", 1, epoch=0, loss=1.0, lr=1e-4)
    result = CliRunner().invoke(app, ["attach", "--runs-dir", str(tmp_path)])
    assert result.exit_code == 0 and "run is failed" in result.output
