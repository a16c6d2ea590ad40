"""The wizard with FLUX.1 / Chroma base models, driven with a Pilot: the model step asks for the separate files a
single-file transformer needs, the settings step shows the Flux fields with the planner's predictions (or says
that there is none), and the review lists the Flux choices and saves a config that loads back the same."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from loratui.config import load_config
from loratui.config.base_model import inspect_base_model
from loratui.gpu.fake_nvml import EXAMPLE_SPEC
from loratui.memory.facade import EstimateView, Suggestion
from loratui.tui.flux_choices import (
    FLUX_KEYS,
    flux_model,
    flux_summary,
    is_flux_estimate,
    missing_part_problems,
)
from loratui.tui.messages import EstimateReady, OptionsReady, ValueChosen
from loratui.tui.steps.model import describe_model
from loratui.tui.testing import FakePlanner, distinct, run_async, screen_text, wait_for
from loratui.tui.wizard_app import WizardApp
from loratui.tui.wizard_state import WizardState, annotated_yaml

sys.path.insert(0, str(Path(__file__).parent))
from data_fixtures import build_good_image_dataset  # noqa: E402

GIB = 1024**3
SIZE = (120, 40)
SMALL = dict(
    patch_size=1,
    in_channels=16,
    num_layers=2,
    num_single_layers=3,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=16,
    axes_dims_rope=(2, 2, 4),
)


def _parts(variant: str):
    """Small random transformer, 16-channel autoencoder, CLIP-L and T5 encoders of a variant."""
    import diffusers
    import transformers

    torch.manual_seed(0)
    if variant == "chroma":
        transformer = diffusers.ChromaTransformer2DModel(
            **SMALL, approximator_num_channels=8, approximator_hidden_dim=16, approximator_layers=1
        )
    else:
        transformer = diffusers.FluxTransformer2DModel(
            **SMALL, pooled_projection_dim=12, guidance_embeds=variant == "dev"
        )
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
    )
    clip = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=64, hidden_size=12, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2
        )
    )
    t5 = transformers.T5EncoderModel(
        transformers.T5Config(vocab_size=64, d_model=16, d_ff=16, d_kv=8, num_layers=1, num_heads=2)
    )
    return transformer, vae, (None if variant == "chroma" else clip), t5


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory) -> dict[str, Path]:
    """Single files as users have them: dev and Chroma transformers with separate ae/clip_l/t5xxl files, and
    a schnell all-in-one checkpoint."""
    from loratui.models.flux.single_file import save_flux_files

    root = tmp_path_factory.mktemp("flux-ui")
    dev = save_flux_files(root / "dev", *_parts("dev"), names={"transformer": "flux1-dev.safetensors"})
    chroma = save_flux_files(root / "chroma", *_parts("chroma"), names={"transformer": "chroma.safetensors"})
    schnell = save_flux_files(root / "aio", *_parts("schnell"), all_in_one="flux1-schnell-aio.safetensors")
    return {
        "dev": dev["transformer"],
        "vae": dev["vae"],
        "clip_l": dev["clip_l"],
        "t5xxl": dev["t5xxl"],
        "chroma": chroma["transformer"],
        "chroma_t5xxl": chroma["t5xxl"],
        "schnell_aio": schnell["transformer"],
    }


class FluxFakePlanner(FakePlanner):
    """Fixed Flux-step answers: the transformer's weights follow base_weights_dtype and blocks_to_swap."""

    WEIGHTS_GIB = {"bf16": 22.2, "fp8": 11.1, "nf4": 6.3}

    def estimate(self, resolved) -> EstimateView:
        cfg = resolved.config
        weights = (self.WEIGHTS_GIB[cfg.base_weights_dtype] - 0.3 * cfg.blocks_to_swap) * GIB
        return EstimateView(
            int(weights + 2.5 * GIB),
            method="traced transformer blocks",
            error_band=0.1,
            breakdown={"transformer_weights": int(weights), "activations": int(2.5 * GIB)},
        )

    def recommend(self, resolved, usable_bytes: int, *, top: int = 5) -> list[Suggestion]:
        view = EstimateView(int(10.1 * GIB), breakdown={"transformer_weights": int(7.6 * GIB)})
        changes = {"base_weights_dtype": "fp8", "blocks_to_swap": 1}
        return [Suggestion(changes, view, usable_bytes - view.total_bytes, 0.8, "fp8 base, 1 block swapped")]


