"""Stable Diffusion LoRA training end to end on the tiny fixtures (CPU): events, checkpoints, exact resume,
micro-batch invariance, kohya export and loading the result with diffusers."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from sd_helpers import events_of, make_image_dataset, make_job, seed_like_config

from loratui.models.sd.kohya import name_map
from loratui.runs.checkpoints import load_checkpoint
from loratui.train.sd.trainer import train


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest single-threaded (and do not fight other processes for the CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _lora_of(run) -> dict[str, torch.Tensor]:
    return load_file(str(run.latest_checkpoint() / "lora.safetensors"))


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()  # noqa: SIM118


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _load_pipeline(folder: Path):
    import diffusers

    from loratui.models.sd.loading import load_sd_pipeline

    pipe = load_sd_pipeline(folder).pipeline
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe, diffusers.DiffusionPipeline)
    return pipe


def _render(pipe, size: int = 64):
    generator = torch.Generator().manual_seed(0)
    return pipe(
        "a red circle", num_inference_steps=3, height=size, width=size, generator=generator, output_type="np"
    ).images


def _assert_diffusers_consumes(pipe, path: Path, family: str, caplog) -> None:
    """diffusers loads the kohya file, puts every module where its name says, and the output changes."""
    from peft.tuners.lora import LoraLayer

    tensors, _ = _read(path)
    modules = sorted(k[: -len(".alpha")] for k in tensors if k.endswith(".alpha"))
    before = _render(pipe)
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(str(path), adapter_name="trained")
    assert not [r for r in caplog.records if "unexpected" in r.getMessage().lower()]
    components = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    if getattr(pipe, "text_encoder_2", None) is not None:
        components["text_encoder_2"] = pipe.text_encoder_2
    paths = {
        name: [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
        for name, model in components.items()
    }
    layers = {name: dict(model.named_modules()) for name, model in components.items()}
    names = name_map(paths, family, int(pipe.unet.config.layers_per_block))
    assert sorted(names) == modules  # every module of the file became a LoRA layer, and nothing else did
    for name in modules:
        component, module_path = names[name]
        layer = layers[component][module_path]
        assert torch.equal(layer.lora_A["trained"].weight, tensors[f"{name}.lora_down.weight"].float())
        assert torch.equal(layer.lora_B["trained"].weight, tensors[f"{name}.lora_up.weight"].float())
        assert layer.scaling["trained"] == pytest.approx(tensors[f"{name}.alpha"].item() / layer.r["trained"])
    after = _render(pipe)
    assert abs(after - before).max() > 1e-4


def test_seed_config_trains_checkpoints_and_exports_kohya(tiny_sd15, tmp_path, caplog):
    data = make_image_dataset(tmp_path / "data", 6)
    config = seed_like_config(tmp_path, tiny_sd15, data, epochs=2, save_steps=2, keep_last_n=1)
    job = make_job(config)
    assert job.resolved.config.learning_rate == pytest.approx(2e-4)
    assert train(job) == "finished"

    steps = events_of(job.run, "step")
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    assert [e["epoch"] for e in steps] == [0, 0, 1, 1]
    assert all(math.isfinite(e["loss"]) and e["loss"] > 0 and e["samples_per_s"] > 0 for e in steps)
    assert steps[0]["lr"] == pytest.approx(2e-4)
    assert any(job.run.logs_dir.glob("events.out.tfevents.*"))

    # checkpoints: atomic step-N folders, rotation to keep_last_n, full training state
    assert [p.name for p in job.run.checkpoints()] == ["step-4"]
    ckpt = load_checkpoint(job.run.latest_checkpoint())
    assert ckpt.step == 4 and ckpt.meta["data_position"] == 4 and ckpt.meta["epochs_done"] == 2
    assert {"optimizer", "scheduler", "rng"} <= set(ckpt.training_state)
    assert len(ckpt.lora_state) == 256 and all(k.startswith("unet.") for k in ckpt.lora_state)
    assert (ckpt.path / "config.yaml").read_text().count("lora_rank: 8") == 1

    # kohya file: names, shapes, alpha, metadata
    exported = Path(job.resolved.config.output_dir) / "my_style_lora.safetensors"
    assert [e["path"] for e in events_of(job.run, "export")] == [str(exported)]
    assert events_of(job.run, "export")[0]["usage"] == "<lora:my_style_lora:0.8>"
    tensors, meta = _read(exported)
    downs = [k for k in tensors if k.endswith(".lora_down.weight")]
    assert len(downs) == 128
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.alpha" in tensors
    assert any(k.startswith("lora_unet_up_blocks_3_attentions_2_") for k in tensors)
    for key in downs:
        name = key[: -len(".lora_down.weight")]
        down, up = tensors[key], tensors[f"{name}.lora_up.weight"]
        assert down.shape[0] == 8 and up.shape[1] == 8
        assert tensors[f"{name}.alpha"].ndim == 0 and tensors[f"{name}.alpha"].item() == 16
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "16"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_steps"] == "4" and meta["ss_epoch"] == "2" and meta["ss_num_epochs"] == "2"
    assert meta["ss_resolution"] == "(64, 64)" and meta["modelspec.resolution"] == "64x64"
    assert json.loads(meta["ss_dataset_dirs"]) == {"data": {"n_repeats": 1, "img_count": 6}}
    assert json.loads(meta["ss_tag_frequency"])["data"]["flat colour"] == 6
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert float(meta["ss_training_finished_at"]) >= float(meta["ss_training_started_at"])
    # the exported tensors are the last checkpoint's
    assert torch.equal(
        tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"],
        ckpt.lora_state["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"],
    )

    _assert_diffusers_consumes(_load_pipeline(tiny_sd15), exported, "sd15", caplog)


def test_exact_resume_twice_matches_uninterrupted_run(tiny_sd15, tmp_path):
    data = make_image_dataset(tmp_path / "data", 6)
    common = {"epochs": 3, "save_steps": 100, "lr_scheduler": "cosine", "lr_warmup_steps": 1}
    straight = make_job(seed_like_config(tmp_path / "a", tiny_sd15, data, **common))
    assert train(straight) == "finished"

    config = seed_like_config(tmp_path / "b", tiny_sd15, data, **common)
    first = make_job(config)
    assert train(first, stop_after_step=2) == "stopped"
    assert [p.name for p in first.run.checkpoints()] == ["step-2"]
    second = make_job(config, resume_from=first.run.latest_checkpoint(), run=first.run)
    assert train(second, stop_after_step=4) == "stopped"
    third = make_job(config, resume_from=first.run.latest_checkpoint(), run=first.run)
    assert train(third) == "finished"

    assert _max_diff(_lora_of(straight.run), _lora_of(first.run)) <= 1e-6
    expected = [(e["step"], e["epoch"], e["lr"]) for e in events_of(straight.run, "step")]
    got = [(e["step"], e["epoch"], e["lr"]) for e in events_of(first.run, "step")]
    assert got == expected  # no repeated or skipped steps, epochs and LR schedule continue exactly
    assert [e["type"] for e in events_of(first.run) if e["type"].startswith("run_")] == [
        "run_started",
        "run_stopped",
        "run_started",
        "run_stopped",
        "run_started",
        "run_finished",
    ]
    meta = load_checkpoint(first.run.latest_checkpoint()).meta
    assert (meta["step"], meta["epochs_done"], meta["data_position"]) == (6, 3, 6)
    assert first.run.status().step == 6


def test_micro_batches_give_the_same_update(tiny_sd15, tmp_path):
    # 128 px: at 64 px the tiny UNet's 1x1 bottleneck makes GroupNorm over 2 values chaotic, which
    # amplifies the rounding differences of batched convolutions far beyond 1e-5.
    data = make_image_dataset(tmp_path / "data", 8)
    common = {"epochs": 1, "resolution": 128, "save_steps": None}
    one = make_job(seed_like_config(tmp_path / "a", tiny_sd15, data, batch_size=4, **common))
    two = make_job(
        seed_like_config(
            tmp_path / "b", tiny_sd15, data, batch_size=2, gradient_accumulation_steps=2, **common
        )
    )
    assert train(one) == "finished" and train(two) == "finished"
    steps_one, steps_two = events_of(one.run, "step"), events_of(two.run, "step")
    assert len(steps_one) == len(steps_two) == 2
    for a, b in zip(steps_one, steps_two, strict=True):  # loss and gradient norm are scale-sensitive
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert _max_diff(_lora_of(one.run), _lora_of(two.run)) <= 1e-5


def test_sdxl_trains_and_exports_sgm_names(tiny_sdxl, tmp_path, caplog):
    data = make_image_dataset(tmp_path / "data", 4)
    config = seed_like_config(
        tmp_path, tiny_sdxl, data, epochs=1, train_text_encoder=True, save_steps=None, alpha=8, lora_rank=4
    )
    job = make_job(config)
    assert train(job) == "finished"
    exported = Path(job.resolved.config.output_dir) / "my_style_lora.safetensors"
    tensors, meta = _read(exported)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    for name in (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_input_blocks_8_1_transformer_blocks_1_attn2_to_out_0",
        "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_k",
        "lora_unet_output_blocks_0_1_transformer_blocks_0_attn2_to_v",
        "lora_unet_output_blocks_5_1_transformer_blocks_1_attn1_to_q",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te1_text_model_encoder_layers_0_mlp_fc1",
        "lora_te2_text_model_encoder_layers_1_self_attn_out_proj",
    ):
        assert f"{name}.lora_down.weight" in tensors, name
    assert not any("down_blocks" in k or "up_blocks" in k or "mid_block" in k for k in tensors)
    assert tensors["lora_te2_text_model_encoder_layers_1_self_attn_out_proj.alpha"].item() == 8
    _assert_diffusers_consumes(_load_pipeline(tiny_sdxl), exported, "sdxl", caplog)


def test_sd2_v_prediction_and_text_encoder_lora(tiny_sd2v, tmp_path, caplog):
    data = make_image_dataset(tmp_path / "data", 4)
    config = seed_like_config(
        tmp_path,
        tiny_sd2v,
        data,
        epochs=1,
        train_text_encoder=True,
        text_encoder_lr=1e-4,
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net", "proj_in", "q_proj", "out_proj"],
        min_snr_gamma=5.0,
        noise_offset=0.05,
    )
    job = make_job(config)
    assert train(job) == "finished"
    started = events_of(job.run, "run_started")[0]
    assert started["family"] == "sd2" and started["prediction_type"] == "v_prediction"
    tensors, meta = _read(Path(job.resolved.config.output_dir) / "my_style_lora.safetensors")
    assert meta["ss_v2"] == "True" and meta["ss_base_model_version"] == "sd_v2"
    assert meta["modelspec.prediction_type"] == "v" and meta["ss_network_train_unet_only"] == "False"
    names = {k.split(".")[0] for k in tensors}
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj" in names
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2" in names
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in names
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert "lora_te_text_model_encoder_layers_0_self_attn_k_proj" not in names
    _assert_diffusers_consumes(
        _load_pipeline(tiny_sd2v),
        Path(job.resolved.config.output_dir) / "my_style_lora.safetensors",
        "sd2",
        caplog,
    )


def test_output_dir_of_another_run_is_refused(tiny_sd15, tmp_path):
    from loratui.models.sd.lora_files import ExportError

    data = make_image_dataset(tmp_path / "data", 4)
    config = seed_like_config(tmp_path, tiny_sd15, data, epochs=1, save_steps=None)
    first = make_job(config)
    assert train(first) == "finished"
    exported = Path(first.resolved.config.output_dir) / "my_style_lora.safetensors"
    before = exported.read_bytes()
    with pytest.raises(ExportError, match="already exists"):
        train(make_job(config))
    assert exported.read_bytes() == before
    assert train(make_job(config, overwrite=True)) == "finished"
    assert exported.read_bytes() != before
