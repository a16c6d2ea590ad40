"""Trainer options on the tiny SD 1.5 fixture: caching, init_lora, samples, stop signals, precision, buckets."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sd_helpers import events_of, make_image_dataset, make_job, seed_like_config

from loratui.train.sd.trainer import train


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _lora(run) -> dict[str, torch.Tensor]:
    return load_file(str(run.latest_checkpoint() / "lora.safetensors"))


def _max_diff(a, b) -> float:
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _messages(run, kind: str) -> list[str]:
    return [e["message"] for e in events_of(run, kind)]


def test_latent_and_text_caching_give_the_same_lora(tiny_sd15, tmp_path):
    data = make_image_dataset(tmp_path / "data", 4)
    common = {"epochs": 2, "resolution": 128, "save_steps": None, "flip_aug": True}
    plain = make_job(seed_like_config(tmp_path / "a", tiny_sd15, data, **common))
    cached = make_job(
        seed_like_config(
            tmp_path / "b", tiny_sd15, data, cache_latents=True, cache_text_encoder_outputs=True, **common
        )
    )
    disk_config = seed_like_config(tmp_path / "c", tiny_sd15, data, cache_latents_to_disk=True, **common)
    disk = make_job(disk_config)
    for job in (plain, cached, disk):
        assert train(job) == "finished"
    assert _max_diff(_lora(plain.run), _lora(cached.run)) <= 1e-5
    assert _max_diff(_lora(plain.run), _lora(disk.run)) <= 1e-5
    assert "cached latents: 8 encoded" in " ".join(_messages(cached.run, "info"))  # 4 images x 2 flips
    files = list((tmp_path / "c" / "runs" / ".cache" / "latents").glob("*.safetensors"))
    assert len(files) == 8
    again = make_job(disk_config, overwrite=True)
    assert train(again) == "finished"
    assert "cached latents: 0 encoded" in " ".join(_messages(again.run, "info"))
    assert _max_diff(_lora(disk.run), _lora(again.run)) == 0


def test_text_cache_is_refused_when_captions_change(tiny_sd15, tmp_path):
    data = make_image_dataset(tmp_path / "data", 4)
    job = make_job(
        seed_like_config(
            tmp_path,
            tiny_sd15,
            data,
            max_steps=1,
            cache_text_encoder_outputs=True,
            caption_dropout=0.2,
            cache_latents=True,
            random_crop=True,
            save_steps=None,
        )
    )
    assert train(job) == "finished"
    warnings = " ".join(_messages(job.run, "warning"))
    assert "cache_text_encoder_outputs is off" in warnings and "latent caching is turned off" in warnings


def test_init_lora_from_kohya_and_diffusers_files(tiny_sd15, tmp_path):
    from loratui.models.sd.lora_files import export_checkpoint

    data = make_image_dataset(tmp_path / "data", 4)
    first = make_job(
        seed_like_config(tmp_path / "a", tiny_sd15, data, epochs=1, learning_rate="1e-3", save_steps=None)
    )
    assert train(first) == "finished"
    kohya = Path(events_of(first.run, "export")[0]["path"])
    diffusers_file = export_checkpoint(
        first.run.latest_checkpoint(), fmt="diffusers", out=tmp_path / "d.safetensors"
    )
    trained = _lora(first.run)

    def delta(state, scale):
        key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
        return state[f"{key}.lora_B.weight"] @ state[f"{key}.lora_A.weight"] * scale

    for name, source, alpha in (("k", kohya, 16), ("d", diffusers_file, 4)):
        job = make_job(
            seed_like_config(
                tmp_path / name,
                tiny_sd15,
                data,
                init_lora=str(source),
                alpha=alpha,
                max_steps=1,
                learning_rate="1e-12",
                weight_decay=0.0,
                save_steps=None,
            )
        )
        assert train(job) == "finished"
        started = _lora(job.run)
        assert (
            _max_diff(
                {k: v for k, v in started.items() if "lora_A" in k},
                {k: v for k, v in trained.items() if "lora_A" in k},
            )
            < 1e-6
        )
        # the same LoRA delta, whatever this run's alpha (lora_B is rescaled)
        assert torch.allclose(delta(started, alpha / 8), delta(trained, 16 / 8), atol=1e-7)
        assert any("init_lora: started from 128 module(s)" in m for m in _messages(job.run, "info"))


def test_samples_are_rendered_during_training(tiny_sd15, tmp_path):
    data = make_image_dataset(tmp_path / "data", 4)
    job = make_job(
        seed_like_config(
            tmp_path,
            tiny_sd15,
            data,
            epochs=2,
            sample_prompts=["a red circle"],
            sample_every_steps=1,
            save_steps=None,
        )
    )
    assert train(job) == "finished"
    samples = events_of(job.run, "sample")
    assert [e["step"] for e in samples] == [1, 2]
    assert all(Path(e["path"]).is_file() and Path(e["path"]).parent == job.run.samples_dir for e in samples)
    from PIL import Image

    assert Image.open(samples[0]["path"]).size == (64, 64)


def test_samples_that_run_out_of_memory_are_skipped_and_training_goes_on(tiny_sd15, tmp_path, monkeypatch):
    import loratui.data.image_io as sd_sample

    real_save_png, calls = sd_sample.save_png, []

    def first_runs_out(image, path):
        calls.append(path)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 MiB")
        return real_save_png(image, path)

    monkeypatch.setattr(sd_sample, "save_png", first_runs_out)
    data = make_image_dataset(tmp_path / "data", 4)
    config = seed_like_config(
        tmp_path,
        tiny_sd15,
        data,
        epochs=2,
        sample_prompts=["a red circle"],
        sample_every_steps=1,
        save_steps=None,
    )
    job = make_job(config)
    assert train(job) == "finished"
    assert [e["step"] for e in events_of(job.run, "step")] == [1, 2]
    skipped = [e for e in events_of(job.run, "warning") if e.get("skipped")]
    assert [(e["skipped"], e["step"]) for e in skipped] == [("samples", 1)]
    assert "out of memory" in skipped[0]["message"] and "loratui sample" in skipped[0]["message"]
    assert [e["step"] for e in events_of(job.run, "sample")] == [2]


def test_sigterm_saves_a_checkpoint_and_stops(tiny_sd15, tmp_path):
    data = make_image_dataset(tmp_path / "data", 4)
    job = make_job(seed_like_config(tmp_path, tiny_sd15, data, max_steps=200, save_steps=None, batch_size=1))

    def send_when_started() -> None:
        deadline = time.time() + 120
        while time.time() < deadline:
            if events_of(job.run, "step"):
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.05)

    before = signal.getsignal(signal.SIGTERM)
    sender = threading.Thread(target=send_when_started, daemon=True)
    sender.start()
    assert train(job) == "stopped"
    sender.join()
    stopped = events_of(job.run, "run_stopped")[0]
    assert stopped["reason"] == "SIGTERM"
    step = events_of(job.run, "step")[-1]["step"]
    assert job.run.latest_checkpoint().name == f"step-{step}" and step < 200
    assert signal.getsignal(signal.SIGTERM) is before  # handlers are put back after an in-process run


def test_bf16_gradient_checkpointing_and_dropout(tiny_sd15, tmp_path):
    data = make_image_dataset(tmp_path / "data", 2)
    job = make_job(
        seed_like_config(
            tmp_path,
            tiny_sd15,
            data,
            max_steps=1,
            batch_size=2,
            mixed_precision="bf16",
            gradient_checkpointing=True,
            lora_dropout=0.1,
            lr_scheduler="linear",
            save_steps=None,
        )
    )
    assert train(job) == "finished"
    assert events_of(job.run, "run_started")[0]["precision"] == "bf16"
    assert all(v.dtype == torch.float32 for v in _lora(job.run).values())
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in events_of(job.run, "step"))


def test_aspect_ratio_buckets_train_together(tiny_sd15, tmp_path):
    data = make_image_dataset(tmp_path / "data", 3, sizes=[(192, 96), (96, 192), (128, 128)])
    job = make_job(
        seed_like_config(
            tmp_path, tiny_sd15, data, max_steps=1, batch_size=3, resolution=128, bucket=True, save_steps=None
        )
    )
    assert train(job) == "finished"
    [step] = events_of(job.run, "step")
    assert torch.isfinite(torch.tensor(step["loss"])) and step["loss"] > 0


def test_adamw8bit_without_bitsandbytes_says_how_to_install(tiny_sd15, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name.startswith("bitsandbytes"):
            raise ImportError("no bitsandbytes")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    from loratui.train.loop.optim import MissingDependency

    data = make_image_dataset(tmp_path / "data", 2)
    job = make_job(seed_like_config(tmp_path, tiny_sd15, data, optimizer="adamw8bit", max_steps=1))
    with pytest.raises(MissingDependency, match="pip install"):
        train(job)
