"""Several training processes on the CPU (gloo) through accelerate's launcher, started by the supervisor.

2 processes x batch b train the same LoRA as 1 process x batch 2b; only rank 0 writes the run; a 2-process
checkpoint resumes on 1 process; a killed rank stops the run with a clear message and a usable checkpoint.
Every run is bounded by a timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from llm_helpers import make_config, make_job, records, write_jsonl
from safetensors.torch import load_file

from loratui.config import ResolvedConfig
from loratui.runs.events import read_events
from loratui.train.process.launch import prepare_run, start_worker
from loratui.train.process.launcher import Processes

TIMEOUT_S = 180


@pytest.fixture()
def subprocess_env(subprocess_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """conftest's worker environment, a short collective timeout, and a hostile default accelerate config."""
    monkeypatch.setenv("LORATUI_COLLECTIVE_TIMEOUT_S", "60")
    # a user's default accelerate config made for another job: our launches must not read it
    hf_home = tmp_path / "hf_home"
    (hf_home / "accelerate").mkdir(parents=True)
    (hf_home / "accelerate" / "default_config.yaml").write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\ngpu_ids: '0'\nmachine_rank: 1\n"
        "num_machines: 3\nnum_processes: 5\nmain_process_ip: 192.0.2.1\nmixed_precision: fp16\n"
    )
    monkeypatch.setenv("HF_HOME", str(hf_home))


def _kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def _start(resolved: ResolvedConfig, processes: int, resume: str | None = None):
    run, _ = prepare_run(resolved, resume=resume, overwrite=False, processes=Processes(processes, cpu=True))
    return run, start_worker(run)


def _finish(run, supervisor: subprocess.Popen) -> int:
    try:
        return supervisor.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill_group(supervisor)
        pytest.fail(f"the 2-process run did not end in {TIMEOUT_S}s; log:\n{_log(run)}")
    return -1


def _wait_until(condition, run, supervisor: subprocess.Popen, deadline: float, what: str) -> None:
    while not condition():
        assert supervisor.poll() is None, _log(run)
        assert time.time() < deadline, f"no {what} in time"
        time.sleep(0.05)


def _log(run) -> str:
    path = run.path / "worker.log"
    return path.read_text(errors="replace")[-4000:] if path.exists() else ""


def _lora(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "lora.safetensors")


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _llm_config(tiny_llama: Path, tmp_path: Path, name: str, **overrides):
    data = write_jsonl(tmp_path / "data" / "qa.jsonl", records("prompt_response", 8))
    values = {"max_steps": 4, "save_steps": 2, "lora_dropout": 0.0, "seed": 3, "learning_rate": 1e-2}
    values.update(overrides)
    return make_config(tiny_llama, data, tmp_path / name, **values)