class UNetOnlyPlanner(FakePlanner):
    """A planner without the Flux step: it answers with the Stable Diffusion (UNet) step's breakdown."""

    def estimate(self, resolved) -> EstimateView:
        return EstimateView(int(4.2 * GIB), breakdown={"unet_weights": int(1.7 * GIB)})

    def recommend(self, resolved, usable_bytes: int, *, top: int = 5) -> list[Suggestion]:
        view = self.estimate(resolved)
        return [Suggestion({"batch_size": 2}, view, usable_bytes - view.total_bytes, 1.0, "")]


@pytest.fixture
def project(tmp_path, monkeypatch, flux_files) -> Path:
    """A project folder with the Flux files linked under models/, a small captioned dataset and two fake GPUs."""
    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    for name, path in flux_files.items():
        (work / "models" / f"{name}.safetensors").symlink_to(path)
    build_good_image_dataset(work / "data" / "style", n=4)
    spec = tmp_path / "nvml.json"
    spec.write_text(json.dumps(EXAMPLE_SPEC))
    monkeypatch.setenv("LORATUI_FAKE_NVML", str(spec))
    monkeypatch.setattr("loratui.tui.steps.settings.planner", FluxFakePlanner)
    monkeypatch.chdir(work)
    return work


def make_app(state: WizardState | None = None) -> WizardApp:
    return WizardApp(state or WizardState(), telemetry_interval=0, poll_interval=0.05)


def flat(app) -> str:
    return " ".join(screen_text(app).split())


def shown(app, selector: str) -> bool:
    return bool(app.screen.query_one(selector).display)


async def set_input(pilot, app, selector: str, text: str) -> None:
    app.screen.query_one(selector).value = text
    await pilot.pause(0.05)


FLUX_STATE = {
    "base_model": "models/dev.safetensors",
    "vae": "models/vae.safetensors",
    "clip_l": "models/clip_l.safetensors",
    "t5xxl": "models/t5xxl.safetensors",
    "train_data_dir": "data/style",
    "resolution": 512,
}


# --- without a screen ------------------------------------------------------------------------------------------


def test_flux_model_tells_variant_and_needed_files(flux_files) -> None:
    dev = flux_model(str(flux_files["dev"]))
    assert (dev.variant, dev.single_file, dev.needed) == ("dev", True, ("vae", "clip_l", "t5xxl"))
    assert flux_model(str(flux_files["chroma"])).needed == ("vae", "t5xxl")  # no CLIP-L
    aio = flux_model(str(flux_files["schnell_aio"]))
    assert (aio.variant, aio.held, aio.needed) == ("schnell", ("vae", "clip_l", "t5xxl"), ())
    assert flux_model(str(flux_files["t5xxl"])) is None  # a text encoder is not a base model
    problems = missing_part_problems(str(flux_files["dev"]), {"vae": "ae.safetensors"})
    assert len(problems) == 2 and "CLIP-L" in problems[0] and "`t5xxl: PATH`" in problems[1]


def test_unet_prediction_is_not_a_flux_prediction() -> None:
    assert not is_flux_estimate(UNetOnlyPlanner().estimate(None))
    assert is_flux_estimate(EstimateView(GIB, breakdown={"transformer_weights": GIB}))


def test_train_step_names_the_flux_model(project) -> None:
    from loratui.tui.steps.train import plan_sentences

    assert plan_sentences(WizardState(values=dict(FLUX_STATE))).startswith("Train a FLUX.1-dev LoRA, rank 8")
    chroma = {"base_model": "models/chroma.safetensors", "train_data_dir": "data/style"}
    assert plan_sentences(WizardState(values=chroma)).startswith("Train a Chroma LoRA")


def test_flux_summary_names_the_choices(project) -> None:
    cfg = load_config(None, flags={**FLUX_STATE, "base_weights_dtype": "fp8", "blocks_to_swap": 2}).config
    text = flux_summary(cfg, "dev")
    assert text.startswith("FLUX.1-dev: base weights fp8, 2 blocks swapped, T5 512 tokens (default)")
    assert "timesteps sigmoid" in text and "guidance 1" in text and "t5xxl t5xxl.safetensors" in text
    assert "guidance" not in flux_summary(cfg, "schnell") and "T5 256 tokens" in flux_summary(cfg, "schnell")


# --- model step ------------------------------------------------------------------------------------------------


