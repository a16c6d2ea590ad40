"""Wizard steps driven with a Pilot: fake NVML, tiny models, temporary datasets; message sequences asserted."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest

from loratui.config import load_config
from loratui.gpu.fake_nvml import EXAMPLE_SPEC
from loratui.tui.messages import (
    CaptionProgress,
    CaptionsWritten,
    ChecksFinished,
    ChecksStarted,
    ConfigSaved,
    EstimateReady,
    FileIgnored,
    GpuChosen,
    ModelInspected,
    PresetChosen,
    StepShown,
    TrainingStarted,
    ValueChosen,
)
from loratui.tui.steps.settings import planner as REAL_PLANNER
from loratui.tui.testing import distinct, fake_planner, run_async, screen_text, wait_for, write_synthetic_run
from loratui.tui.wizard_app import WizardApp
from loratui.tui.wizard_state import WizardState

sys.path.insert(0, str(Path(__file__).parent))
from data_fixtures import build_good_image_dataset, pattern, save  # noqa: E402

SIZE = (80, 24)


@pytest.fixture
def workdir(tmp_path, monkeypatch, tiny_sd15, tiny_llama) -> Path:
    """A project folder: models/ (links to the tiny models), data/style (4 captioned + 1 uncaptioned)."""
    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    (work / "models" / "sd15").symlink_to(tiny_sd15, target_is_directory=True)
    (work / "models" / "llama").symlink_to(tiny_llama, target_is_directory=True)
    build_good_image_dataset(work / "data" / "style", n=4)
    save(pattern(seed=9), work / "data" / "style" / "nocap.png")
    spec = tmp_path / "nvml.json"
    spec.write_text(json.dumps(EXAMPLE_SPEC))
    monkeypatch.setenv("LORATUI_FAKE_NVML", str(spec))
    monkeypatch.setattr("loratui.tui.steps.settings.planner", fake_planner)  # fixed, instant answers
    monkeypatch.chdir(work)
    return work


def make_app(state: WizardState | None = None, **kwargs) -> WizardApp:
    return WizardApp(state or WizardState(), telemetry_interval=0, poll_interval=0.05, **kwargs)


async def type_text(pilot, text: str) -> None:
    await pilot.press(*[("space" if ch == " " else ch) for ch in text])


def flat(app) -> str:
    """The screen's text with line breaks and runs of spaces collapsed (sentences wrap)."""
    return " ".join(screen_text(app).split())


def step(app):
    return app.screen.step


@run_async
async def test_hardware_lists_gpus_and_chooses_one(workdir) -> None:
    seen: list = []
    app = make_app()
    async with app.run_test(size=SIZE, message_hook=seen.append) as pilot:
        await wait_for(pilot, lambda: app.state.gpu is not None)
        await pilot.pause(0.1)
        text = flat(app)
        assert "Found 2 NVIDIA GPUs (driver 550.54.15, CUDA 12.4)" in text
        assert "GPU 0 is shared: other processes hold 5.0 GiB" in text
        assert "█ other processes 5.0 GiB · ▓ other 1.0 GiB · ░ free 17.5 of 24.0 GiB" in text
        assert app.state.gpu.index == 0  # the most free memory
        await pilot.press("down", "enter")
        await pilot.pause(0.1)
        assert app.state.gpu.index == 1 and "Chosen: GPU 1 (NVIDIA GeForce RTX 3060)" in flat(app)
    kinds = [type(m).__name__ for m in seen if isinstance(m, StepShown | GpuChosen)]
    assert kinds[:1] == ["StepShown"] and kinds.count("GpuChosen") >= 2
    assert [m.choice.index for m in distinct(seen, GpuChosen)] == [0, 1]


@run_async
async def test_hardware_states_cpu_only_plainly(workdir, monkeypatch) -> None:
    monkeypatch.setenv("LORATUI_FAKE_NVML", "none")
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.state.gpu is not None)
        await pilot.pause(0.1)
        assert "No NVIDIA GPU available (no NVIDIA driver found)" in flat(app)
        assert app.state.gpu.index is None and app.state.gpu.name == "CPU"
        await pilot.press("down", "down", "enter")  # a 12 GB card to plan for
        await pilot.pause(0.1)
        assert app.state.gpu.usable_bytes == 12 * 1024**3