def test_llm_two_processes_match_one_process_with_twice_the_batch(
    tmp_path, tiny_llama, subprocess_env
) -> None:
    from loratui.train.llm.trainer import run_training

    two = _llm_config(tiny_llama, tmp_path, "two", batch_size=2)
    run, supervisor = _start(ResolvedConfig(two, {}, "llm"), 2)
    assert _finish(run, supervisor) == 0, _log(run)

    events = read_events(run.events_path)
    kinds = [e["type"] for e in events]
    assert kinds.count("run_started") == 1 and kinds.count("run_finished") == 1, kinds  # rank 0 only
    started = next(e for e in events if e["type"] == "run_started")
    assert (started["processes"], started["batch_size_per_device"], started["global_batch"]) == (2, 2, 4)
    assert len(started["rank_pids"]) == 2
    steps = [e for e in events if e["type"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    assert all(len(e["rank_memory"]) == 2 and min(e["rank_memory"]) > 0 for e in steps)
    # checkpoints written once, by rank 0: one folder and one event per save step, nothing half-written
    assert [e["step"] for e in events if e["type"] == "checkpoint"] == [2, 4]
    assert sorted(p.name for p in run.checkpoints_dir.iterdir()) == ["step-2", "step-4"]
    meta = json.loads((run.checkpoints_dir / "step-4" / "meta.json").read_text())
    assert (meta["processes"], meta["global_batch"]) == (2, 4)
    marker = json.loads((Path(two.output_dir) / "loratui_adapter.json").read_text())
    assert (marker["training"]["processes"], marker["training"]["global_batch"]) == (2, 4)

    one = _llm_config(tiny_llama, tmp_path, "one", batch_size=4)
    job = make_job(one)
    assert run_training(job, console=False).state == "finished"
    reference = _lora(job.run.checkpoints_dir / "step-4")
    assert _max_diff(_lora(run.checkpoints_dir / "step-4"), reference) <= 1e-5
    ref_steps = [e for e in read_events(job.run.events_path) if e["type"] == "step"]
    for a, b in zip(steps, ref_steps, strict=True):  # the loss is over all ranks' samples
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)

    # resume the 2-process checkpoint of step 2 with ONE process (batch 2): same global batch, same result
    resumed = make_job(two, resume_from=run.checkpoints_dir / "step-2", run=run)
    two_final = _lora(run.checkpoints_dir / "step-4")
    assert run_training(resumed, console=False).state == "finished"
    assert _max_diff(_lora(run.checkpoints_dir / "step-4"), two_final) <= 1e-5
    notes = [e["message"] for e in read_events(run.events_path) if e["type"] == "warning"]
    assert any("trained on 2 process(es) with 1" in n for n in notes), notes


def test_a_killed_rank_stops_the_run_with_a_usable_checkpoint(tmp_path, tiny_llama, subprocess_env) -> None:
    from loratui.runs.checkpoints import load_checkpoint
    from loratui.train.llm.trainer import run_training

    cfg = _llm_config(tiny_llama, tmp_path, "kill", batch_size=2, max_steps=400, save_steps=3)
    run, supervisor = _start(ResolvedConfig(cfg, {}, "llm"), 2)
    deadline = time.time() + TIMEOUT_S
    try:
        _wait_until(
            lambda: (run.checkpoints_dir / "step-3").is_dir(), run, supervisor, deadline, "checkpoint"
        )
        pids = json.loads(run.status_path.read_text())["extra"]["rank_pids"]
        os.kill(pids[1], signal.SIGKILL)
        code = supervisor.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        if supervisor.poll() is None:
            _kill_group(supervisor)
    assert code == 1, _log(run)
    events = read_events(run.events_path)
    failed = [e for e in events if e["type"] == "run_failed"]
    assert len(failed) == 1, [e["type"] for e in events]
    assert "rank 1" in failed[0]["error"] and "resume with" in failed[0]["error"], failed[0]
    status = json.loads(run.status_path.read_text())
    assert status["state"] == "failed" and "rank 1" in status["message"]
    # rank 0 saved the last completed step; that checkpoint resumes (one process) and finishes
    latest = run.latest_checkpoint()
    assert latest is not None and load_checkpoint(latest).step >= 3
    step = load_checkpoint(latest).step
    job = make_job(cfg.model_copy(update={"max_steps": step + 1}), resume_from=latest, run=run)
    assert run_training(job, console=False).state == "finished"


def test_sd_two_processes_match_one_process_with_twice_the_batch(tmp_path, tiny_sd15, subprocess_env) -> None:
    from sd_helpers import make_image_dataset, make_job, seed_like_config

    from loratui.config import load_config
    from loratui.models.sd.kohya import read_lora_file
    from loratui.train.sd.trainer import train

    # 128 px, as in test_micro_batches_give_the_same_update: at 64 px the tiny UNet amplifies rounding.
    # Learning rate 1e-4: AdamW's first update is about lr x sign(g), so gradient entries near zero turn the
    # rounding of batch-2 vs batch-4 convolutions (grad norms agree to ~3e-7) into weight differences that
    # scale with lr (2e-4 gives 1.1e-5).
    data = make_image_dataset(tmp_path / "data", 8)
    common = {"epochs": 1, "resolution": 128, "save_steps": 1, "lora_dropout": 0.0, "learning_rate": "1e-4"}
    # the 2-process run caches latents on disk, each process encoding half of them (the uncached 1-process
    # run sees the same numbers: a cached latent is the posterior mean, as an uncached one)
    two = seed_like_config(
        tmp_path / "two", tiny_sd15, data, batch_size=2, cache_latents_to_disk=True, **common
    )
    run, supervisor = _start(load_config(two), 2)
    assert _finish(run, supervisor) == 0, _log(run)
    events = read_events(run.events_path)
    cached = [e["message"] for e in events if e["type"] == "info" and "cached latents" in e["message"]]
    assert len(cached) == 1 and cached[0].startswith("cached latents: 4 encoded by this process"), cached
    assert "0 not found on disk" in cached[0]
    assert len(list((tmp_path / "two" / "runs" / ".cache" / "latents").glob("*.safetensors"))) == 8
    assert [e["type"] for e in events].count("run_started") == 1
    assert [e["step"] for e in events if e["type"] == "checkpoint"] == [1, 2]
    assert sorted(p.name for p in run.checkpoints_dir.iterdir()) == ["step-1", "step-2"]
    steps = [e for e in events if e["type"] == "step"]
    assert all(len(e["rank_memory"]) == 2 for e in steps)
    export = next(e for e in events if e["type"] == "export")
    _tensors, meta = read_lora_file(Path(export["path"]))
    assert (meta["ss_batch_size_per_device"], meta["ss_total_batch_size"], meta["ss_num_processes"]) == (
        "2",
        "4",
        "2",
    )

    one = make_job(seed_like_config(tmp_path / "one", tiny_sd15, data, batch_size=4, **common))
    assert train(one) == "finished"
    for a, b in zip(steps, [e for e in read_events(one.run.events_path) if e["type"] == "step"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert _max_diff(_lora(run.checkpoints_dir / "step-2"), _lora(one.run.checkpoints_dir / "step-2")) <= 1e-5

    # the 2-process checkpoint of step 1 resumes on one process (batch 2, two micro-batches per step)
    two_final = _lora(run.checkpoints_dir / "step-2")
    resumed = make_job(two, resume_from=run.checkpoints_dir / "step-1", run=run)
    assert train(resumed) == "finished"
    assert _max_diff(_lora(run.checkpoints_dir / "step-2"), two_final) <= 1e-5


def test_out_of_memory_on_one_rank_only_is_agreed_and_recovered(tmp_path, tiny_llama, subprocess_env) -> None:
    """Rank 0 gets the long rows of step 1 and runs out of memory on a simulated card; rank 1 (short rows)
    does not. Both must abandon the step, take the same rung and finish, with the LoRA of one process."""
    from loratui.train.llm.trainer import run_training
    from loratui.train.loop.plan import StepPlan

    seed, long_text, short_text = 3, "the patient has a fever and a cough " * 5, "rest"
    first = StepPlan(8, 4, 1, 2, seed).samples_for_step(0)
    long_rows = set(first[0::2])  # rank 0's share of step 1 (see batches.shard)
    rows = [{"text": f"{long_text if i in long_rows else short_text} {i}"} for i in range(8)]
    data = write_jsonl(tmp_path / "data" / "text.jsonl", rows)
    only_long = write_jsonl(tmp_path / "long" / "text.jsonl", [{"text": long_text}] * 4)
    common = {"max_steps": 2, "save_steps": 1, "lora_dropout": 0.0, "seed": seed, "max_seq_len": 96}

    def peak(batch: int, accumulation: int) -> int:  # rank 0's first step, metered in one process
        cfg = make_config(
            tiny_llama,
            only_long,
            tmp_path / f"probe{batch}",
            batch_size=batch,
            gradient_accumulation_steps=accumulation,
            simulate_vram="1TiB",
            **common,
        )
        job = make_job(cfg.model_copy(update={"max_steps": 1}))
        run_training(job, console=False)
        return next(e["meter_peak"] for e in read_events(job.run.events_path) if e["type"] == "step")

    whole, split = peak(2, 1), peak(1, 2)
    assert split < whole
    budget = (split + whole) // 2

    cfg = make_config(tiny_llama, data, tmp_path / "two", batch_size=2, simulate_vram=str(budget), **common)
    run, supervisor = _start(ResolvedConfig(cfg, {}, "llm"), 2)
    assert _finish(run, supervisor) == 0, _log(run)
    events = read_events(run.events_path)
    ooms = [(e["step"], e["rung"]) for e in events if e["type"] == "oom"]
    assert ooms == [(1, "micro_batch")], [e["type"] for e in events]
    assert [e["step"] for e in events if e["type"] == "step"] == [1, 2]
    assert [e["type"] for e in events].count("run_finished") == 1

    reference = make_job(make_config(tiny_llama, data, tmp_path / "one", batch_size=4, **common))
    assert run_training(reference, console=False).state == "finished"
    ref = _lora(reference.run.checkpoints_dir / "step-2")
    assert _max_diff(_lora(run.checkpoints_dir / "step-2"), ref) <= 1e-5


def test_a_stop_request_stops_every_rank_after_the_same_step_with_a_checkpoint(
    tmp_path, tiny_llama, subprocess_env
) -> None:
    from loratui.runs.checkpoints import load_checkpoint

    cfg = _llm_config(
        tmp_path=tmp_path, tiny_llama=tiny_llama, name="stop", batch_size=2, max_steps=400, save_steps=1000
    )
    run, supervisor = _start(ResolvedConfig(cfg, {}, "llm"), 2)
    deadline = time.time() + TIMEOUT_S

    def two_steps() -> bool:
        return any(e["type"] == "step" and e["step"] >= 2 for e in read_events(run.events_path))

    try:
        _wait_until(two_steps, run, supervisor, deadline, "step 2")
        supervisor.send_signal(signal.SIGTERM)  # what `loratui` does on Ctrl-C
        code = supervisor.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        if supervisor.poll() is None:
            _kill_group(supervisor)
    assert code == 130, _log(run)
    events = read_events(run.events_path)
    kinds = [e["type"] for e in events]
    assert kinds.count("run_stopped") == 1 and "run_failed" not in kinds, kinds
    stopped = next(e for e in events if e["type"] == "run_stopped")
    last_step = max(e["step"] for e in events if e["type"] == "step")
    assert stopped["step"] == last_step < 400
    latest = run.latest_checkpoint()
    assert latest is not None and load_checkpoint(latest).step == last_step
    assert json.loads(run.status_path.read_text())["state"] == "stopped"
    # the stop went to rank 0 and through the exchange; the launcher was not signalled (it would tear the
    # workers down itself and kill them 30 s later, in the middle of a long save)
    assert "death signal" not in _log(run)


def _fake_launch(tmp_path: Path, script: str):
    """A Supervisor of a 2-process run whose 'launcher' is `script` (python, with RUN = the run directory)."""
    import sys

    from loratui.train.process.supervisor import Supervisor

    cfg = _llm_config_paths(tmp_path)
    run, _ = prepare_run(
        ResolvedConfig(cfg, {}, "llm"), resume=None, overwrite=False, processes=Processes(2, cpu=True)
    )
    supervisor = Supervisor(run)
    code = "import json, pathlib, sys\nRUN = pathlib.Path(sys.argv[1])\n" + script
    supervisor.start_worker = lambda: subprocess.Popen([sys.executable, "-c", code, str(run.path)])
    return run, supervisor


def _llm_config_paths(tmp_path: Path):
    data = write_jsonl(tmp_path / "data" / "qa.jsonl", records("prompt_response", 4))
    return make_config(tmp_path / "no-model", data, tmp_path / "fake", oom_max_restarts=2)


LOG_AND_EVENT = """
def log(line):
    with (RUN / "worker.log").open("a") as f:
        f.write(line + "\\n")
def event(kind, **fields):
    with (RUN / "events.jsonl").open("a") as f:
        f.write(json.dumps({"type": kind, "step": None, "time": 0, **fields}) + "\\n")
"""


def test_a_rank_asking_for_a_restart_restarts_the_whole_group(tmp_path) -> None:
    """Rank 1 asks for a restart (out of memory that needs a new process); rank 0 loses it and reports a lost
    peer. The supervisor starts the group again instead of failing the run."""
    run, supervisor = _fake_launch(
        tmp_path,
        LOG_AND_EVENT
        + """
attempt = (RUN / "attempts").read_text() if (RUN / "attempts").exists() else ""
(RUN / "attempts").write_text(attempt + "x")
if not attempt:
    log("[loratui] restart requested by rank 1: out of memory while the optimizer update was being applied")
    event("warning", message="training process rank 1 (pid 9) stopped", peer_lost=True)
    log("Root Cause (first observed failure):\\n[0]:\\n  rank      : 0 (local_rank: 0)\\n  exitcode  : 1")
    sys.exit(1)
event("run_finished")
""",
    )
    assert supervisor.supervise() == 0
    events = read_events(run.events_path)
    restarts = [e for e in events if e["type"] == "warning" and e.get("restart")]
    assert len(restarts) == 1 and "rank 1" in restarts[0]["message"], events
    assert [e["type"] for e in events][-1] == "run_finished" and "run_failed" not in [
        e["type"] for e in events
    ]
    assert (run.path / "attempts").read_text() == "xx"


def test_a_lost_peer_fails_the_run_with_rank_0s_message(tmp_path) -> None:
    """No rank asked for a restart in this attempt (an earlier attempt's request in worker.log does not
    count): the run fails with the message rank 0 wrote when it lost its peer."""
    run, supervisor = _fake_launch(
        tmp_path,
        LOG_AND_EVENT
        + """
event("warning", message="training process rank 1 (pid 9) stopped; resume with: loratui train --resume X",
      peer_lost=True)
sys.exit(1)
""",
    )
    with (run.path / "worker.log").open("a") as log:
        log.write("[loratui] restart requested by rank 1: out of memory (an earlier attempt)\n")
    assert supervisor.supervise() == 1
    events = read_events(run.events_path)
    failed = [e for e in events if e["type"] == "run_failed"]
    assert len(failed) == 1 and failed[0]["error"].startswith("training process rank 1 (pid 9) stopped")
    assert not [e for e in events if e["type"] == "warning" and e.get("restart")]
    status = json.loads(run.status_path.read_text())
    assert status["state"] == "failed" and "rank 1" in status["message"]


def test_another_machine_resumes_into_its_own_run_directory(tmp_path) -> None:
    """On a shared filesystem, machine 1 resuming machine 0's run must not rewrite that run's files."""
    cfg = _llm_config_paths(tmp_path)
    main_run, _ = prepare_run(
        ResolvedConfig(cfg, {}, "llm"),
        resume=None,
        overwrite=False,
        processes=Processes(4, num_machines=2, machine_rank=0),
    )
    from loratui.runs.checkpoints import write_checkpoint

    checkpoint = write_checkpoint(  # an intact checkpoint: damaged ones are refused
        main_run,
        2,
        lora_state={},
        training_state={},
        meta={"processes": 4, "global_batch": 8},
        config_yaml="",
    )
    before = {p.name: p.read_bytes() for p in main_run.path.iterdir() if p.is_file()}

    other, resumed = prepare_run(
        ResolvedConfig(cfg, {}, "llm"),
        resume=str(checkpoint),
        overwrite=False,
        processes=Processes(4, num_machines=2, machine_rank=1),
    )
    assert other.path != main_run.path and "machine1" in other.path.name and resumed == checkpoint
    assert json.loads((other.path / "launch.json").read_text())["resume_from"] == str(checkpoint)
    assert {p.name: p.read_bytes() for p in main_run.path.iterdir() if p.is_file()} == before
