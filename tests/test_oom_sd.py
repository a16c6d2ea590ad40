"""OOM recovery in the SD trainer on the tiny SD1.5 pipeline, under the memory meter's simulated card."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from sd_helpers import events_of, make_image_dataset, make_job, seed_like_config

from loratui.runs.config_file import read_run_config
from loratui.train.loop.plan import StepPlan
from loratui.train.sd.trainer import train


@pytest.fixture(autouse=True)
def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LORATUI_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LORATUI_DEBUG_SAMPLES", "1")
    monkeypatch.delenv("LORATUI_SIMULATE_VRAM", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _peaks(job) -> list[int]:
    return [e["meter_peak"] for e in events_of(job.run, "step")]


def _lora(job) -> dict[str, torch.Tensor]:
    return load_file(str(job.run.latest_checkpoint() / "lora.safetensors"))


def test_micro_batch_rung_recovers_and_equals_a_run_configured_that_way(tiny_sd15, tmp_path) -> None:
    # 128 px, as in test_sd_train: at 64 px the tiny UNet amplifies batched-convolution rounding
    data = make_image_dataset(tmp_path / "data", 8)
    common = {"epochs": 1, "resolution": 128, "save_steps": None}
    reference = make_job(
        seed_like_config(
            tmp_path / "ref",
            tiny_sd15,
            data,
            batch_size=2,
            gradient_accumulation_steps=2,
            simulate_vram="1TiB",
            **common,
        )
    )
    probe = make_job(
        seed_like_config(tmp_path / "probe", tiny_sd15, data, batch_size=4, simulate_vram="1TiB", **common)
    )
    assert train(reference) == "finished" and train(probe) == "finished"
    assert max(_peaks(reference)) < min(_peaks(probe))
    budget = (max(_peaks(reference)) + min(_peaks(probe))) // 2

    job = make_job(
        seed_like_config(tmp_path / "oom", tiny_sd15, data, batch_size=4, simulate_vram=str(budget), **common)
    )
    assert train(job) == "finished"
    assert [(e["step"], e["rung"]) for e in events_of(job.run, "oom")] == [(1, "micro_batch")]
    recovered = events_of(job.run, "oom_recovered")
    assert len(recovered) == 1 and recovered[0]["new"]["batch_size"] == 2
    assert recovered[0]["new"]["gradient_accumulation_steps"] == 2 and recovered[0]["seconds"] > 0
    steps = events_of(job.run, "step")
    plan = StepPlan(8, 4, 1, None, 7)
    assert [e["step"] for e in steps] == [1, 2]
    assert [e["sample_indices"] for e in steps] == [plan.samples_for_step(s) for s in range(2)]
    assert sorted(steps[0]["sample_indices"] + steps[1]["sample_indices"]) == list(range(8))
    a, b = _lora(job), _lora(reference)
    assert set(a) == set(b) and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    # the exported kohya file's metadata states the settings really used
    exported = Path(events_of(job.run, "export")[-1]["path"])
    with safe_open(str(exported), "pt") as handle:
        meta = handle.metadata()
    assert meta["ss_batch_size_per_device"] == "2" and meta["ss_gradient_accumulation_steps"] == "2"
    assert "batch_size: 2\n" in read_run_config(job.run.path).to_yaml()  # what a restarted worker trains with
    assert [r["rung"] for r in events_of(job.run, "run_finished")[0]["oom_recoveries"]] == ["micro_batch"]


@pytest.mark.slow
def test_caching_rung_moves_the_vae_off_the_card(tiny_sd15, tmp_path) -> None:
    data = make_image_dataset(tmp_path / "data", 4)
    common = {
        "epochs": 1,
        "resolution": 128,
        "save_steps": None,
        "batch_size": 1,
        "gradient_accumulation_steps": 4,
        "gradient_checkpointing": True,
    }
    cached = make_job(
        seed_like_config(
            tmp_path / "cached",
            tiny_sd15,
            data,
            simulate_vram="1TiB",
            cache_latents=True,
            cache_text_encoder_outputs=True,
            **common,
        )
    )
    plain = make_job(seed_like_config(tmp_path / "plain", tiny_sd15, data, simulate_vram="1TiB", **common))
    assert train(cached) == "finished" and train(plain) == "finished"
    assert max(_peaks(cached)) < min(_peaks(plain))
    budget = (max(_peaks(cached)) + min(_peaks(plain))) // 2
    weights = sum(f.stat().st_size for f in tiny_sd15.rglob("*.safetensors"))
    assert budget > weights * 1.05  # the uncached models themselves fit; their step does not

    job = make_job(seed_like_config(tmp_path / "oom", tiny_sd15, data, simulate_vram=str(budget), **common))
    assert train(job) == "finished"
    ooms = events_of(job.run, "oom")
    assert [e["rung"] for e in ooms] == ["offload"]
    assert ooms[0]["new"]["cache_latents"] and ooms[0]["new"]["cache_text_encoder_outputs"]
    assert any("cached latents" in e.get("message", "") for e in events_of(job.run, "info"))
    text = read_run_config(job.run.path).to_yaml()
    assert "cache_latents: true" in text and "cache_text_encoder_outputs: true" in text
    assert max(_peaks(job)) <= budget


class _Module:
    """Stands in for the VAE / a text encoder: remembers where it was moved."""

    def __init__(self) -> None:
        self.where = "cpu"

    def to(self, device):
        self.where = str(device)
        return self


def _applier_world(monkeypatch, *, fail: str | None = None):
    from types import SimpleNamespace

    import loratui.train.sd.setup as trainer
    from loratui.train.sd.oom import sd_rung_applier

    calls: list[str] = []
    models = SimpleNamespace(
        vae=_Module(), text_encoders=[_Module(), _Module()], device="cuda:0", text_on_device=False, unet=None
    )

    def fake_latents(cfg, models, dataset, reporter):
        calls.append("latents")
        models.vae.to(models.device)
        if fail == "latents":
            raise torch.OutOfMemoryError("out of memory while caching")
        return SimpleNamespace(cache_enabled=True, dataset=dataset)

    def fake_text(cfg, models, dataset, reporter):
        calls.append("text")
        for encoder in models.text_encoders:
            encoder.to(models.device)
        return SimpleNamespace(cache_enabled=True)

    monkeypatch.setattr(trainer, "setup_latents", fake_latents)
    monkeypatch.setattr(trainer, "setup_text", fake_text)
    monkeypatch.setattr(trainer, "setup_dataset", lambda cfg, reporter: ["a", "b"])
    old_text = SimpleNamespace(cache_enabled=True)  # captions cached, encoders off the card
    context = SimpleNamespace(dataset=["A", "B"], latents=SimpleNamespace(cache_enabled=False), text=old_text)
    job = SimpleNamespace(resolved=SimpleNamespace(config=SimpleNamespace(train_text_encoder=False)))
    return sd_rung_applier(job, models, context, reporter=None), models, context, calls, old_text


def test_resolution_rung_keeps_the_caption_cache_and_its_encoders_off_the_card(monkeypatch) -> None:
    apply, models, context, calls, old_text = _applier_world(monkeypatch)
    assert apply({"resolution": 448})
    assert calls == ["latents"] and context.text is old_text and context.dataset == ["a", "b"]
    assert [e.where for e in models.text_encoders] == ["cpu", "cpu"]


def test_a_caching_pass_that_fails_puts_everything_back(monkeypatch) -> None:
    apply, models, context, calls, old_text = _applier_world(monkeypatch, fail="latents")
    with pytest.raises(torch.OutOfMemoryError):
        apply({"resolution": 448, "cache_latents": True})
    # the old (uncached) latent source needs the VAE on the card; the old captions stay cached, encoders off
    assert (
        context.dataset == ["A", "B"] and context.latents.cache_enabled is False and context.text is old_text
    )
    assert models.vae.where == "cuda:0" and [e.where for e in models.text_encoders] == ["cpu", "cpu"]
    assert models.text_on_device is False
