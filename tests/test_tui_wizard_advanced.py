"""The settings step's advanced fields, driven with a Pilot: adapter type, optimizer, scheduler, EMA,
regularization, masked loss and validation reach the saved config and the prediction; bad values are named
inline; image-only fields are hidden for LLM runs."""

from __future__ import annotations

import sys
from pathlib import Path

from loratui.config import load_config
from loratui.tui.messages import ConfigSaved, EstimateReady
from loratui.tui.steps.advanced import ADVANCED_FIELDS, FIELDS_BY_KEY, parse
from loratui.tui.steps.settings import planner as REAL_PLANNER
from loratui.tui.testing import distinct, run_async, wait_for
from loratui.tui.wizard_state import WizardState
from loratui.util.sizes import format_bytes

sys.path.insert(0, str(Path(__file__).parent))
import test_tui_wizard as wizard_tests  # noqa: E402
from test_tui_wizard import SIZE, flat, make_app, step, type_text  # noqa: E402

workdir = wizard_tests.workdir  # the same project folder fixture (tiny models, 5-image dataset, fake NVML)

IMAGE_VALUES = {"base_model": "models/sd15", "train_data_dir": "data/style"}


async def open_settings(pilot, app) -> None:
    await wait_for(pilot, lambda: app.state.gpu is not None)
    for _ in range(4):
        await pilot.press("ctrl+n")
    await wait_for(pilot, lambda: type(step(app)).__name__ == "SettingsStep")


def latest_estimate(seen: list):
    estimates = [m.estimate for m in distinct(seen, EstimateReady) if m.estimate is not None]
    return estimates[-1] if estimates else None


async def type_into(pilot, app, key: str, text: str) -> None:
    field = app.screen.query_one(f"#adv-{key}")
    field.focus()
    await pilot.press("ctrl+u")
    await type_text(pilot, text)


@run_async
async def test_loha_prodigy_and_ema_reach_the_config_and_the_prediction(workdir) -> None:
    seen: list = []
    app = make_app(WizardState(values=dict(IMAGE_VALUES)))
    async with app.run_test(size=SIZE, message_hook=seen.append) as pilot:
        await open_settings(pilot, app)
        await wait_for(pilot, lambda: latest_estimate(seen) is not None)
        await pilot.pause(0.2)
        before = latest_estimate(seen).total_bytes
        assert "Predicted peak 1.7 GiB" in flat(app)
        assert "Advanced (image)" in flat(app)

        app.screen.query_one("#adv-network_type").value = "loha"
        await wait_for(pilot, lambda: app.state.values.get("network_type") == "loha")
        app.screen.query_one("#adv-optimizer").value = "prodigy"
        await wait_for(pilot, lambda: app.state.values.get("optimizer") == "prodigy")
        await type_into(pilot, app, "ema_decay", "0.999")
        await wait_for(pilot, lambda: app.state.values.get("ema_decay") == 0.999)
        # fake planner: 1.5 + 0.02 * 8 + loha 0.2 + prodigy 0.3 + EMA 0.05 GiB
        await wait_for(pilot, lambda: "Predicted peak 2.2 GiB" in flat(app))
        after = latest_estimate(seen).total_bytes
        assert after > before and app.state.predicted_bytes == after

        await pilot.press("ctrl+n")  # review: the chosen values, marked as the wizard's
        await pilot.pause(0.1)
        shown = str(app.screen.query_one("#yaml").render())
        for line in (
            "network_type: loha  # wizard",
            "optimizer: prodigy  # wizard",
            "ema_decay: 0.999  # wizard",
        ):
            assert line in shown
        app.screen.query_one("#save-path").focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: distinct(seen, ConfigSaved))
    config = load_config(workdir / "lora.yaml").config
    assert (config.network_type, config.optimizer, config.ema_decay) == ("loha", "prodigy", 0.999)


@run_async
async def test_empty_ema_turns_it_off_and_masked_loss_sets_its_keys(workdir) -> None:
    app = make_app(WizardState(values={**IMAGE_VALUES, "ema_decay": 0.99}))
    async with app.run_test(size=SIZE) as pilot:
        await open_settings(pilot, app)
        await pilot.pause(0.2)
        assert app.screen.query_one("#adv-ema_decay").value == "0.99"
        await type_into(pilot, app, "ema_decay", "")
        await wait_for(pilot, lambda: "ema_decay" not in app.state.values)
        assert app.state.get("ema_decay") is None

        app.screen.query_one("#adv-mask_source").value = "alpha"
        await wait_for(pilot, lambda: app.state.get("alpha_mask") is True)
        assert app.state.get("masked_loss") is True and app.state.try_resolve() is not None
        app.screen.query_one("#adv-mask_source").value = "folder"
        await wait_for(pilot, lambda: app.state.values.get("alpha_mask") is False)
        await type_into(pilot, app, "mask_dir", "data/masks")
        await wait_for(pilot, lambda: app.state.values.get("mask_dir") == "data/masks")
        config = app.state.resolve().config
        assert (config.masked_loss, config.alpha_mask, config.mask_dir) == (True, False, "data/masks")

        await type_into(pilot, app, "reg_data_dir", "data/reg")
        await type_into(pilot, app, "prior_loss_weight", "0.5")
        app.screen.query_one("#adv-lr_scheduler").value = "rex"
        await wait_for(pilot, lambda: app.state.values.get("lr_scheduler") == "rex")
        assert app.state.values["reg_data_dir"] == "data/reg"
        assert app.state.values["prior_loss_weight"] == 0.5


