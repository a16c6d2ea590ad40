"""The training view (attach / train on a TTY): replay, live updates, signals, detach, two viewers."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loratui.gpu.fake_nvml import EXAMPLE_SPEC
from loratui.tui.messages import ControlSent, RunProgress
from loratui.tui.run_model import RunModel
from loratui.tui.testing import (
    T0,
    distinct,
    run_async,
    screen_text,
    synthetic_events,
    wait_for,
    write_synthetic_run,
)
from loratui.tui.training_app import TrainingApp

SIZE = (80, 24)

# A stand-in worker: records SIGUSR1 / SIGINT in files, like loratui.train.loop.signals would flag them.
FAKE_WORKER = """
import pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])
signal.signal(signal.SIGUSR1, lambda *a: (out / "usr1").write_text("1"))
signal.signal(signal.SIGINT, lambda *a: (out / "int").write_text("1"))
(out / "ready").write_text("1")
time.sleep(60)
"""


@pytest.fixture
def fake_nvml(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "nvml.json"
    path.write_text(json.dumps(EXAMPLE_SPEC))
    monkeypatch.setenv("LORATUI_FAKE_NVML", str(path))
    return path


@pytest.fixture
def worker(tmp_path):
    """A live process standing in for the training worker (its pid goes into status.json)."""
    marks = tmp_path / "marks"
    marks.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", FAKE_WORKER, str(marks)], start_new_session=True)
    deadline = time.time() + 20
    while not (marks / "ready").exists() and time.time() < deadline:
        time.sleep(0.05)
    yield proc, marks
    proc.kill()
    proc.wait()


def test_run_model_folds_events_into_a_view() -> None:
    model = RunModel("demo", total_epochs=5)
    model.feed(synthetic_events(steps=120, total_steps=200, oom_at=50))
    view = model.view()
    assert (view.step, view.total_steps, view.epoch) == (120, 200, 3)
    assert view.checkpoint == "runs/demo/checkpoints/step-100" and view.samples[-1].endswith("step-120-0.png")
    assert [o.recovered for o in view.ooms] == [False, True]
    assert view.ooms[0].change == "batch_size 4 → 2, gradient_accumulation_steps 1 → 2"
    assert view.eta_s == pytest.approx(80 * 2.0)  # 80 steps left at 2 s per step (from event times)
    assert len(view.loss_series) == 120 and view.smoothed_loss is not None
    model.feed([{"type": "run_finished", "time": T0 + 500, "step": 120}])
    assert model.view().ended and model.view().eta_s == 0.0


@run_async
async def test_replays_history_and_follows_live_events(tmp_path, fake_nvml, worker) -> None:
    proc, _ = worker
    run = write_synthetic_run(tmp_path / "runs" / "demo-20261121-120000", pid=proc.pid)
    seen: list = []
    app = TrainingApp(run, telemetry_interval=0, poll_interval=0.05)
    async with app.run_test(size=SIZE, message_hook=seen.append) as pilot:
        await wait_for(pilot, lambda: any(isinstance(m, RunProgress) for m in seen))
        await pilot.pause(0.1)
        text = screen_text(app)
        assert "run demo-20261121-120000 · running" in text
        assert "120/200 · epoch 3/5" in text
        assert "OOM        2× batch 4→2, accum 1→2" in text
        assert "checkpoints/step-100" in text
        assert "5.1 GiB of 24.0 GiB" in text and "util 37% · 61°C" in text
        log_lines = [line.text for line in app.screen.query_one("RunLog").lines]
        assert any(line.startswith("recovered at step 50: batch_size 4 → 2") for line in log_lines)
        with (run / "events.jsonl").open("a") as handle:
            handle.write(
                json.dumps(
                    {
                        "type": "step",
                        "time": T0 + 300,
                        "step": 121,
                        "epoch": 3,
                        "loss": 0.07,
                        "lr": 1e-4,
                        "samples_per_s": 2.5,
                    }
                )
                + "\n"
            )
        await wait_for(pilot, lambda: "121/200" in screen_text(app))
        assert "2.50 samples/s" in screen_text(app)


@run_async
async def test_keys_send_signals_to_the_worker_and_d_detaches(tmp_path, fake_nvml, worker) -> None:
    proc, marks = worker
    run = write_synthetic_run(tmp_path / "run", pid=proc.pid)
    seen: list = []
    app = TrainingApp(run, telemetry_interval=0, poll_interval=0.05)
    async with app.run_test(size=SIZE, message_hook=seen.append) as pilot:
        await wait_for(pilot, lambda: app.screen.view is not None)
        await pilot.press("s")
        await wait_for(pilot, lambda: (marks / "usr1").exists())
        await pilot.press("c")
        assert type(app.screen).__name__ == "ConfirmScreen"
        await pilot.press("n")
        assert not (marks / "int").exists()
        await pilot.press("c", "y")
        await wait_for(pilot, lambda: (marks / "int").exists())
        await pilot.press("question_mark")
        assert "detach: close this view" in screen_text(app)
        await pilot.press("escape", "d")
    controls = [(m.action, m.delivered) for m in distinct(seen, ControlSent)]
    assert controls == [("checkpoint", True), ("stop", True), ("detach", True)]
    assert app.return_code == 0
    assert proc.poll() is None  # detaching never stops training


@run_async
async def test_finished_run_shows_export_and_usage(tmp_path, fake_nvml) -> None:
    run = write_synthetic_run(tmp_path / "run", steps=200, finished=True)
    app = TrainingApp(run, telemetry_interval=0, poll_interval=0.05)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.screen.view is not None and app.screen.view.ended)
        await pilot.pause(0.1)
        text = screen_text(app)
        assert "Exported: output/my_style/my_style.safetensors" in text
        assert "<lora:my_style:0.8>" in text
        await pilot.press("s")  # hidden once the run ended: nothing is sent
        await pilot.press("q")
    assert app.return_code == 0


@run_async
async def test_two_viewers_watch_one_run(tmp_path, fake_nvml, worker) -> None:
    proc, _ = worker
    run = write_synthetic_run(tmp_path / "run", pid=proc.pid)
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    first = TrainingApp(run, telemetry_interval=0, poll_interval=0.05)
    second = TrainingApp(run, telemetry_interval=0, poll_interval=0.05)
    async with first.run_test(size=SIZE) as one, second.run_test(size=(120, 40)) as two:
        await wait_for(one, lambda: first.screen.view is not None)
        await wait_for(two, lambda: second.screen.view is not None)
        with (run / "events.jsonl").open("a") as handle:
            handle.write(json.dumps({"type": "step", "time": T0 + 300, "step": 121, "loss": 0.07}) + "\n")
        await wait_for(one, lambda: first.screen.view.step == 121)
        await wait_for(two, lambda: second.screen.view.step == 121)
        await one.press("d")
        await asyncio.sleep(0)
    after = {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.name != "events.jsonl"}
    assert after == {k: v for k, v in before.items() if k != "events.jsonl"}  # viewers only read
    assert os.path.exists(run / "status.json")


def test_one_run_on_several_gpus_shows_each_gpus_memory() -> None:
    from loratui.runs.follow import format_event
    from loratui.tui.widgets.run_stats import stats_lines

    gib = 2**30
    events = synthetic_events(steps=3, total_steps=10)
    events[0].update(processes=2, batch_size_per_device=2, global_batch=4)
    events.append(
        {
            "type": "step",
            "time": T0 + 10,
            "step": 4,
            "epoch": 0,
            "loss": 0.5,
            "lr": 1e-4,
            "samples_per_s": 8.0,
            "rank_memory": [int(3.1 * gib), int(3.0 * gib)],
            "rank_memory_kind": "gpu",
        }
    )
    model = RunModel("demo")
    model.feed(events)
    view = model.view()
    assert view.processes == 2 and view.rank_memory == (int(3.1 * gib), int(3.0 * gib))
    rows = dict(stats_lines(view))
    assert rows["per GPU"] == "0: 3.1 GiB · 1: 3.0 GiB"
    assert "per GPU" not in dict(stats_lines(RunModel("single").view()))  # one process: no extra row
    assert "2 processes, batch_size 2 per GPU, 4 samples per step" in format_event(events[0])
    assert format_event(events[-1]).endswith("per GPU 3174 MiB/3072 MiB")


@run_async
async def test_training_view_lists_per_gpu_memory(tmp_path, fake_nvml, worker) -> None:
    proc, _ = worker
    run = write_synthetic_run(tmp_path / "runs" / "demo-20261121-120000", pid=proc.pid)
    step = {
        "type": "step",
        "time": T0 + 300,
        "step": 121,
        "epoch": 2,
        "loss": 0.4,
        "lr": 1e-4,
        "samples_per_s": 8.0,
        "rank_memory": [5 * 2**30, 4 * 2**30],
        "rank_memory_kind": "gpu",
    }
    with (run / "events.jsonl").open("a") as handle:
        handle.write(json.dumps(step) + "\n")
    app = TrainingApp(run, telemetry_interval=0, poll_interval=0.05)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: "per GPU" in screen_text(app))
        assert "0: 5.0 GiB · 1: 4.0 GiB" in screen_text(app)


def _with_evals(events: list[dict], every: int) -> list[dict]:
    """Insert an `eval` event (validation loss) after every `every`-th step event."""
    out = []
    for event in events:
        out.append(event)
        step = event.get("step")
        if event["type"] == "step" and step % every == 0:
            out.append({"type": "eval", "time": event["time"], "step": step, "eval_loss": 0.5 + 10 / step})
    return out


def test_run_model_places_eval_losses_along_the_loss_curve() -> None:
    model = RunModel("demo")
    model.feed(_with_evals(synthetic_events(steps=100, total_steps=200), every=25))
    view = model.view()
    assert [round(x, 3) for x, _ in view.eval_points] == [round(s / 99, 3) for s in (24, 49, 74, 99)]
    assert [v for _, v in view.eval_points] == pytest.approx([0.9, 0.7, 0.5 + 10 / 75, 0.6])
    assert view.eval_loss == pytest.approx(0.6)
    assert RunModel("plain").view().eval_points == ()


@run_async
async def test_loss_chart_draws_the_validation_loss_beside_the_training_loss(tmp_path, fake_nvml) -> None:
    from loratui.tui.chart import plot
    from loratui.tui.widgets.loss_chart import LossChart

    run = write_synthetic_run(tmp_path / "run", steps=100, finished=True)
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in _with_evals(events, 20)))
    app = TrainingApp(run, telemetry_interval=0, poll_interval=0.05)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: app.screen.view is not None and app.screen.view.ended)
        await pilot.pause(0.1)
        chart = app.screen.query_one("#loss", LossChart)
        assert len(chart.evals) == 5
        assert "validation 0.6" in str(chart.border_subtitle)
        drawn = plot([chart.raw, chart.smoothed], 40, 10, points=chart.evals)
        assert any(2 in row for row in drawn.owner)  # the validation line owns cells of the chart
        assert "validation" in screen_text(app)
        await pilot.press("q")