@run_async
async def test_model_step_asks_for_the_files_a_transformer_needs(project) -> None:
    seen: list = []
    app = make_app()
    async with app.run_test(size=SIZE, message_hook=seen.append) as pilot:
        await pilot.press("ctrl+n")
        await set_input(pilot, app, "#base-model", "models/dev.safetensors")
        await wait_for(pilot, lambda: "Found a FLUX.1-dev model" in flat(app))
        assert "(single-file transformer)" in flat(app)
        assert all(shown(app, f"#part-field-{p}") for p in ("vae", "clip_l", "t5xxl"))
        assert "T5-XXL (`t5xxl`): not set; FLUX.1-dev needs it." in flat(app)
        assert any("`t5xxl: PATH`" in p for p in app.state.problems())
        # a file picked in the browser goes to the part it is
        assert app.screen.step._part_of(project / "models" / "vae.safetensors") == "vae"
        assert app.screen.step._part_of(project / "models" / "dev.safetensors") is None
        await set_input(pilot, app, "#part-vae", "models/vae.safetensors")
        await set_input(pilot, app, "#part-t5xxl", "models/clip_l.safetensors")  # the wrong file
        await wait_for(pilot, lambda: "✓ autoencoder: an autoencoder" in flat(app))
        assert "is a CLIP-L text encoder" in flat(app) and "(use it as `clip_l`)" in flat(app)
        assert app.screen.step.has_class("-problem")
        await set_input(pilot, app, "#part-clip_l", "models/clip_l.safetensors")
        await set_input(pilot, app, "#part-t5xxl", "models/t5xxl.safetensors")
        await wait_for(pilot, lambda: "✓ T5-XXL: a T5-XXL text encoder" in flat(app))
        assert not app.screen.step.has_class("-problem")
        assert {k: app.state.values[k] for k in ("vae", "clip_l", "t5xxl")} == {
            "vae": "models/vae.safetensors",
            "clip_l": "models/clip_l.safetensors",
            "t5xxl": "models/t5xxl.safetensors",
        }
        assert not [p for p in app.state.problems() if "needs" in p]
    chosen = [(m.key, m.value) for m in distinct(seen, ValueChosen)]
    assert ("t5xxl", "models/clip_l.safetensors") in chosen and (
        "t5xxl",
        "models/t5xxl.safetensors",
    ) in chosen


@run_async
async def test_model_step_chroma_all_in_one_and_folder(project, tiny_flux_dev) -> None:
    (project / "models" / "FLUX.1-dev").symlink_to(tiny_flux_dev, target_is_directory=True)
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+n")
        await set_input(pilot, app, "#base-model", "models/chroma.safetensors")
        await wait_for(pilot, lambda: "Found a Chroma model" in flat(app))
        assert shown(app, "#part-field-t5xxl") and not shown(app, "#part-field-clip_l")
        # an all-in-one checkpoint and a diffusers folder hold every part
        for path, found in (
            ("models/schnell_aio.safetensors", "Found a FLUX.1-schnell model"),
            ("models/FLUX.1-dev", "Found a FLUX.1-dev model, transformer about"),
        ):
            await set_input(pilot, app, "#base-model", path)
            await wait_for(pilot, lambda found=found: found in flat(app))
            await wait_for(pilot, lambda path=path: app.state.values.get("base_model") == path)
            assert not shown(app, "#flux-files") and app.state.task == "image"
            assert not [p for p in app.state.problems() if "needs" in p]
        assert "(diffusers folder)" in flat(app)
    assert (
        "also holds vae, clip_l, t5xxl"
        in describe_model(inspect_base_model(str(project / "models/schnell_aio.safetensors")))[1]
    )


# --- settings step ---------------------------------------------------------------------------------------------


async def to_settings(pilot, app, seen) -> None:
    await wait_for(pilot, lambda: app.state.gpu is not None)
    app.screen.show_step(4)  # straight to the settings step (the steps between have their own tests)
    await wait_for(pilot, lambda: distinct(seen, EstimateReady) and distinct(seen, OptionsReady))


