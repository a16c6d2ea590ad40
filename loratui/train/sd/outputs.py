"""What the SD loop writes besides training: checkpoints (exact resume), samples and the kohya export.

`Checkpointer` holds what a checkpoint saves and restores (LoRA, optimizer, scheduler, scaler, RNG, and the
kohya training metadata); `render_samples` draws the sample prompts with the LoRA as it is; `export_lora`
writes the kohya `.safetensors` file from the newest checkpoint.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from loratui.models.sd.adapters import network_args
from loratui.models.sd.kohya import KohyaInfo
from loratui.models.sd.lora import LoraPlan, load_lora_state, lora_state, module_scales
from loratui.models.sd.lora_files import export_checkpoint, usage_string
from loratui.runs.checkpoints import load_checkpoint
from loratui.train.job import WorkerJob
from loratui.train.loop.checkpointing import (
    refuse_nonfinite,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from loratui.train.loop.optim import (
    apply_configured_hyperparameters,
    check_resumable,
    configured_hyperparameters,
    eval_mode,
    optimizer_kind,
    resume_train_mode,
)
from loratui.train.loop.plan import StepPlan
from loratui.train.loop.reporting import Reporter
from loratui.train.loop.resume_inputs import shape_mismatch_message
from loratui.train.sd.dataset import SDDataset
from loratui.train.sd.setup import Models

SAMPLE_STEPS = 20


def kohya_info(
    job: WorkerJob,
    models: Models,
    dataset: SDDataset,
    plan: LoraPlan,
    steps: StepPlan,
    precision: str,
    started: float,
    processes: int = 1,
) -> KohyaInfo:
    """`batch_size` is per device; the step plan's batch is the global one (all processes)."""
    cfg = job.resolved.config
    return KohyaInfo(
        name=cfg.name,
        family=models.family,
        rank=plan.rank,
        alpha=plan.kohya_alpha,
        prediction_type=models.prediction_type,
        zero_terminal_snr=models.zero_terminal_snr,
        dropout=plan.dropout,
        learning_rate=cfg.learning_rate,
        text_encoder_lr=cfg.text_encoder_lr,
        train_text_encoder=cfg.train_text_encoder,
        num_train_images=len(dataset) - dataset.num_reg_samples,  # kohya: training images x repeats
        num_epochs=math.ceil(steps.total_steps / steps.steps_per_epoch),
        max_train_steps=steps.total_steps,
        batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_processes=processes,
        total_batch_size=steps.effective_batch,
        mixed_precision=precision,
        resolution=cfg.resolution,
        seed=cfg.seed,
        started_at=started,
        tag_frequency=dataset.tag_frequency(),
        dataset_dirs=dataset.dataset_dirs(),
        base_model_name=Path(cfg.base_model).name,
        trigger_word=cfg.trigger_word,
        run=job.run.name,
        # kohya's network args are strings (`--network_args key=value`)
        network_module=plan.network.peers_module,
        network_args=network_args(plan.network, plan.rank, plan.alpha, plan.target_names),
        extra=dataset.reg_metadata(),
    )


