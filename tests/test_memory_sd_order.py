"""The SD trainer's setup order that the estimate models: caching passes before the UNet takes the device."""

from __future__ import annotations

from sd_helpers import make_image_dataset, make_job, seed_like_config

from loratui.config import TrainConfig
from loratui.memory.estimate import estimate_peak
from loratui.train.sd import setup as sd_setup
from loratui.train.sd import trainer as sd_trainer
from loratui.train.sd.latent_cache import LatentSource


def test_caching_runs_before_the_unet_is_placed_and_encoders_leave(tiny_sd15, tmp_path, monkeypatch) -> None:
    order: list[str] = []
    placed = sd_trainer.place_unet
    precompute = LatentSource.precompute
    cache_captions = sd_setup.cache_all_captions
    seen: dict[str, object] = {}

    def spy_place(models) -> None:
        order.append("unet placed")
        seen["models"] = models
        placed(models)

    def spy_precompute(self, *args, **kwargs):
        order.append("latents cached")
        return precompute(self, *args, **kwargs)

    def spy_captions(text, dataset) -> None:
        order.append("captions cached")
        cache_captions(text, dataset)

    monkeypatch.setattr(sd_trainer, "place_unet", spy_place)
    monkeypatch.setattr(LatentSource, "precompute", spy_precompute)
    monkeypatch.setattr(sd_setup, "cache_all_captions", spy_captions)
    data = make_image_dataset(tmp_path / "data", 2)
    config = seed_like_config(
        tmp_path / "run",
        tiny_sd15,
        data,
        resolution=64,
        max_steps=1,
        save_steps=None,
        cache_latents=True,
        cache_text_encoder_outputs=True,
    )
    assert sd_trainer.train(make_job(config)) == "finished"
    assert order == ["latents cached", "captions cached", "unet placed"]
    models = seen["models"]
    assert models.text_on_device is False  # the frozen encoders left the device after caching
    assert all(next(e.parameters()).device.type == "cpu" for e in models.text_encoders)


def test_estimate_follows_the_order() -> None:
    """On a GPU the SDXL caching passes hold only the encoder being used, not the UNet."""
    base = {"task_type": "image-generation", "model_family": "sdxl", "resolution": 1024}
    uncached = estimate_peak(TrainConfig(**base, gradient_checkpointing=True), device="cuda")
    cached = estimate_peak(
        TrainConfig(**base, gradient_checkpointing=True, cache_latents=True, cache_text_encoder_outputs=True),
        device="cuda",
    )
    assert {"vae", "text_encoders"} <= set(uncached.breakdown)
    assert not {"vae", "text_encoders"} & set(cached.breakdown)
    assert cached.total_bytes < uncached.total_bytes
    # on the CPU nothing moves: every module stays in memory
    on_cpu = estimate_peak(
        TrainConfig(**base, gradient_checkpointing=True, cache_latents=True, cache_text_encoder_outputs=True),
        device="cpu",
    )
    assert {"vae", "text_encoders", "unet_weights"} <= set(on_cpu.breakdown)
