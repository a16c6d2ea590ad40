"""What the Flux loop writes besides training: checkpoints (exact resume), samples and the LoRA file.

`FluxCheckpointer` saves and restores the LoRA, optimizer, scheduler, scaler, RNG and EMA states with the
run's metadata (the shared checkpoint folder of `loratui.runs.checkpoints`; `kohya`, `flux_training` and
`transformer_config` are what the export reads); `render_samples` draws the sample prompts with the LoRA as it
is (flow-match Euler, few steps, fixed seed); `export_lora` writes the kohya file from the newest checkpoint
(`loratui.models.flux.lora_files.export_flux_checkpoint`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from loratui.models.sd.kohya import KohyaInfo
from loratui.models.sd.lora import LoraPlan, load_lora_state, lora_state, module_scales
from loratui.runs.checkpoints import load_checkpoint
from loratui.train.flux.setup import FluxModels
from loratui.train.job import WorkerJob
from loratui.train.loop.checkpointing import restore_rng_state, rng_state, save_checkpoint
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

#: what a checkpoint records about the objective: another variant refuses the resume, the others warn
OBJECTIVE_KEYS = ("variant", "timestep_sampling", "guidance_scale")


@dataclass
class FluxCheckpointer:
    """The objects a checkpoint saves, and the step it last saved."""

    job: WorkerJob
    models: FluxModels
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
    inputs: dict[str, Any] = field(default_factory=dict)
    ema: Any = None

    def objective(self) -> dict[str, Any]:
        cfg = self.job.resolved.config
        return {
            "variant": self.models.variant,
            "timestep_sampling": cfg.timestep_sampling,
            "guidance_scale": self.models.guidance_scale if self.models.parts.has_guidance else None,
        }

    def kohya_info(self, epochs_done: int) -> KohyaInfo:
        """What the exported kohya file's `ss_*` metadata describes (`batch_size` per device)."""
        cfg, plan = self.job.resolved.config, self.step_plan
        return KohyaInfo(
            name=cfg.name,
            family=self.models.family,
            rank=self.lora.rank,
            alpha=self.lora.kohya_alpha,
            dropout=self.lora.dropout,
            learning_rate=cfg.learning_rate,
            text_encoder_lr=cfg.text_encoder_lr,
            train_text_encoder=len(self.lora.targets) > 1,
            num_train_images=len(self.dataset) - self.dataset.num_reg_samples,
            num_epochs=math.ceil(plan.total_steps / plan.steps_per_epoch),
            max_train_steps=plan.total_steps,
            epoch=epochs_done,
            batch_size=cfg.batch_size,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            num_processes=self.accelerator.num_processes,
            total_batch_size=plan.effective_batch,
            mixed_precision=self.precision,
            resolution=cfg.resolution,
            seed=cfg.seed,
            started_at=self.started_at,
            tag_frequency=self.dataset.tag_frequency(),
            dataset_dirs=self.dataset.dataset_dirs(),
            base_model_name=Path(cfg.base_model).name,
            trigger_word=cfg.trigger_word,
            run=self.job.run.name,
            extra=self.dataset.reg_metadata(),
        )

    def flux_training(self) -> dict[str, Any]:
        """The Flux objective's settings (the export writes them as `ss_*` keys)."""
        cfg = self.job.resolved.config
        return {
            "timestep_sampling": cfg.timestep_sampling,
            "sigmoid_scale": cfg.sigmoid_scale,
            "discrete_flow_shift": cfg.discrete_flow_shift,
            "guidance_scale": self.models.guidance_scale if self.models.parts.has_guidance else None,
            "t5_max_length": self.models.t5_max_length,
            "base_weights_dtype": self.models.base_weights_dtype,
            "blocks_to_swap": self.models.blocks_to_swap,
        }

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
        meta = {
            "epoch": self.step_plan.epoch_of(max(0, step - 1)),
            "epochs_done": epochs_done,
            "data_position": step,
            "total_steps": self.step_plan.total_steps,
            "family": self.models.family,
            **self.objective(),
            "precision": self.precision,
            "base_weights_dtype": self.models.base_weights_dtype,
            "run": self.job.run.name,
            "name": cfg.name,
            "output_dir": str(Path(cfg.output_dir).expanduser()),
            "base_model_name": Path(cfg.base_model).name,
            "kohya_alpha": self.lora.kohya_alpha,
            "lora": {"rank": self.lora.rank, "alpha": self.lora.alpha, "targets": self.lora.targets},
            "network_type": self.lora.network.kind,
            "target_names": self.lora.target_names,
            "module_scales": module_scales(self.models.components(), self.lora),
            "started_at": self.started_at,
            "num_samples": len(self.dataset),
            "global_batch": self.step_plan.effective_batch,
            "processes": self.accelerator.num_processes,
            "learning_rate": cfg.learning_rate,
            "resolution": cfg.resolution,
            "seed": cfg.seed,
            "inputs": self.inputs,
            "kohya": asdict(self.kohya_info(epochs_done)),
            "flux_training": self.flux_training(),
            "transformer_config": {  # the constructor's arguments (the export reads the sizes from them)
                k: v for k, v in dict(self.models.transformer.config).items() if not k.startswith("_")
            },
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
        """Load LoRA, optimizer, scheduler, scaler, RNG and EMA states; returns the step to continue from."""
        ckpt = load_checkpoint(checkpoint_path, map_location="cpu")
        for key, now in self.objective().items():
            saved = ckpt.meta.get(key)
            if key not in ckpt.meta or saved == now:
                continue
            if key == "variant":  # a LoRA for another model
                raise ValueError(
                    f"{checkpoint_path} was trained on a {saved} base model, this run's is {now}; resume it "
                    f"with the {saved} base model"
                )
            self.reporter.event(
                "warning",
                ckpt.step,
                message=f"resumed with a changed setting: {key} {saved} -> {now} (applied from step {ckpt.step + 1})",
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
        if self.ema is not None:
            if state.get("ema"):
                self.ema.load_state_dict(state["ema"])
            else:
                self.ema.reset()
        if ckpt.meta.get("total_steps") not in (None, self.step_plan.total_steps):
            self.reporter.event(
                "warning",
                message=f"the checkpoint was planned for {ckpt.meta['total_steps']} steps, this run has "
                f"{self.step_plan.total_steps} (changed epochs/max_steps/batch?)",
            )
        self.started_at = float(ckpt.meta.get("started_at") or self.started_at)
        self.last_saved = ckpt.step
        return ckpt.step


@torch.no_grad()
def render_samples(
    models: FluxModels, text: Any, prompts: list[str], step: int, folder: Path, cfg: Any
) -> list[Path]:
    """Render `prompts` (fixed seed, few flow-match Euler steps) with the LoRA as it is; returns PNG paths.

    The prompts' text embeddings come from the run's text conditioner (cached with the captions when T5 was
    released), so sampling needs only the transformer and the AE on the device."""
    from loratui.data.image_io import save_png
    from loratui.models.flux.pipeline import build_pipeline, default_sample_settings

    parts = models.parts
    vae_device = next(parts.vae.parameters()).device
    parts.vae.to(models.device)
    text_devices = [(m, next(m.parameters()).device) for m in models.text_encoders]
    for module, _ in text_devices:
        module.to(models.device)
    models.transformer.eval()
    settings = default_sample_settings(
        parts,
        height=cfg.resolution,
        width=cfg.resolution,
        seed=cfg.seed,
        max_sequence_length=models.t5_max_length,
    )
    pipe = build_pipeline(parts)
    paths = []
    try:
        for number, prompt in enumerate(prompts):
            cond = text.encode([prompt])
            kwargs: dict[str, Any] = {"prompt_embeds": cond.t5.to(models.dtype)}
            if parts.is_chroma:
                kwargs["prompt_attention_mask"] = cond.mask.to(models.dtype)
                kwargs["guidance_scale"] = settings.guidance_scale
            else:
                kwargs["pooled_prompt_embeds"] = cond.pooled.to(models.dtype)
                if parts.has_guidance:
                    kwargs["guidance_scale"] = settings.guidance_scale
            generator = torch.Generator("cpu").manual_seed(settings.seed)
            image = pipe(
                num_inference_steps=settings.steps,
                height=settings.height,
                width=settings.width,
                generator=generator,
                **kwargs,
            ).images[0]
            paths.append(save_png(image, folder / f"step-{step:06d}-{number}.png"))
    finally:
        models.transformer.train()
        parts.vae.to(vae_device)
        for module, device in text_devices:
            module.to(device)
    return paths


def export_lora(checkpoints: FluxCheckpointer, output: Path, *, ema: bool = False) -> Path:
    """Write the kohya file (the EMA weights with `ema`) from the newest checkpoint and announce it."""
    from loratui.models.flux.lora_files import export_flux_checkpoint
    from loratui.train.sd.outputs import export_lora as export_with

    return export_with(checkpoints, output, ema=ema, exporter=export_flux_checkpoint)