@run_async
async def test_model_step_detects_families_and_problems(workdir) -> None:
    seen: list = []
    app = make_app()
    async with app.run_test(size=SIZE, message_hook=seen.append) as pilot:
        await pilot.press("ctrl+n")
        await type_text(pilot, "models/sd15")
        await wait_for(pilot, lambda: "Found a Stable Diffusion 1.x model" in flat(app))
        assert app.state.values["base_model"] == "models/sd15"
        await pilot.press("ctrl+u")
        await type_text(pilot, "models/llama")
        await wait_for(pilot, lambda: "Found an LLM: LlamaForCausalLM" in flat(app))
        assert "Task set to text to match" in flat(app)
        assert app.state.values["task_type"] == "text-generation"
        await pilot.press("ctrl+u")
        await type_text(pilot, "./models/nothing")
        await wait_for(pilot, lambda: "Nothing found at models/nothing" in flat(app))
    inspected = [
        m.info.family for m in distinct(seen, ModelInspected) if m.path in ("models/sd15", "models/llama")
    ]
    assert inspected == ["sd15", "llm"]
    chosen = [(m.key, m.value) for m in distinct(seen, ValueChosen)]
    assert ("base_model", "models/sd15") in chosen and ("task_type", "text-generation") in chosen
    assert [m.index for m in distinct(seen, StepShown)] == [0, 1]


@run_async
async def test_model_step_file_browser_picks_a_model_folder(workdir) -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+n")
        tree = app.screen.query_one("#browser")
        tree.focus()
        await wait_for(pilot, lambda: tree.root.children)
        names = [str(node.label) for node in tree.root.children]
        assert names == ["data", "models"]
        await pilot.press("down", "down", "enter")  # open models/
        await wait_for(pilot, lambda: len(tree.root.children[1].children) == 2)
        await pilot.press("down", "down", "enter")  # models/sd15 has model_index.json: chosen
        await wait_for(pilot, lambda: app.state.values.get("base_model") == "models/sd15")


@run_async
async def test_dataset_checks_findings_and_ignore_action(workdir) -> None:
    seen: list = []
    state = WizardState(values={"base_model": "models/sd15"})
    app = make_app(state)
    async with app.run_test(size=SIZE, message_hook=seen.append) as pilot:
        await pilot.press("ctrl+n", "ctrl+n")
        await type_text(pilot, "data/style")
        await pilot.press("enter")
        await wait_for(pilot, lambda: step(app).report is not None)
        await pilot.pause(0.1)
        text = flat(app)
        assert "Checked 5 images (4 captioned" in text and "1 error" in text
        assert "missing_caption" in text and "nocap.png" in text
        assert app.state.dataset_errors == 1
        tree = app.screen.query_one("#findings")
        tree.focus()
        await pilot.press("down", "down")  # from missing_caption: its fix, then nocap.png
        assert tree.cursor_node.data.example == "nocap.png"
        assert "Fix: Caption them" in flat(app)
        await pilot.press("i")
        assert type(app.screen).__name__ == "ConfirmScreen"
        await pilot.press("y")
        await wait_for(
            pilot, lambda: step(app).report is not None and step(app).report.counts()["error"] == 0
        )
        assert (workdir / "data/style/.ignored/nocap.png").exists()
        await pilot.press("c")  # caption action jumps to the captions step
        await wait_for(pilot, lambda: app.screen.index == 3)
    assert [type(m).__name__ for m in distinct(seen, ChecksStarted | ChecksFinished | FileIgnored)] == [
        "ChecksStarted",
        "ChecksFinished",
        "FileIgnored",
        "ChecksStarted",
        "ChecksFinished",
    ]


