"""Optimizer and schedule settings as users write them (kohya, OneTrainer, LLM tools), the schedules' shapes,
schedule-free AdamW's weight switch, and the messages for missing packages and unknown arguments."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from loratui.config import TrainConfig, load_config
from loratui.config.task_keys import ignored_settings
from loratui.train.loop.optim import (
    MissingDependency,
    build_optimizer,
    build_scheduler,
    eval_mode,
    final_weights,
    lr_lambda,
    resume_train_mode,
)


def _load(tmp_path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text("base_model: x\ntrain_data_dir: y\n" + text)
    return load_config(path)


@pytest.mark.parametrize(
    ("written", "canonical"),
    [
        ("AdamW8bit", "adamw8bit"),
        ("PagedAdamW8bit", "adamw8bit"),
        ("Prodigy", "prodigy"),
        ("AdaFactor", "adafactor"),
        ("adamw_schedulefree", "schedulefree_adamw"),
        ("AdamWScheduleFree", "schedulefree_adamw"),
        ("CAME", "came"),
        ("Lion", "lion"),
    ],
)
def test_optimizer_spellings(tmp_path, written, canonical):
    assert _load(tmp_path, f"optimizer_type: {written}\n").config.optimizer == canonical


def test_kohya_optimizer_args_become_typed_values(tmp_path):
    text = 'optimizer_type: Prodigy\noptimizer_args: ["d_coef=2", "decouple=True", "weight_decay=0.01", "betas=0.9,0.99"]\n'
    cfg = _load(tmp_path, text).config
    assert cfg.optimizer_args == {"d_coef": 2, "decouple": True, "weight_decay": 0.01, "betas": [0.9, 0.99]}
    with pytest.raises(Exception, match="d_coef"):
        TrainConfig(optimizer_args=["d_coef"])  # not key=value


def test_cosine_with_restarts_is_its_own_schedule(tmp_path):
    cfg = _load(tmp_path, "lr_scheduler: cosine_with_restarts\nlr_scheduler_num_cycles: 2\n").config
    assert cfg.lr_scheduler == "cosine_with_restarts" and cfg.lr_scheduler_num_cycles == 2
    factor = lr_lambda("cosine_with_restarts", 0, 100, num_cycles=2)
    assert factor(0) == 1.0 and factor(50) == 1.0  # restarted at the half
    assert factor(25) == pytest.approx(0.5) and factor(49) < 0.01 and factor(100) == 0.0
    assert lr_lambda("cosine", 0, 100)(50) == pytest.approx(0.5)


def test_polynomial_and_rex_schedules():
    poly = lr_lambda("polynomial", 10, 110, power=2.0)
    assert poly(4) == pytest.approx(0.5)  # warm-up
    assert poly(60) == pytest.approx(0.25) and poly(110) == 0.0
    assert lr_lambda("polynomial", 0, 100, power=1.0)(30) == pytest.approx(lr_lambda("linear", 0, 100)(30))
    rex = lr_lambda("rex", 0, 100)
    # REX: (1 - p) / (1/2 + (1 - p) / 2); above linear decay in between, 1 at the start, 0 at the end
    assert rex(0) == 1.0 and rex(100) == 0.0
    assert rex(50) == pytest.approx(0.5 / 0.75)
    assert all(rex(s) > 1 - s / 100 for s in range(1, 100))


def test_schedule_settings_that_do_nothing_are_reported(tmp_path):
    resolved = _load(tmp_path, "optimizer: schedulefree_adamw\nlr_scheduler: cosine\nlr_scheduler_power: 2\n")
    messages = {item.key: item.message() for item in ignored_settings(resolved)}
    assert "iterate averaging" in messages["lr_scheduler"]
    assert "only the polynomial schedule reads it" in messages["lr_scheduler_power"]
    quiet = _load(tmp_path, "optimizer: schedulefree_adamw\nlr_scheduler: constant\n")
    assert not ignored_settings(quiet)
    relative = _load(
        tmp_path, "optimizer: adafactor\noptimizer_args: [relative_step=True]\nlr_scheduler: cosine\n"
    )
    assert (
        "computes its own step size"
        in {i.key: i.message() for i in ignored_settings(relative)}["lr_scheduler"]
    )


def _params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.zeros(3))]


@pytest.mark.parametrize("name", ["adamw", "prodigy", "adafactor", "schedulefree_adamw", "came", "lion"])
def test_every_optimizer_builds_and_steps(name):
    params = _params()
    optimizer = build_optimizer(params, name, 1e-2, 0.01)
    scheduler = build_scheduler(optimizer, "cosine_with_restarts", 1, 10, 2)
    before = params[0].detach().clone()
    params[0].sum().backward()
    params[1].grad = torch.ones(3)
    optimizer.step()
    scheduler.step()
    assert not torch.equal(before, params[0].detach())


def test_adafactor_relative_step_mode():
    params = _params()
    optimizer = build_optimizer(params, "adafactor", 1e-4, 0.0, {"relative_step": True, "warmup_init": True})
    assert optimizer.defaults["lr"] is None and optimizer.defaults["relative_step"]
    scheduler = build_scheduler(optimizer, "constant", 0, 10)
    assert type(scheduler).__name__ == "AdafactorSchedule"


def test_unknown_optimizer_args_name_the_key():
    with pytest.raises(ValueError, match="d_coeff is not an argument of prodigy.*d_coef"):
        build_optimizer(_params(), "prodigy", 1.0, 0.0, {"d_coeff": 2})


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # import fails as if not installed
    with pytest.raises(MissingDependency, match=r'pip install "loratui\[optim\]"'):
        build_optimizer(_params(), "prodigy", 1.0, 0.0)


def test_schedulefree_eval_weights_are_the_averaged_ones():
    """Inside `eval_mode` the model holds x (what is sampled, checkpointed and exported); after it, y again."""
    params = _params()
    optimizer = build_optimizer(params, "schedulefree_adamw", 1e-1, 0.0)
    for _ in range(3):
        params[0].grad = torch.randn(4, 3)
        params[1].grad = torch.randn(3)
        optimizer.step()
    y = params[0].detach().clone()
    state = optimizer.state[params[0]]
    beta1 = optimizer.param_groups[0]["betas"][0]
    x = torch.lerp(y, state["z"], 1 - 1 / beta1)  # y = (1 - beta1) z + beta1 x
    with eval_mode(optimizer):
        torch.testing.assert_close(params[0].detach(), x)
        assert not optimizer.param_groups[0]["train_mode"]
    assert optimizer.param_groups[0]["train_mode"]
    torch.testing.assert_close(params[0].detach(), y)
    saved = None
    with eval_mode(optimizer):
        saved = optimizer.state_dict()
    resumed = build_optimizer(
        [torch.nn.Parameter(x.clone()), torch.nn.Parameter(params[1].detach().clone())],
        "schedulefree_adamw",
        1e-1,
        0.0,
    )
    resumed.load_state_dict(saved)
    resume_train_mode(resumed)
    torch.testing.assert_close(resumed.param_groups[0]["params"][0].detach(), y)
    final_weights(optimizer)
    torch.testing.assert_close(params[0].detach(), x)
    assert math.isfinite(float(params[0].detach().sum()))
