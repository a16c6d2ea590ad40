"""Shared training-loop pieces: data order, step plan, schedules, checkpoints, resume lookup."""

from __future__ import annotations

import pytest
import torch

from loratui.runs import create_run_dir
from loratui.runs.checkpoints import load_checkpoint, resolve_resume
from loratui.train.loop.checkpointing import restore_rng_state, rng_state, save_checkpoint
from loratui.train.loop.optim import build_scheduler, lr_lambda
from loratui.train.loop.plan import StepPlan, split_micro_batches
from loratui.util.seeding import epoch_permutation, sample_generator


def test_permutation_depends_only_on_seed_and_epoch() -> None:
    assert epoch_permutation(1, 0, 10) == epoch_permutation(1, 0, 10)
    assert epoch_permutation(1, 0, 10) != epoch_permutation(1, 1, 10)
    assert sorted(epoch_permutation(3, 2, 10)) == list(range(10))
    a = torch.randn(3, generator=sample_generator(1, 0, 5))
    b = torch.randn(3, generator=sample_generator(1, 0, 5))
    c = torch.randn(3, generator=sample_generator(1, 0, 6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_step_plan_visits_every_sample_once_per_epoch() -> None:
    plan = StepPlan(num_samples=10, effective_batch=4, epochs=3, seed=7)
    assert plan.steps_per_epoch == 3 and plan.total_steps == 9
    steps = list(plan.iter_steps())
    for epoch in range(3):
        seen = [i for step, ep, idx in steps if ep == epoch for i in idx]
        assert sorted(seen) == list(range(10))
    assert [s for s, _, _ in plan.iter_steps(start_step=5)] == [5, 6, 7, 8]
    assert plan.samples_for_step(4) == steps[4][2]
    assert StepPlan(10, 4, 3, max_steps=5).total_steps == 5


def test_micro_batches_split_in_order() -> None:
    assert split_micro_batches([5, 1, 9, 3, 7], 2) == [[5, 1], [9, 3], [7]]
    assert split_micro_batches([1, 2], 8) == [[1, 2]]


@pytest.mark.parametrize("name", ["constant", "linear", "cosine"])
def test_schedules_warm_up_then_follow_shape(name: str) -> None:
    factor = lr_lambda(name, warmup_steps=2, total_steps=10)
    assert factor(0) == pytest.approx(0.5) and factor(1) == pytest.approx(1.0)
    end = factor(10)
    assert end == pytest.approx(1.0 if name == "constant" else 0.0, abs=1e-9)


def test_scheduler_state_round_trips() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=1.0)
    sched = build_scheduler(opt, "cosine", 1, 10)
    for _ in range(3):
        opt.step()
        sched.step()
    opt2 = torch.optim.AdamW([param], lr=1.0)
    sched2 = build_scheduler(opt2, "cosine", 1, 10)
    sched2.load_state_dict(sched.state_dict())
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_checkpoint_save_load_rotate(tmp_path) -> None:
    run = create_run_dir(tmp_path, "ck")
    torch.manual_seed(0)
    state = rng_state()
    expected = torch.rand(2)
    for step in (1, 2, 3):
        path = save_checkpoint(
            run,
            step,
            lora_state={"a.lora_A.weight": torch.full((2, 2), float(step))},
            training_state={"optimizer": {"x": torch.ones(1)}, "rng": state},
            meta={"epoch": 0, "data_position": step},
            config_yaml="lora_rank: 4\n",
            keep_last_n=2,
        )
    assert [p.name for p in run.checkpoints()] == ["step-2", "step-3"]
    ck = load_checkpoint(path)
    assert ck.step == 3 and ck.meta["data_position"] == 3
    assert torch.equal(ck.lora_state["a.lora_A.weight"], torch.full((2, 2), 3.0))
    restore_rng_state(ck.training_state["rng"])
    assert torch.equal(torch.rand(2), expected)
    assert not list(run.checkpoints_dir.glob(".*"))  # no temp folders left behind


def test_resolve_resume(tmp_path) -> None:
    run = create_run_dir(tmp_path, "style", now=1_700_000_000)
    run.event_writer().write("run_started", 0)
    with pytest.raises(FileNotFoundError):
        resolve_resume("latest", tmp_path)
    ck = save_checkpoint(run, 4, lora_state={"w": torch.zeros(1)}, training_state={}, meta={}, config_yaml="")
    assert resolve_resume("latest", tmp_path) == (run, ck)
    assert resolve_resume("latest", tmp_path, "style") == (run, ck)
    with pytest.raises(FileNotFoundError):
        resolve_resume("latest", tmp_path, "other")
    assert resolve_resume(str(ck), tmp_path) == (run, ck)
    assert resolve_resume(str(run.path), tmp_path) == (run, ck)
    with pytest.raises(FileNotFoundError):
        resolve_resume("nope", tmp_path)


def test_a_restarted_worker_is_told_its_checkpoint_and_gets_the_recorded_gpu(tmp_path, monkeypatch) -> None:
    from pathlib import Path

    from loratui.train.process.launcher import RESUME_FLAG, Processes, launcher_command
    from loratui.train.process.worker import _arguments

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    checkpoint = tmp_path / "checkpoints" / "step-8"
    argv, env = launcher_command(tmp_path, Processes(), gpu="1", resume_from=checkpoint)
    assert argv[-5:] == ["-m", "loratui.train.process.worker", str(tmp_path), RESUME_FLAG, str(checkpoint)]
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
    argv, env = launcher_command(tmp_path, Processes(processes=2, cpu=True), resume_from=checkpoint)
    assert "accelerate.commands.launch" in argv and argv[-2:] == [RESUME_FLAG, str(checkpoint)]
    assert env["CUDA_VISIBLE_DEVICES"] == ""  # CPU processes still ignore any GPU
    _, env = launcher_command(tmp_path, Processes())
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"  # nothing recorded: the caller's GPUs
    assert _arguments([str(tmp_path)]) == (tmp_path, None)
    assert _arguments([str(tmp_path), RESUME_FLAG, str(checkpoint)]) == (tmp_path, Path(checkpoint))
    assert _arguments([str(tmp_path), "--other", "x"]) is None