@dataclass
class Checkpointer:
    """The objects a checkpoint saves, and the step it last saved."""

    job: WorkerJob
    models: Models
    dataset: SDDataset
    lora: LoraPlan
    optimizer: Any
    scheduler: Any
    accelerator: Any
    step_plan: StepPlan
    precision: str
    started_at: float
    reporter: Reporter
    last_saved: int = -1
    inputs: dict[str, Any] = field(default_factory=dict)  # fingerprints of the base model and dataset
    ema: Any = None  # LoraEMA of the adapter weights (`ema_decay`), saved in training_state.pt

    def save(self, step: int) -> Path:
        """Write a checkpoint (schedule-free optimizers: of the averaged weights, `eval_mode`)."""
        with eval_mode(self.optimizer):
            return self._save(step)

    def _save(self, step: int) -> Path:
        cfg = self.job.resolved.config
        scaler = getattr(self.accelerator, "scaler", None)
        training_state = {
            "optimizer": self.optimizer.state_dict(),
            "optimizer_class": optimizer_kind(self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng_state(),
        }
        if self.ema is not None:
            training_state["ema"] = self.ema.state_dict()
        epochs_done = self.step_plan.epoch_of(step - 1) + 1 if step else 0
        processes = self.accelerator.num_processes
        info = kohya_info(
            self.job,
            self.models,
            self.dataset,
            self.lora,
            self.step_plan,
            self.precision,
            self.started_at,
            processes,
        )
        info.epoch = epochs_done
        meta = {
            "epoch": self.step_plan.epoch_of(max(0, step - 1)),
            "epochs_done": epochs_done,
            "data_position": step,
            "total_steps": self.step_plan.total_steps,
            "family": self.models.family,
            "prediction_type": self.models.prediction_type,
            "zero_terminal_snr": self.models.zero_terminal_snr,
            "precision": self.precision,
            "run": self.job.run.name,
            "name": cfg.name,
            "output_dir": str(Path(cfg.output_dir).expanduser()),
            "kohya_alpha": self.lora.kohya_alpha,
            "lora": {"rank": self.lora.rank, "alpha": self.lora.alpha, "targets": self.lora.targets},
            "network_type": self.lora.network.kind,
            "network": asdict(self.lora.network),
            "module_scales": module_scales(self.models.components(), self.lora),
            "unet_layers_per_block": int(self.models.unet.config.layers_per_block),
            "started_at": self.started_at,
            "num_samples": len(self.dataset),
            "global_batch": self.step_plan.effective_batch,
            "processes": processes,
            "kohya": asdict(info),
            "learning_rate": cfg.learning_rate,  # really used (a resume applies a changed one)
            "inputs": self.inputs,
            "ema": (
                {"decay": self.ema.decay, "update_every": self.ema.update_every, "updates": self.ema.updates}
                if self.ema is not None
                else None
            ),
        }
        path = save_checkpoint(
            self.job.run,
            step,
            lora_state=lora_state(self.models.components(), self.lora),
            training_state=training_state,
            meta=meta,
            config_yaml=self.job.resolved.to_yaml(),
            keep_last_n=cfg.keep_last_n,
        )
        self.last_saved = step
        self.reporter.checkpoint(step, path)
        return path

    def restore(self, checkpoint_path: Path) -> int:
        """Load LoRA, optimizer, scheduler, scaler and RNG states; returns the step to continue from."""
        ckpt = load_checkpoint(checkpoint_path, map_location="cpu")
        saved_type = ckpt.meta.get("network_type", "lora")
        if saved_type != self.lora.network.kind:
            raise ValueError(
                f"{checkpoint_path} was trained with network_type {saved_type}, this run has "
                f"{self.lora.network.kind}; set network_type: {saved_type} to resume it"
            )
        schedule = {
            "prediction_type": self.models.prediction_type,
            "zero_terminal_snr": self.models.zero_terminal_snr,
        }
        for key, now in schedule.items():  # another objective would silently retrain the LoRA for it
            saved = ckpt.meta.get(key)
            if saved is not None and saved != now:
                raise ValueError(
                    f"{checkpoint_path} was trained with {key} {saved}, this run has {now}; set {key}: "
                    f"{saved} to resume it"
                )
        try:
            load_lora_state(self.models.components(), ckpt.lora_state)
        except RuntimeError as exc:
            if "size" not in str(exc):
                raise
            raise ValueError(shape_mismatch_message(checkpoint_path, ckpt.meta, self.lora.rank)) from None
        state = ckpt.training_state
        check_resumable(state.get("optimizer_class"), self.optimizer, checkpoint_path)
        wanted = configured_hyperparameters(self.optimizer, self.scheduler)
        self.optimizer.load_state_dict(state["optimizer"])
        resume_train_mode(self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        for change in apply_configured_hyperparameters(self.optimizer, self.scheduler, wanted):
            self.reporter.event(
                "warning",
                ckpt.step,
                message=f"resumed with a changed setting: {change} (applied from step {ckpt.step + 1})",
            )
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"])
        self._restore_ema(state.get("ema"), ckpt.step)
        if ckpt.meta.get("total_steps") not in (None, self.step_plan.total_steps):
            self.reporter.event(
                "warning",
                message=f"the checkpoint was planned for {ckpt.meta['total_steps']} steps, this run has "
                f"{self.step_plan.total_steps} (changed epochs/max_steps/batch?)",
            )
        self.started_at = float(ckpt.meta.get("started_at") or self.started_at)
        self.last_saved = ckpt.step
        return ckpt.step

    def _restore_ema(self, saved: dict[str, Any] | None, step: int) -> None:
        """Continue the saved EMA; a checkpoint without one starts the EMA from the restored weights."""
        if self.ema is None:
            if saved:
                self.reporter.event(
                    "warning",
                    step,
                    message="the checkpoint holds an EMA; ema_decay is unset, so "
                    "it is not continued (set ema_decay to keep it)",
                )
            return
        if not saved:
            self.ema.reset()
            self.reporter.event(
                "warning",
                step,
                message=f"the checkpoint holds no EMA: the EMA starts from the weights of step {step}",
            )
            return
        self.ema.load_state_dict(saved)
        if (saved.get("decay"), saved.get("update_every")) != (self.ema.decay, self.ema.update_every):
            self.reporter.event(
                "warning",
                step,
                message=f"resumed with a changed EMA setting: decay {saved.get('decay')} -> {self.ema.decay}, "
                f"every {saved.get('update_every')} -> {self.ema.update_every} step(s)",
            )


@torch.no_grad()
def render_samples(models: Models, prompts: list[str], step: int, folder: Path, cfg: Any) -> list[Path]:
    """Render `prompts` (fixed seed) with the LoRA as it is now; returns the PNG paths."""
    from loratui.data.image_io import save_png
    from loratui.models.sd.schedule import guidance_rescale

    vae_device = next(models.vae.parameters()).device
    text_devices = [next(encoder.parameters()).device for encoder in models.text_encoders]
    models.vae.to(models.device)
    for encoder in models.text_encoders:
        encoder.to(models.device)
    models.unet.eval()
    models.pipeline.set_progress_bar_config(disable=True)
    paths = []
    try:
        for number, prompt in enumerate(prompts):
            generator = torch.Generator("cpu").manual_seed(cfg.seed)
            image = models.pipeline(
                prompt,
                num_inference_steps=SAMPLE_STEPS,
                height=cfg.resolution,
                width=cfg.resolution,
                generator=generator,
                guidance_rescale=guidance_rescale(models.zero_terminal_snr),
            ).images[0]
            paths.append(save_png(image, folder / f"step-{step:06d}-{number}.png"))
    finally:
        models.unet.train()
        models.vae.to(vae_device)
        for encoder, device in zip(models.text_encoders, text_devices, strict=True):
            encoder.to(device)
    return paths


def export_lora(checkpoints: Checkpointer, output: Path, *, ema: bool = False, exporter: Any = None) -> Path:
    """Write the kohya file (the EMA weights with `ema`) from the newest checkpoint and announce it.

    `exporter` is the family's checkpoint exporter (default: the SD one, `export_checkpoint`)."""
    job = checkpoints.job
    latest = job.run.latest_checkpoint()
    refuse_nonfinite(load_file(str(latest / "lora.safetensors")), job.run)
    written = (exporter or export_checkpoint)(
        latest,
        fmt="kohya",
        out=output,
        overwrite=job.overwrite,
        resuming=job.resume_from is not None,
        finished_at=time.time(),
        ema=ema,
    )
    checkpoints.reporter.event(
        "export",
        checkpoints.last_saved,
        path=str(written),
        usage=usage_string(written.stem),
        format="kohya",
        ema=ema,
    )
    return written