@run_async
async def test_settings_shows_flux_fields_with_predictions(project) -> None:
    seen: list = []
    app = make_app(WizardState(values=dict(FLUX_STATE)))
    async with app.run_test(size=SIZE, message_hook=seen.append) as pilot:
        await to_settings(pilot, app, seen)
        assert shown(app, "#flux-grid") and shown(app, "#adv-field-guidance_scale")
        assert "FLUX.1-dev: base storage, block swap, text and timesteps" in flat(app)
        assert "Predicted peak 24.7 GiB ± 10%" in flat(app)  # bf16 weights (fake planner)
        assert "rank 4" not in flat(app) and "base fp8, swap 1" in flat(app)  # the option row
        app.screen.query_one("#adv-base_weights_dtype").value = "fp8"
        await wait_for(pilot, lambda: "Predicted peak 13.6 GiB" in flat(app))
        await set_input(pilot, app, "#adv-blocks_to_swap", "2")  # 1 double + 2 single of the 2 + 3 blocks
        await wait_for(pilot, lambda: "Predicted peak 13.0 GiB" in flat(app))
        await set_input(pilot, app, "#adv-t5_max_length", "600")
        await wait_for(pilot, lambda: "T5 tokens: a whole number from 1 to 512" in flat(app))
        await set_input(pilot, app, "#adv-t5_max_length", "256")
        app.screen.query_one("#adv-timestep_sampling").value = "shift"
        await set_input(pilot, app, "#adv-guidance_scale", "3.5")
        await wait_for(pilot, lambda: app.state.values.get("guidance_scale") == 3.5)
        assert {
            k: app.state.values.get(k) for k in ("base_weights_dtype", "blocks_to_swap", "t5_max_length")
        } == {
            "base_weights_dtype": "fp8",
            "blocks_to_swap": 2,
            "t5_max_length": 256,
        }
        assert app.state.values["timestep_sampling"] == "shift"
        # an option applied from the table shows in the Flux fields
        table = app.screen.query_one("#options")
        table.focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.screen.query_one("#adv-blocks_to_swap").value == "1")
        assert app.state.get("blocks_to_swap") == 1
        # back to the model step for FLUX.1-schnell: no guidance field
        app.screen.show_step(1)
        await set_input(pilot, app, "#base-model", "models/schnell_aio.safetensors")
        await wait_for(pilot, lambda: app.state.values.get("base_model") == "models/schnell_aio.safetensors")
        app.screen.show_step(4)
        await wait_for(pilot, lambda: "FLUX.1-schnell: base storage" in flat(app))
        assert shown(app, "#adv-field-blocks_to_swap") and not shown(app, "#adv-field-guidance_scale")


@run_async
async def test_settings_says_when_the_planner_has_no_flux_step(project, monkeypatch) -> None:
    monkeypatch.setattr("loratui.tui.steps.settings.planner", UNetOnlyPlanner)
    seen: list = []
    app = make_app(WizardState(values=dict(FLUX_STATE)))
    async with app.run_test(size=SIZE, message_hook=seen.append) as pilot:
        await to_settings(pilot, app, seen)
        await pilot.pause(0.1)
        text = flat(app)
        assert "No prediction for FLUX.1-dev: the memory planner in this version has no Flux step" in text
        assert "No options for FLUX.1-dev" in text
        assert "Predicted peak" not in text and "4.2 GiB" not in text
    assert all(m.estimate is None for m in distinct(seen, EstimateReady))
    assert app.state.predicted_bytes is None


# --- review step -----------------------------------------------------------------------------------------------


@run_async
async def test_review_lists_flux_choices_and_saves_them(project) -> None:
    values = {**FLUX_STATE, "base_weights_dtype": "nf4", "blocks_to_swap": 2, "guidance_scale": 3.5}
    app = make_app(WizardState(values=values))
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.state.gpu is not None)
        app.screen.show_step(5)
        await wait_for(pilot, lambda: "FLUX.1-dev: base weights nf4, 2 blocks swapped" in flat(app))
        assert (
            "timesteps sigmoid" in flat(app)
            and "guidance 3.5" in flat(app)
            and "files: vae vae.safetensors" in flat(app)
        )
        assert "✓ The config resolves with no problems" in flat(app)
        yaml_text = annotated_yaml(app.state.resolve())  # what the review's config view shows
    assert "base_weights_dtype: nf4  # wizard" in yaml_text and "blocks_to_swap: 2  # wizard" in yaml_text
    assert all(f"\n{key}: " in yaml_text for key in FLUX_KEYS)
    saved = project / "flux.yaml"
    saved.write_text(yaml_text)
    cfg = load_config(saved).config
    assert (cfg.base_weights_dtype, cfg.blocks_to_swap, cfg.guidance_scale, cfg.t5xxl) == (
        "nf4",
        2,
        3.5,
        "models/t5xxl.safetensors",
    )
