"""v-prediction and zero terminal SNR: detection from a single file's marker keys, the rescaled schedule,
the v target, a finite loss at the last timestep, a run from YAML, and samples drawn with the schedule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from sd_helpers import events_of, make_image_dataset, make_job, pipeline_to_ldm_file, seed_like_config

from loratui.config.base_model import inspect_base_model
from loratui.models.sd.loading import load_sd_pipeline
from loratui.models.sd.loss import min_snr_weights, per_sample_loss, training_target
from loratui.models.sd.schedule import ZTSNR_GUIDANCE_RESCALE, training_scheduler


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _with_markers(folder: Path, dest: Path, *markers: str) -> Path:
    """The tiny pipeline as one single-file checkpoint carrying NoobAI-style marker keys."""
    path = pipeline_to_ldm_file(folder, dest)
    state = load_file(str(path))
    for key in markers:
        state[key] = torch.tensor([])  # NoobAI's markers are empty tensors
    save_file(state, str(path))
    return path


@pytest.mark.parametrize("fixture", ["tiny_sd15", "tiny_sdxl"])
def test_v_pred_marker_key_sets_v_prediction_and_ztsnr(fixture, request, tmp_path):
    folder = request.getfixturevalue(fixture)
    plain = load_sd_pipeline(pipeline_to_ldm_file(folder, tmp_path / "plain.safetensors"), config_dir=folder)
    assert plain.prediction_type == "epsilon" and not plain.zero_terminal_snr

    vpred = _with_markers(folder, tmp_path / "vpred.safetensors", "v_pred")
    info = inspect_base_model(str(vpred))
    assert info.kind == "sd-checkpoint" and info.prediction_type == "v_prediction"
    assert not info.zero_terminal_snr
    loaded = load_sd_pipeline(vpred, config_dir=folder)
    assert loaded.prediction_type == "v_prediction" and not loaded.zero_terminal_snr
    assert loaded.pipeline.scheduler.config.prediction_type == "v_prediction"

    both = _with_markers(folder, tmp_path / "noob.safetensors", "v_pred", "ztsnr")
    assert inspect_base_model(str(both)).zero_terminal_snr
    loaded = load_sd_pipeline(both, config_dir=folder)
    assert loaded.prediction_type == "v_prediction" and loaded.zero_terminal_snr
    sampler = loaded.pipeline.scheduler
    assert sampler.config.rescale_betas_zero_snr and sampler.config.timestep_spacing == "trailing"
    sampler.set_timesteps(4)
    assert int(sampler.timesteps[0]) == 999  # trailing: sampling starts at the pure-noise timestep
    expected = "EulerDiscreteScheduler" if fixture == "tiny_sdxl" else "DDIMScheduler"  # PNDM has no zero SNR
    assert type(sampler).__name__ == expected
    from loratui.sample.sd_sample import generate

    loaded.pipeline.set_progress_bar_config(disable=True)
    image = generate(loaded.pipeline, "a red circle", steps=2, width=64, height=64, guidance_rescale=0.7)
    assert image.size == (64, 64)
    pixels = loaded.pipeline(
        "a red circle", num_inference_steps=2, height=64, width=64, guidance_rescale=0.7, output_type="np"
    ).images
    assert np.isfinite(pixels).all()  # from the pure-noise timestep without nan/inf

    # explicit settings win over the markers
    overridden = load_sd_pipeline(both, config_dir=folder, prediction_type="epsilon", zero_terminal_snr=False)
    assert overridden.prediction_type == "epsilon" and not overridden.zero_terminal_snr
    assert not overridden.pipeline.scheduler.config.get("rescale_betas_zero_snr")


def _paper_rescale(betas: np.ndarray) -> np.ndarray:
    """Algorithm 1 of Lin et al. 2023, written out: alphas_cumprod of the rescaled schedule."""
    sqrt_bar = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_bar[0], sqrt_bar[-1]
    sqrt_bar = (sqrt_bar - last) * first / (first - last)
    return sqrt_bar**2


def test_ztsnr_schedule_reaches_zero_and_matches_the_paper(tiny_sdxl):
    pipe = load_sd_pipeline(tiny_sdxl).pipeline
    plain = training_scheduler(pipe.scheduler.config, "v_prediction", False)
    ztsnr = training_scheduler(pipe.scheduler.config, "v_prediction", True)
    assert float(plain.alphas_cumprod[-1]) > 0
    assert float(ztsnr.alphas_cumprod[-1]) == 0.0
    expected = _paper_rescale(plain.betas.double().numpy())
    assert np.allclose(ztsnr.alphas_cumprod.double().numpy(), expected, atol=1e-6)
    assert float(ztsnr.alphas_cumprod[0]) == pytest.approx(float(plain.alphas_cumprod[0]), rel=1e-5)


def test_training_target_is_v_and_the_terminal_loss_is_finite(tiny_sdxl):
    pipe = load_sd_pipeline(tiny_sdxl).pipeline
    scheduler = training_scheduler(pipe.scheduler.config, "v_prediction", True)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 8, 8, generator=generator)
    noise = torch.randn(3, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([0, 500, 999])
    target = training_target(scheduler, latents, noise, timesteps, "v_prediction")
    alpha_bar = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    expected = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents  # v = sqrt(a) eps - sqrt(1-a) x0
    assert torch.allclose(target, expected, atol=1e-6)
    assert torch.allclose(target[2], -latents[2])  # SNR 0: v is minus the clean latent
    noisy = scheduler.add_noise(latents, noise, timesteps)
    assert torch.allclose(noisy[2], noise[2])  # the last timestep is pure noise
    prediction = torch.zeros_like(target)
    for kind in ("v_prediction", "epsilon"):
        weights = min_snr_weights(scheduler.alphas_cumprod, timesteps, 5.0, kind)
        assert torch.isfinite(weights).all(), kind
        loss = per_sample_loss(
            prediction,
            target,
            timesteps,
            alphas_cumprod=scheduler.alphas_cumprod,
            prediction_type=kind,
            min_snr_gamma=5.0,
        )
        assert torch.isfinite(loss).all(), kind
    snr = scheduler.alphas_cumprod[timesteps[:2]] / (1 - scheduler.alphas_cumprod[timesteps[:2]])
    eps = min_snr_weights(scheduler.alphas_cumprod, timesteps, 5.0, "epsilon")
    assert torch.allclose(eps[:2], torch.clamp(snr, max=5.0) / snr)  # min(SNR, g) / SNR where SNR > 0
    assert eps[2] == 1.0  # its limit at SNR 0
    v = min_snr_weights(scheduler.alphas_cumprod, timesteps, 5.0, "v_prediction")
    assert torch.allclose(v[:2], torch.clamp(snr, max=5.0) / (snr + 1))


def test_vpred_ztsnr_run_trains_from_yaml_and_samples_with_the_schedule(tiny_sdxl, tmp_path, monkeypatch):
    import diffusers

    seen: list[dict] = []
    original = diffusers.StableDiffusionXLPipeline.__call__

    def recording_call(self, *args, **kwargs):
        seen.append(
            {
                "rescale": self.scheduler.config.get("rescale_betas_zero_snr"),
                "spacing": self.scheduler.config.get("timestep_spacing"),
                "prediction": self.scheduler.config.get("prediction_type"),
                "guidance_rescale": kwargs.get("guidance_rescale"),
                "last_alpha_bar": float(self.scheduler.alphas_cumprod[-1]),
            }
        )
        kwargs["num_inference_steps"] = 2
        return original(self, *args, **kwargs)

    monkeypatch.setattr(diffusers.StableDiffusionXLPipeline, "__call__", recording_call)
    data = make_image_dataset(tmp_path / "data", 4)
    config = seed_like_config(
        tmp_path,
        tiny_sdxl,
        data,
        epochs=1,
        save_steps=None,
        lora_rank=4,
        alpha=4,
        v_parameterization=True,  # kohya's spelling
        zero_terminal_snr=True,
        min_snr_gamma=5.0,
        sample_prompts=["a red circle"],
        sample_every_steps=1,
    )
    job = make_job(config)
    assert job.resolved.config.prediction_type == "v_prediction"
    from loratui.train.sd.trainer import train

    assert train(job) == "finished"
    started = events_of(job.run, "run_started")[0]
    assert started["prediction_type"] == "v_prediction" and started["zero_terminal_snr"] is True
    losses = [e["loss"] for e in events_of(job.run, "step")]
    assert losses and all(np.isfinite(losses))
    assert events_of(job.run, "sample")
    assert seen and all(
        s["rescale"] and s["spacing"] == "trailing" and s["prediction"] == "v_prediction" for s in seen
    )
    assert all(s["guidance_rescale"] == ZTSNR_GUIDANCE_RESCALE for s in seen)
    exported = Path(job.resolved.config.output_dir) / "my_style_lora.safetensors"
    from safetensors import safe_open

    with safe_open(str(exported), "pt") as handle:
        meta = handle.metadata()
    assert meta["ss_v_parameterization"] == "True" and meta["ss_zero_terminal_snr"] == "True"
    assert meta["modelspec.prediction_type"] == "v"

    # resuming with another noise schedule is refused, naming the setting to use
    changed = seed_like_config(
        tmp_path / "resume", tiny_sdxl, data, lora_rank=4, alpha=4, v_parameterization=True, max_steps=2
    )
    resumed = make_job(changed, resume_from=job.run.latest_checkpoint(), run=job.run)
    with pytest.raises(ValueError, match="zero_terminal_snr True"):
        train(resumed)


def test_config_spellings_and_refusals(tmp_path):
    from loratui.config import load_config
    from loratui.config.errors import ConfigError

    def resolve(text: str):
        path = tmp_path / "c.yaml"
        path.write_text("base_model: x.safetensors\ntrain_data_dir: d\n" + text, encoding="utf-8")
        return load_config(path).config

    assert resolve("v_parameterization: true\n").prediction_type == "v_prediction"
    assert resolve("v_parameterization: false\n").prediction_type == "auto"
    assert resolve("prediction_type: vpred\nztsnr: true\n").zero_terminal_snr is True
    assert resolve("").zero_terminal_snr is None
    with pytest.raises(ConfigError, match="zero_terminal_snr needs v-prediction"):
        resolve("prediction_type: epsilon\nzero_terminal_snr: true\n")
