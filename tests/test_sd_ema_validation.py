"""EMA of the LoRA weights and the validation loss of image runs, end to end on the tiny fixtures (CPU)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from sd_helpers import events_of, make_image_dataset, make_job, seed_like_config

from loratui.models.sd.lora import named_adapter_parameters
from loratui.models.sd.lora_files import ExportError, export_checkpoint
from loratui.runs.checkpoints import MANIFEST, load_checkpoint
from loratui.train.sd import trainer as sd_trainer
from loratui.train.sd.trainer import train
from loratui.train.sd.validation import fixed_timesteps, held_out_images


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _record_weights(monkeypatch) -> list[dict[str, torch.Tensor]]:
    """Adapter weights before the first step and after every optimizer step of the runs that follow."""
    seen: dict[str, object] = {}
    weights: list[dict[str, torch.Tensor]] = []
    setup_lora, setup_models = sd_trainer.setup_lora, sd_trainer.setup_models

    def capture_models(*args, **kwargs):
        seen["models"] = setup_models(*args, **kwargs)
        return seen["models"]

    def capture_lora(cfg, models, reporter):
        seen["plan"], params = setup_lora(cfg, models, reporter)
        return seen["plan"], params

    def snapshot() -> dict[str, torch.Tensor]:
        named = named_adapter_parameters(seen["models"].components(), seen["plan"])
        return {k: p.detach().float().cpu().clone() for k, p in named.items()}

    run = sd_trainer.RecoveringStep.run

    def recorded_run(self, *args, **kwargs):
        if not weights:
            weights.append(snapshot())
        result = run(self, *args, **kwargs)
        weights.append(snapshot())
        return result

    monkeypatch.setattr(sd_trainer, "setup_models", capture_models)
    monkeypatch.setattr(sd_trainer, "setup_lora", capture_lora)
    monkeypatch.setattr(sd_trainer.RecoveringStep, "run", recorded_run)
    return weights


def _hand_ema(weights: list[dict[str, torch.Tensor]], decay: float, every: int) -> dict[str, torch.Tensor]:
    ema = {k: v.clone() for k, v in weights[0].items()}
    for step, current in enumerate(weights[1:], start=1):
        if step % every == 0:
            ema = {k: decay * ema[k] + (1 - decay) * current[k] for k in ema}
    return ema


def test_exported_ema_equals_the_hand_computed_ema(tiny_sd15, tmp_path, monkeypatch):
    weights = _record_weights(monkeypatch)
    sampled: list[tuple[int, dict[str, torch.Tensor]]] = []

    def fake_render(models, prompts, step, folder, cfg):  # what the samples are drawn with
        sampled.append(
            (
                step,
                {
                    k: v.detach().float().cpu().clone()
                    for k, v in models.unet.named_parameters()
                    if "lora_" in k
                },
            )
        )
        return []

    monkeypatch.setattr(sd_trainer, "render_samples", fake_render)
    data = make_image_dataset(tmp_path / "data", 6)
    config = seed_like_config(
        tmp_path / "a",
        tiny_sd15,
        data,
        batch_size=2,
        epochs=2,
        save_steps=None,
        learning_rate="5e-3",
        ema_decay=0.8,
        ema_update_every=2,
        export_ema=True,
        sample_prompts=["a red circle"],
        sample_every_steps=3,
    )
    job = make_job(config)
    assert train(job) == "finished"
    assert len(weights) == 7  # before step 1, then after each of the 6 steps
    expected = _hand_ema(weights, 0.8, 2)
    latest = job.run.latest_checkpoint()
    ckpt = load_checkpoint(latest)
    assert ckpt.training_state["ema"]["updates"] == 3
    assert _max_diff(ckpt.training_state["ema"]["shadow"], expected) <= 1e-6
    assert _max_diff(ckpt.lora_state, weights[-1]) <= 1e-6  # lora.safetensors keeps the trained weights
    assert _max_diff(expected, weights[-1]) > 1e-4  # the EMA is not just the last weights
    # samples during training are drawn with the EMA weights of that step (as OneTrainer does)
    assert [step for step, _ in sampled] == [3, 6]
    at_3 = _hand_ema(weights[:4], 0.8, 2)
    unet_at_3 = {k.removeprefix("unet."): v for k, v in at_3.items() if k.startswith("unet.")}
    drawn = {k.replace(".default", ""): v for k, v in sampled[0][1].items()}
    assert drawn.keys() == unet_at_3.keys() and _max_diff(drawn, unet_at_3) <= 1e-6

    # the run's export (export_ema: true) is the kohya file of the hand-computed EMA
    hand = tmp_path / "hand" / latest.name
    shutil.copytree(latest, hand)
    (hand / MANIFEST).unlink(missing_ok=True)
    save_file({k: v.contiguous() for k, v in expected.items()}, str(hand / "lora.safetensors"))
    reference = export_checkpoint(hand, out=tmp_path / "hand.safetensors")
    exported = Path(job.resolved.config.output_dir) / "my_style_lora.safetensors"
    assert _max_diff(load_file(str(exported)), load_file(str(reference))) <= 1e-6
    # `loratui export RUN --ema` writes the same file; without --ema the trained weights
    via_cli = export_checkpoint(latest, out=tmp_path / "cli.safetensors", ema=True)
    assert _max_diff(load_file(str(via_cli)), load_file(str(exported))) == 0
    from typer.testing import CliRunner

    from loratui.cli.app import app

    result = CliRunner().invoke(
        app, ["export", str(job.run.path), "--ema", "--out", str(tmp_path / "e.safetensors")]
    )
    assert result.exit_code == 0, result.output
    assert _max_diff(load_file(str(tmp_path / "e.safetensors")), load_file(str(exported))) == 0
    plain = export_checkpoint(latest, out=tmp_path / "plain.safetensors")
    assert _max_diff(load_file(str(plain)), load_file(str(reference))) > 1e-4
    # samples are drawn with the EMA weights when it is on: the event says so
    export_events = events_of(job.run, "export")
    assert export_events[-1]["ema"] is True


def test_export_ema_of_a_run_without_ema_is_refused(tiny_sd15, tmp_path):
    data = make_image_dataset(tmp_path / "data", 4)
    job = make_job(seed_like_config(tmp_path, tiny_sd15, data, epochs=1, save_steps=None))
    assert train(job) == "finished"
    with pytest.raises(ExportError, match="holds no EMA weights: train with ema_decay"):
        export_checkpoint(job.run.latest_checkpoint(), out=tmp_path / "x.safetensors", ema=True)
    from typer.testing import CliRunner

    from loratui.cli.app import app

    result = CliRunner().invoke(
        app, ["export", str(job.run.path), "--ema", "--out", str(tmp_path / "y.safetensors")]
    )
    assert result.exit_code == 1 and "holds no EMA weights" in result.output


def test_exact_resume_with_ema(tiny_sd15, tmp_path):
    data = make_image_dataset(tmp_path / "data", 6)
    common = {
        "epochs": 3,
        "save_steps": 100,
        "ema_decay": 0.7,
        "ema_on_cpu": True,
        "learning_rate": "5e-3",
        "batch_size": 2,
        "val_split": 0.2,  # 2 images held out: 4 trained, 2 steps per epoch
    }
    straight = make_job(seed_like_config(tmp_path / "a", tiny_sd15, data, **common))
    assert train(straight) == "finished"
    config = seed_like_config(tmp_path / "b", tiny_sd15, data, **common)
    first = make_job(config)
    assert train(first, stop_after_step=2) == "stopped"
    second = make_job(config, resume_from=first.run.latest_checkpoint(), run=first.run)
    assert train(second) == "finished"
    a = load_checkpoint(straight.run.latest_checkpoint()).training_state["ema"]
    b = load_checkpoint(first.run.latest_checkpoint()).training_state["ema"]
    assert a["updates"] == b["updates"] == 6
    assert _max_diff(a["shadow"], b["shadow"]) <= 1e-6
    # the validation loss is comparable between runs: the resumed run measures what the straight one did
    # (the stop at step 2 saves and leaves at once, without its validation)
    evals_a = {e["step"]: e["eval_loss"] for e in events_of(straight.run, "eval")}
    evals_b = {e["step"]: e["eval_loss"] for e in events_of(first.run, "eval")}
    assert sorted(evals_a) == [2, 4, 6] and sorted(evals_b) == [4, 6]
    assert all(evals_b[step] == pytest.approx(evals_a[step], rel=1e-6) for step in evals_b)
    assert not [e for e in events_of(first.run, "warning") if "EMA" in e.get("message", "")]


# --- validation loss ---------------------------------------------------------------------------------------


def test_held_out_images_depend_on_the_seed_only():
    assert held_out_images(10, 0.25, 3) == held_out_images(10, 0.25, 3)
    assert len(held_out_images(10, 0.25, 3)) == 3  # ceil(2.5)
    assert {tuple(held_out_images(10, 0.25, seed)) for seed in range(6)} != {
        tuple(held_out_images(10, 0.25, 3))
    }
    assert held_out_images(10, 0.0, 3) == []
    assert len(held_out_images(2, 0.9, 1)) == 1  # one image is always left for training
    assert fixed_timesteps(1000) == [125, 375, 625, 875]


def _record_trained_images(monkeypatch) -> list[str]:
    trained: list[str] = []
    micro_loss = sd_trainer.LossContext.micro_loss

    def recorded(self, indices, epoch, step_samples):
        trained.extend(self.dataset.view(i, epoch).record.rel for i in indices)
        return micro_loss(self, indices, epoch, step_samples)

    monkeypatch.setattr(sd_trainer.LossContext, "micro_loss", recorded)
    return trained


def test_val_split_holds_out_images_and_reports_the_loss(tiny_sd15, tmp_path, monkeypatch):
    trained = _record_trained_images(monkeypatch)
    data = make_image_dataset(tmp_path / "data", 6)
    config = seed_like_config(
        tmp_path / "a",
        tiny_sd15,
        data,
        batch_size=2,
        epochs=3,
        save_steps=None,
        val_split=0.33,
        val_every_steps=2,
        learning_rate="1e-2",
    )
    job = make_job(config)
    assert train(job) == "finished"
    names = sorted(f"img{i:02d}.png" for i in range(6))
    held = {names[i] for i in held_out_images(6, 0.33, 7)}
    assert len(held) == 2 and trained and not held & set(trained)  # never trained on
    assert set(trained) == set(names) - held
    started = events_of(job.run, "run_started")[0]
    assert started["validation_images"] == 2 and started["samples_per_epoch"] == 4
    evals = events_of(job.run, "eval")
    assert [e["step"] for e in evals] == [2, 4, 6]
    losses = [e["eval_loss"] for e in evals]
    assert all(isinstance(v, float) and v > 0 for v in losses)
    assert len(set(losses)) == 3  # it moves as the LoRA trains
    logs = list(job.run.logs_dir.glob("events.out.tfevents.*"))
    assert logs and any(b"eval_loss" in path.read_bytes() for path in logs)  # the TensorBoard scalar


def test_validation_loss_is_the_same_for_the_same_weights(tiny_sd15, tmp_path):
    from loratui.train.loop.reporting import Reporter
    from loratui.train.sd.setup import place_unet, setup_accelerator, setup_dataset, setup_lora, setup_models
    from loratui.train.sd.validation import build_validation_set, split_datasets

    data = make_image_dataset(tmp_path / "data", 6)
    val = make_image_dataset(tmp_path / "val", 3)
    job = make_job(seed_like_config(tmp_path / "a", tiny_sd15, data, val_data_dir=str(val), batch_size=2))
    cfg = job.resolved.config
    reporter = Reporter(job.run, 1, console=False, tensorboard=False)
    accelerator, precision = setup_accelerator(cfg)
    dataset, val_dataset = split_datasets(cfg, setup_dataset(cfg, reporter), reporter)
    assert len(dataset) == 6 and len(val_dataset) == 3
    models = setup_models(job, precision, accelerator.device)
    validation = build_validation_set(cfg, models, val_dataset)
    lora, params = setup_lora(cfg, models, reporter)
    place_unet(models)
    models.unet.train()
    first = validation.loss(models, None, accelerator.autocast)
    second = validation.loss(models, None, accelerator.autocast)
    assert first == second  # fixed timesteps and noise: the same weights give the same loss
    assert models.unet.training  # back in training mode
    one_at_a_time = validation.loss(models, None, accelerator.autocast, batch_size=1)
    assert one_at_a_time == pytest.approx(first, rel=1e-4)  # batching does not change it (OOM ladder)
    with torch.no_grad():
        for param in params:
            param.add_(0.05)
    assert validation.loss(models, None, accelerator.autocast) != first

    # the EMA copy the trainer would keep has the size the planner adds (one fp32 copy of the LoRA)
    from loratui.memory.arch import arch_from_config
    from loratui.memory.estimate import regime_for
    from loratui.memory.summary import build_summary
    from loratui.train.sd.setup import setup_ema

    ema_cfg = cfg.model_copy(update={"ema_decay": 0.99})
    ema = setup_ema(ema_cfg, models, lora)
    regime, _ = regime_for(ema_cfg, "cpu", "sd")
    numels = build_summary(arch_from_config(ema_cfg, family="sd15")).adapter_numels(
        regime.network, cfg.lora_rank, cfg.target_modules, train_text_encoder=False
    )
    assert ema.nbytes() == 4 * sum(n * c for n, c in numels) > 0
    reporter.close()


def test_sdxl_ema_and_validation(tiny_sdxl, tmp_path):
    data = make_image_dataset(tmp_path / "data", 4)
    config = seed_like_config(
        tmp_path,
        tiny_sdxl,
        data,
        batch_size=2,
        epochs=1,
        save_steps=None,
        lora_rank=4,
        alpha=8,
        val_split=0.25,
        ema_decay=0.9,
        export_ema=True,
    )
    job = make_job(config)
    assert train(job) == "finished"
    assert [e["step"] for e in events_of(job.run, "eval")] == [2]
    ckpt = load_checkpoint(job.run.latest_checkpoint())
    assert ckpt.training_state["ema"]["updates"] == 2
    exported = Path(job.resolved.config.output_dir) / "my_style_lora.safetensors"
    assert exported.is_file() and events_of(job.run, "export")[-1]["ema"] is True


# --- planner -------------------------------------------------------------------------------------------------


def test_planner_counts_the_ema_copy_where_it_lives():
    from loratui.config import TrainConfig
    from loratui.memory.estimate import estimate_peak

    base = {"task_type": "image-generation", "model_family": "sdxl", "resolution": 1024, "lora_rank": 32}
    plain = estimate_peak(TrainConfig(**base), device="cuda")
    ema = estimate_peak(TrainConfig(**base, ema_decay=0.999), device="cuda")
    on_cpu = estimate_peak(TrainConfig(**base, ema_decay=0.999, ema_on_cpu=True), device="cuda")
    lora = plain.breakdown["lora_params"]
    assert ema.breakdown["ema_weights"] == lora  # one more fp32 copy of the LoRA parameters
    assert ema.total_bytes - plain.total_bytes >= lora
    assert "ema_weights" not in on_cpu.breakdown and on_cpu.total_bytes == plain.total_bytes
    assert any("ema_on_cpu" in note for note in on_cpu.notes)
    # a CPU run holds the copy in the memory it trains in, wherever ema_on_cpu puts it
    cpu = estimate_peak(TrainConfig(**base, ema_decay=0.999, ema_on_cpu=True), device="cpu")
    assert cpu.breakdown["ema_weights"] == lora
    validating = estimate_peak(TrainConfig(**base, val_split=0.1), device="cuda")
    assert validating.total_bytes == plain.total_bytes
    assert any("below the training step's peak" in note for note in validating.notes)


def test_oom_ladder_moves_the_ema_to_cpu_memory():
    from loratui.config import TrainConfig
    from loratui.train.loop.ema import LoraEMA
    from loratui.train.oom.ladder import OomLadder, settings_of

    base = {"task_type": "image-generation", "model_family": "sd15", "cache_latents": True}
    with_ema = settings_of(TrainConfig(**base, ema_decay=0.99), "sd")
    without = settings_of(TrainConfig(**base), "sd")
    assert with_ema["ema_on_cpu"] is False and without["ema_on_cpu"] is None
    ladder = OomLadder("sd", with_ema, can_cache_text=False)
    rungs = [r for r in ladder.remaining(with_ema) if r.name == "offload"]
    assert rungs and rungs[0].changes == {"ema_on_cpu": True} and "EMA" in rungs[0].label
    assert not [
        r for r in OomLadder("sd", without, can_cache_text=False).remaining(without) if r.name == "offload"
    ]

    param = torch.nn.Parameter(torch.ones(3))
    ema = LoraEMA({"w": param}, 0.5)
    ema.move_to("cpu")
    with torch.no_grad():
        param.fill_(3.0)
    ema.update(1)
    assert ema.on_cpu and ema.shadow["w"].tolist() == [2.0, 2.0, 2.0]
    with ema.applied():
        assert param.tolist() == [2.0, 2.0, 2.0]
    assert param.tolist() == [3.0, 3.0, 3.0]


def test_ema_and_validation_options_without_their_switch_are_refused():
    from pydantic import ValidationError

    from loratui.config import TrainConfig

    for bad, match in (
        ({"export_ema": True}, "set ema_decay"),
        ({"ema_on_cpu": True}, "set ema_decay"),
        ({"ema_update_every": 4}, "set ema_decay"),
        ({"val_split": 0.1, "val_data_dir": "val"}, "not both"),
        ({"val_every_steps": 10}, "set val_split"),
        ({"ema_decay": 1.0}, "less than 1"),
    ):
        with pytest.raises(ValidationError, match=match):
            TrainConfig(**bad)
    TrainConfig(ema_decay=0.999, ema_on_cpu=True, export_ema=True, val_split=0.1, val_every_steps=5)