@run_async
async def test_keys_react_quickly_while_checks_run(workdir, monkeypatch) -> None:
    """Key to handled: under 100 ms (median of several presses) while a CPU-bound check runs in a worker."""
    from textual import events

    import loratui.data.check as check

    real = check.run_checks
    release = threading.Event()

    def busy_check(*args, **kwargs):
        end = time.perf_counter() + 60
        while not release.is_set() and time.perf_counter() < end:  # pure Python: contends for the GIL
            sum(i * i for i in range(1000))
        return real(*args, **kwargs)

    monkeypatch.setattr(check, "run_checks", busy_check)
    marks: dict[int, tuple[str, float, object]] = {}

    def hook(message) -> None:
        # The message itself is kept in the entry: a freed message's id can be reused by a later one,
        # which setdefault would then drop. A message is seen more than once when it bubbles.
        wanted = isinstance(message, StepShown | ChecksFinished)
        if wanted or isinstance(message, events.Key) and message.key in ("ctrl+n", "ctrl+p"):
            marks.setdefault(id(message), (type(message).__name__, time.perf_counter(), message))

    app = make_app(WizardState(values={"train_data_dir": "data/style"}))
    async with app.run_test(size=SIZE, message_hook=hook) as pilot:
        await pilot.press("ctrl+n", "ctrl+n")
        await wait_for(pilot, lambda: app.screen.query_one("#check-progress").display)
        marks.clear()
        for key in ("ctrl+n", "ctrl+p", "ctrl+p", "ctrl+n", "ctrl+n", "ctrl+p"):
            await pilot.press(key)
        assert step(app).report is None  # the check ran all along
        release.set()
        await wait_for(pilot, lambda: step(app).report is not None)
    ordered = sorted(marks.values(), key=lambda item: item[1])
    finished = next(t for kind, t, _ in ordered if kind == "ChecksFinished")
    pairs = [
        (a[1], b[1])
        for a, b in zip(ordered, ordered[1:], strict=False)
        if a[0] == "Key" and b[0] == "StepShown"
    ]
    delays = sorted(b - a for a, b in pairs if b < finished)  # keys handled while the check was running
    assert len(delays) == 6, (delays, len(pairs))
    assert delays[len(delays) // 2] < 0.1, delays


@run_async
async def test_captions_review_edit_and_write_metadata(workdir) -> None:
    seen: list = []
    app = make_app(WizardState(values={"train_data_dir": "data/style", "base_model": "models/sd15"}))
    async with app.run_test(size=SIZE, message_hook=seen.append) as pilot:
        for _ in range(3):
            await pilot.press("ctrl+n")
        await wait_for(pilot, lambda: len(step(app).rows) == 5)
        await pilot.pause(0.1)
        assert "5 images, 1 without a caption" in flat(app)
        table = app.screen.query_one("#captions")
        table.focus()
        await pilot.press("down", "down", "down", "down")  # nocap.png (last row)
        await pilot.press("enter")  # edit it
        await type_text(pilot, "mychar, a new picture")
        await pilot.press("enter")
        assert step(app).rows[-1][1] == "mychar, a new picture"
        await pilot.press("ctrl+w")
        await wait_for(pilot, lambda: distinct(seen, CaptionsWritten))
        await pilot.pause(0.1)
    csv = (workdir / "data/style/metadata.csv").read_text()
    assert 'nocap.png,"mychar, a new picture"' in csv and csv.startswith("filename,prompt")
    assert app.state.values["metadata_path"] == str(Path("data/style") / "metadata.csv")


@pytest.mark.slow
@run_async
async def test_captioning_with_a_local_model_shows_progress_and_writes(workdir, tiny_blip) -> None:
    pytest.importorskip("loratui.data.captioning")
    (workdir / "models" / "blip").symlink_to(tiny_blip, target_is_directory=True)
    seen: list = []
    app = make_app(WizardState(values={"train_data_dir": "data/style"}))
    async with app.run_test(size=SIZE, message_hook=seen.append) as pilot:
        for _ in range(3):
            await pilot.press("ctrl+n")
        await wait_for(pilot, lambda: len(step(app).rows) == 5)
        app.screen.query_one("#caption-model").value = "folder"
        app.screen.query_one("#model-folder").value = "models/blip"
        app.screen.query_one("#trigger").value = "mychar"
        await pilot.pause(0.1)
        await pilot.click("#run-captioning")
        await wait_for(pilot, lambda: distinct(seen, CaptionsWritten), timeout=60)
        await pilot.pause(0.1)
        assert step(app).rows[-1][1].startswith("mychar, ")
        assert "Wrote 1 captions (metadata.csv)" in flat(app)
    progress = distinct(seen, CaptionProgress)
    assert progress[0].done == 0 and progress[-1].done == progress[-1].total == 1
    assert ("trigger_word", "mychar") in [(m.key, m.value) for m in distinct(seen, ValueChosen)]
    rows = (workdir / "data/style/metadata.csv").read_text().splitlines()
    assert rows[0] == "filename,prompt" and rows[1].startswith("nocap.png,") and "mychar, " in rows[1]
    assert (workdir / "data/style/img0.txt").read_text().startswith("mychar, a picture")  # kept


@run_async
async def test_settings_edit_updates_prediction_and_presets(workdir) -> None:
    seen: list = []
    app = make_app(WizardState(values={"base_model": "models/sd15", "train_data_dir": "data/style"}))
    async with app.run_test(size=SIZE, message_hook=seen.append) as pilot:
        await wait_for(pilot, lambda: app.state.gpu is not None)
        for _ in range(4):
            await pilot.press("ctrl+n")
        await wait_for(pilot, lambda: distinct(seen, EstimateReady))
        estimates = len(distinct(seen, EstimateReady))
        rank = app.screen.query_one("#lora_rank")
        rank.focus()
        await pilot.press("ctrl+u", "1", "6")
        await wait_for(pilot, lambda: app.state.values.get("lora_rank") == 16)
        await wait_for(pilot, lambda: len(distinct(seen, EstimateReady)) > estimates)  # re-estimated
        app.screen.query_one("#preset").value = "12gb"
        await wait_for(pilot, lambda: app.state.preset == "12gb")
        assert app.state.get("lora_rank") == 16  # the user's value wins over the preset
        assert app.state.get("cache_latents") is True  # from the preset
        assert "For GPU 0 (NVIDIA GeForce RTX 4090): 17.5 GiB usable now." in flat(app)
    assert [m.name for m in distinct(seen, PresetChosen)] == ["12gb"]
    assert ("lora_rank", 16) in [(m.key, m.value) for m in distinct(seen, ValueChosen)]


@pytest.mark.slow
@run_async
async def test_settings_with_the_real_memory_planner(workdir, monkeypatch) -> None:
    """The real planner (traces a reference step of the tiny model) fills the prediction and the options."""
    monkeypatch.setattr("loratui.tui.steps.settings.planner", REAL_PLANNER)
    seen: list = []
    app = make_app(WizardState(values={"base_model": "models/sd15", "train_data_dir": "data/style"}))
    async with app.run_test(size=SIZE, message_hook=seen.append) as pilot:
        await wait_for(pilot, lambda: app.state.gpu is not None)
        for _ in range(4):
            await pilot.press("ctrl+n")
        await wait_for(pilot, lambda: any(m.estimate is not None for m in distinct(seen, EstimateReady)), 180)
        await wait_for(pilot, lambda: step(app)._options, 180)
        assert "Predicted peak" in flat(app) and "Options that fit NVIDIA GeForce RTX 4090" in flat(app)
        estimate = next(m.estimate for m in distinct(seen, EstimateReady) if m.estimate is not None)
        assert 0 < estimate.total_bytes < 24 * 1024**3


@run_async
async def test_review_saves_atomically_and_asks_before_replacing(workdir) -> None:
    seen: list = []
    values = {"base_model": "models/sd15", "train_data_dir": "data/style", "lora_rank": 16}
    app = make_app(WizardState(values=values))
    async with app.run_test(size=SIZE, message_hook=seen.append) as pilot:
        for _ in range(5):
            await pilot.press("ctrl+n")
        await pilot.pause(0.1)
        assert "lora_rank: 16 # wizard" in flat(app)
        app.screen.query_one("#save-path").focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: distinct(seen, ConfigSaved))
        saved = workdir / "lora.yaml"
        assert load_config(saved).config == app.state.resolve().config
        saved.write_text("# mine\n")
        await pilot.press("enter")
        assert type(app.screen).__name__ == "ConfirmScreen"
        await pilot.press("n")
        assert saved.read_text() == "# mine\n"
        await pilot.press("enter", "y")
        await wait_for(pilot, lambda: len(distinct(seen, ConfigSaved)) == 2)
    assert load_config(workdir / "lora.yaml").config.lora_rank == 16


