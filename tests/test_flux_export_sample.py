"""`loratui sample` with a Flux base and Flux LoRAs: the file renders what the in-memory LoRA renders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

PROMPT = "a red circle"
SIZE, STEPS, SEED = 32, 2, 4


def _pixels(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def _render(parts, pipe) -> np.ndarray:
    from loratui.models.flux.pipeline import default_sample_settings, generate

    settings = default_sample_settings(parts, height=SIZE, width=SIZE, seed=SEED, steps=STEPS)
    return np.asarray(generate(parts, [PROMPT], settings, pipeline=pipe)[0].convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def trained_lora(tiny_flux_dev, tmp_path_factory):
    """A kohya file of a random LoRA on the transformer and CLIP-L, and the renders of the in-memory model
    with and without it."""
    from loratui.models.flux.kohya import dims_of_transformer
    from loratui.models.flux.loading import load_flux
    from loratui.models.flux.lora import TRANSFORMER, plan_flux_targets
    from loratui.models.flux.lora_files import flux_checkpoint_modules, write_flux_kohya
    from loratui.models.flux.pipeline import build_pipeline
    from loratui.models.sd.kohya import KohyaInfo
    from loratui.models.sd.lora import LoraPlan, inject_lora, lora_state, module_scales

    parts = load_flux(tiny_flux_dev)
    pipe = build_pipeline(parts)
    base = _render(parts, pipe)
    components = {TRANSFORMER: parts.transformer, "text_encoder": parts.clip}
    plan = LoraPlan(targets=plan_flux_targets(None, components, train_text_encoder=True), rank=4, alpha=8.0)
    torch.manual_seed(0)
    inject_lora(components, plan)
    with torch.no_grad():
        for model in components.values():
            for layer in model.modules():
                if hasattr(layer, "lora_B") and "default" in getattr(layer, "lora_B", {}):
                    layer.lora_B["default"].weight.normal_(std=1.0)
    with_lora = _render(parts, pipe)
    modules = flux_checkpoint_modules(
        lora_state(components, plan), {"module_scales": module_scales(components, plan)}
    )
    assert {m.component for m in modules} == {"transformer", "text_encoder"}
    path = tmp_path_factory.mktemp("flux-lora") / "mine.safetensors"
    info = KohyaInfo(name="mine", family="flux", rank=4, alpha=8.0)
    write_flux_kohya(path, modules, dims_of_transformer(parts.transformer), info, "dev")
    return path, base, with_lora


def test_sample_renders_the_lora_like_the_in_memory_model(tiny_flux_dev, trained_lora, tmp_path):
    from loratui.cli.app import app

    path, base, with_lora = trained_lora
    assert np.abs(with_lora - base).max() > 8  # the LoRA changes the picture
    runner = CliRunner()
    common = [
        "sample",
        "--base",
        str(tiny_flux_dev),
        "-p",
        PROMPT,
        "--seed",
        str(SEED),
        "--steps",
        str(STEPS),
    ]
    common += ["--width", str(SIZE), "--height", str(SIZE)]
    result = runner.invoke(app, [*common, "--lora", f"{path}:1.0", "--out", str(tmp_path / "lora.png")])
    assert result.exit_code == 0, result.output
    assert "mine.safetensors:1" in result.output
    assert np.abs(_pixels(tmp_path / "lora.png") - with_lora).max() <= 1

    sd_lora = tmp_path / "sd.safetensors"
    from safetensors.torch import save_file

    save_file(
        {
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.ones(
                2, 8
            ),
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.ones(
                8, 2
            ),
        },
        sd_lora,
    )
    result = runner.invoke(app, [*common, "--lora", str(sd_lora), "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 1
    assert "sd.safetensors is not a Flux LoRA" in result.output


class _Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def event(self, kind: str, **fields) -> None:
        self.seen.append((kind, str(fields.get("message", ""))))


def _flux_models(folder: Path):
    from loratui.models.flux.loading import load_flux
    from loratui.train.flux.setup import FluxModels

    parts = load_flux(folder)
    return FluxModels(parts, "flux", torch.device("cpu"), torch.float32, guidance_scale=1.0, t5_max_length=64)


def test_flux_runs_start_from_init_lora_or_refuse_it(tiny_flux_dev, trained_lora, tmp_path):
    """The trainer's LoRA setup starts from another trainer's kohya file (transformer + CLIP-L) exactly, drops
    what the run does not train with a warning, and refuses a rank above lora_rank with the fix."""
    from loratui.config.schema import TrainConfig
    from loratui.models.flux.lora_files import read_flux_lora
    from loratui.models.sd.lora import LoraSetupError, lora_layers
    from loratui.train.flux.setup import setup_lora

    path, _, _ = trained_lora
    cfg = TrainConfig(
        base_model=str(tiny_flux_dev),
        train_data_dir=str(tmp_path),
        model_family="flux",
        lora_rank=8,
        lora_alpha=4,
        init_lora=str(path),
    )
    models, events = _flux_models(tiny_flux_dev), _Events()
    plan, _ = setup_lora(cfg, models, events)
    assert events.seen[0][0] == "warning" and "started from 34 module(s)" in events.seen[0][1]
    assert "12 module(s) are not trained in this run" in events.seen[1][1]  # CLIP-L: train_text_encoder off
    layers = lora_layers(models.transformer)
    for module in read_flux_lora(path).modules:
        if module.component != "transformer":
            continue
        layer = layers[module.path]
        now = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
        expected = module.up @ module.down * (module.alpha / module.rank)
        torch.testing.assert_close(now, expected, atol=1e-5, rtol=1e-5)

    small = cfg.model_copy(update={"lora_rank": 2})
    with pytest.raises(LoraSetupError, match="set lora_rank: 4"):
        setup_lora(small, _flux_models(tiny_flux_dev))


@pytest.mark.slow
def test_a_trained_flux_run_exports_to_kohya_and_samples(tiny_flux_dev, trained_lora, tmp_path):
    """The trainer's own checkpoint (its meta, not a hand-made one) exports to kohya with the Flux metadata and
    the same deltas; `loratui sample` renders the base alone (as the in-memory base does) and with the file."""
    from safetensors import safe_open
    from sd_helpers import make_image_dataset, make_job, seed_like_config

    from loratui.cli.app import app
    from loratui.models.flux.lora_files import flux_checkpoint_modules, read_flux_lora
    from loratui.runs.checkpoints import load_checkpoint
    from loratui.train.flux.trainer import train

    data = make_image_dataset(tmp_path / "data", 4, sizes=[(72, 64)])
    config = seed_like_config(
        tmp_path, tiny_flux_dev, data, model_family="flux", batch_size=2, lora_rank=4, alpha=2, max_steps=1
    )
    job = make_job(config)
    assert train(job) == "finished"
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(job.run.path), "--out", str(tmp_path / "k.safetensors")])
    assert result.exit_code == 0, result.output
    with safe_open(str(tmp_path / "k.safetensors"), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["modelspec.architecture"] == "flux-1-dev/lora" and meta["ss_network_alpha"] == "2"
    ckpt = load_checkpoint(job.run.latest_checkpoint(), training_state=False)
    assert meta["ss_timestep_sampling"] == str(ckpt.meta["timestep_sampling"])
    assert meta["ss_steps"] == "1" and meta["ss_output_name"] == ckpt.meta["name"]
    trained = {m.path: m for m in flux_checkpoint_modules(ckpt.lora_state, ckpt.meta)}
    exported = {m.path: m for m in read_flux_lora(tmp_path / "k.safetensors").modules}
    assert set(exported) == set(trained) and len(trained) == 34
    for path, module in trained.items():
        want = module.up @ module.down * (module.alpha / module.rank)
        got = exported[path].up @ exported[path].down * (exported[path].alpha / exported[path].rank)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    common = [
        "sample",
        "--base",
        str(tiny_flux_dev),
        "-p",
        PROMPT,
        "--seed",
        str(SEED),
        "--steps",
        str(STEPS),
    ]
    common += ["--width", str(SIZE), "--height", str(SIZE)]
    result = runner.invoke(app, [*common, "--out", str(tmp_path / "base.png")])  # the base alone
    assert result.exit_code == 0, result.output
    assert "no LoRA" in result.output
    assert np.abs(_pixels(tmp_path / "base.png") - trained_lora[1]).max() <= 1
    result = runner.invoke(
        app, [*common, "--lora", str(tmp_path / "k.safetensors"), "--out", str(tmp_path / "s.png")]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "s.png").is_file()