@run_async
async def test_invalid_values_are_named_inline_and_not_applied(workdir) -> None:
    app = make_app(WizardState(values=dict(IMAGE_VALUES)))
    async with app.run_test(size=SIZE) as pilot:
        await open_settings(pilot, app)
        await pilot.pause(0.2)
        await type_into(pilot, app, "prior_loss_weight", "abc")
        await wait_for(pilot, lambda: "prior weight: a number ≥ 0" in flat(app))
        assert "prior_loss_weight" not in app.state.values
        assert app.screen.query_one("#adv-prior_loss_weight").has_class("-invalid")
        await type_into(pilot, app, "val_split", "1.5")
        await wait_for(pilot, lambda: "val split: a fraction from 0 up to" in flat(app))
        assert "val_split" not in app.state.values
        await type_into(pilot, app, "val_split", "0.2")
        await wait_for(pilot, lambda: app.state.values.get("val_split") == 0.2)
        assert "✗" not in flat(app)  # the message goes once the value is good
        assert not app.screen.query_one("#adv-val_split").has_class("-invalid")


@run_async
async def test_llm_run_shows_optimizer_and_scheduler_but_not_image_fields(workdir) -> None:
    values = {"base_model": "models/llama", "task_type": "text-generation"}
    app = make_app(WizardState(values=values))
    async with app.run_test(size=SIZE) as pilot:
        await open_settings(pilot, app)
        await pilot.pause(0.2)
        assert app.state.task == "text"
        shown = {
            spec.key for spec in ADVANCED_FIELDS if app.screen.query_one(f"#adv-field-{spec.key}").display
        }
        assert shown == {"optimizer", "lr_scheduler", "val_split"}
        step(app).scroll_end(animate=False)
        await pilot.pause(0.2)
        text = flat(app)
        assert "optimizer" in text and "scheduler" in text and "Advanced (image)" not in text
        assert "adapter" not in text and "masked loss" not in text and "EMA decay" not in text
        app.screen.query_one("#adv-optimizer").value = "adamw8bit"
        await wait_for(pilot, lambda: app.state.values.get("optimizer") == "adamw8bit")


def test_parse_names_the_problem() -> None:
    ema = FIELDS_BY_KEY["ema_decay"]
    assert parse(ema, " 0.995 ") == 0.995 and parse(ema, "") is None
    for bad in ("1", "0", "x"):
        try:
            parse(ema, bad)
        except ValueError as exc:
            assert "EMA decay" in str(exc)
        else:
            raise AssertionError(bad)
    assert parse(FIELDS_BY_KEY["reg_data_dir"], "data/reg") == "data/reg"


@run_async
async def test_real_planner_prediction_follows_the_optimizer(workdir, monkeypatch) -> None:
    """With the real planner, switching AdamW to Prodigy (more state per parameter) raises the prediction."""
    monkeypatch.setattr("loratui.tui.steps.settings.planner", REAL_PLANNER)
    seen: list = []
    app = make_app(WizardState(values=dict(IMAGE_VALUES)))
    async with app.run_test(size=SIZE, message_hook=seen.append) as pilot:
        await open_settings(pilot, app)
        await wait_for(pilot, lambda: latest_estimate(seen) is not None, 180)
        before = latest_estimate(seen).total_bytes
        count = len(distinct(seen, EstimateReady))
        app.screen.query_one("#adv-optimizer").value = "prodigy"
        await wait_for(pilot, lambda: len(distinct(seen, EstimateReady)) > count, 180)
        await wait_for(pilot, lambda: latest_estimate(seen).total_bytes != before, 180)
        prodigy = latest_estimate(seen).total_bytes
        assert prodigy > before
        app.screen.query_one("#adv-network_type").value = "loha"
        await wait_for(pilot, lambda: latest_estimate(seen).total_bytes != prodigy, 180)
        shown = f"Predicted peak {format_bytes(latest_estimate(seen).total_bytes, short=True)}"
        await wait_for(pilot, lambda: shown in flat(app))
        assert app.state.predicted_bytes == latest_estimate(seen).total_bytes