@run_async
async def test_config_file_prefills_every_step(workdir) -> None:
    config = workdir / "start.yaml"
    config.write_text("base_model: models/sd15\ntrain_data_dir: data/style\nlora_rank: 32\n")
    app = make_app(WizardState(config_path=config))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+n")
        assert app.screen.query_one("#base-model").value == "models/sd15"
        await pilot.press("ctrl+n", "ctrl+n", "ctrl+n")
        assert app.screen.query_one("#lora_rank").value == "32"
        await pilot.press("ctrl+n")
        assert "lora_rank: 32 # config" in flat(app)
        assert app.screen.query_one("#save-path").value == "start.yaml"


@run_async
async def test_train_starts_the_run_and_opens_the_training_view(workdir) -> None:
    seen: list = []
    started: list = []

    def launcher(resolved, gpu):
        started.append((resolved.config.lora_rank, gpu.index))
        run = write_synthetic_run(
            workdir / "runs" / "lora-20261121-120000", steps=10, total_steps=10, finished=True
        )
        return run, 12345

    values = {"base_model": "models/sd15", "train_data_dir": "data/style", "lora_rank": 4}
    app = make_app(WizardState(values=values), launcher=launcher)
    async with app.run_test(size=SIZE, message_hook=seen.append) as pilot:
        await wait_for(pilot, lambda: app.state.gpu is not None)
        for _ in range(6):
            await pilot.press("ctrl+n")
        assert "Train a Stable Diffusion 1.x LoRA, rank 4" in flat(app)
        assert "The dataset check found 1 error(s)." in flat(app)
        await pilot.press("enter")
        assert type(app.screen).__name__ == "ConfirmScreen"
        await pilot.press("y")
        await wait_for(pilot, lambda: type(app.screen).__name__ == "TrainingScreen")
        await wait_for(pilot, lambda: app.screen.view is not None and app.screen.view.ended)
        await pilot.pause(0.1)
        assert "<lora:my_style:0.8>" in flat(app)
        await pilot.press("d")
    assert started == [(4, 0)]
    assert [m.pid for m in distinct(seen, TrainingStarted)] == [12345]
    assert app.return_code == 0


@run_async
async def test_try_the_demo_starts_the_text_demo_and_opens_the_training_view(workdir) -> None:
    from loratui.demo.text_demo import DEFAULT_STEPS
    from loratui.tiny_models.pretrain.text import shipped_text_model

    seen: list = []
    started: list = []

    def launcher(resolved, gpu):
        started.append(resolved.config)
        run = write_synthetic_run(
            workdir / "runs" / "text-demo-20261121-120000", steps=60, total_steps=120, oom_at=None, pid=None
        )
        return run, 12345

    app = make_app(launcher=launcher)
    async with app.run_test(size=SIZE, message_hook=seen.append) as pilot:
        await wait_for(pilot, lambda: app.state.gpu is not None)
        assert "Try the demo" in flat(app)
        await pilot.click("#try-demo")
        await wait_for(pilot, lambda: type(app.screen).__name__ == "TrainingScreen")
        await wait_for(pilot, lambda: app.screen.view is not None)
        await pilot.pause(0.1)
        assert "run text-demo-20261121-120000" in flat(app) and "60/120" in flat(app)
    [cfg] = started
    assert cfg.base_model == str(shipped_text_model()) and cfg.max_steps == DEFAULT_STEPS
    assert Path(cfg.train_data_dir) == workdir / "loratui-demo" / "data" / "medical_qa.jsonl"
    assert Path(cfg.train_data_dir).is_file() and (workdir / "loratui-demo" / "llm_demo.yaml").is_file()
    assert [m.pid for m in distinct(seen, TrainingStarted)] == [12345]


@run_async
async def test_try_the_image_demo_starts_the_image_demo_and_opens_the_training_view(workdir) -> None:
    from loratui.demo.image_demo import DEFAULT_STEPS
    from loratui.tiny_models.pretrain.image import shipped_model_path

    started: list = []

    def launcher(resolved, gpu):
        started.append(resolved.config)
        run = write_synthetic_run(
            workdir / "runs" / "image-demo-20261121-120000", steps=100, total_steps=400, oom_at=None, pid=None
        )
        return run, 12346

    app = make_app(launcher=launcher)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.state.gpu is not None)
        assert "Try the image demo" in flat(app)
        await pilot.click("#try-image-demo")
        await wait_for(pilot, lambda: type(app.screen).__name__ == "TrainingScreen")
        await wait_for(pilot, lambda: app.screen.view is not None)
        await pilot.pause(0.1)
        assert "run image-demo-20261121-120000" in flat(app) and "100/400" in flat(app)
    [cfg] = started
    assert cfg.base_model == str(shipped_model_path()) and cfg.max_steps == DEFAULT_STEPS
    data = Path(cfg.train_data_dir)
    assert data == workdir / "loratui-demo" / "image" / "data"
    assert len(list((data / "5_stars").glob("*.png"))) == 20 and cfg.network_type == "locon"


@pytest.mark.slow
@run_async
async def test_try_the_demo_trains_in_a_worker_and_the_view_follows_it(workdir, subprocess_env) -> None:
    from loratui.demo.text_demo import DEFAULT_STEPS

    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.state.gpu is not None)
        await pilot.click("#try-demo")
        await wait_for(pilot, lambda: type(app.screen).__name__ == "TrainingScreen", timeout=60)
        await wait_for(pilot, lambda: app.screen.view is not None and app.screen.view.step > 0, timeout=180)
        assert app.screen.view.total_steps == DEFAULT_STEPS
        await wait_for(pilot, lambda: app.screen.view.ended, timeout=300)
        assert app.screen.view.state == "finished" and app.screen.view.step == DEFAULT_STEPS
