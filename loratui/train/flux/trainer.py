"""FLUX.1 (dev, schnell) and Chroma LoRA training.

Same shape as the SD trainer: `training_session` (stop request and Reporter), the `setup_*` functions of
`loratui.train.flux.setup`, then one straight loop over optimizer steps with the shared pieces: `StepPlan`
(which samples each step uses), `RecoveringStep` (gradient accumulation with out-of-memory recovery; the Flux
rungs are applied by `loratui.train.flux.oom`), `Reporter`, `StopRequest`. One micro-batch: latents (cached
or encoded) -> per-sample sigma and noise -> packed 2x2 tokens -> transformer (with guidance for dev, the
attention mask for Chroma) -> mean squared error against the velocity `noise - latents`.

Entry point: `train(job)` -> "finished" | "stopped" (errors raise; the worker records them).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loratui.data.fingerprint import input_fingerprints
from loratui.models.flux.conditioning import FluxTextConditioner
from loratui.models.flux.flow_match import (
    image_ids,
    noisy_latents,
    pack_latents,
    per_sample_mse,
    sample_sigmas_and_noise,
    text_ids,
    unpack_latents,
    velocity_target,
)
from loratui.train.flux.oom import flux_meter_modules, flux_rung_applier
from loratui.train.flux.outputs import FluxCheckpointer, export_lora, render_samples
from loratui.train.flux.setup import (
    FluxModels,
    output_path,
    place_transformer,
    setup_base_storage,
    setup_ema,
    setup_latents,
    setup_lora,
    setup_models,
    setup_optimizer,
    setup_text,
    setup_wrappers,
)
from loratui.train.flux.validation import build_flux_validation_set, report_validation
from loratui.train.job import WorkerJob
from loratui.train.loop.loggers import LoggerSettings
from loratui.train.loop.optim import eval_mode, final_weights
from loratui.train.loop.plan import StepPlan
from loratui.train.loop.reporting import Reporter
from loratui.train.loop.session import training_session
from loratui.train.loop.signals import StopFlag
from loratui.train.oom.errors import skipped_when_out_of_memory
from loratui.train.oom.recovering import RecoveringStep
from loratui.train.process.batches import batch_info, plan_batch, resume_note
from loratui.train.process.distributed import checkpoint_on_peer_loss, is_main
from loratui.train.sd.dataset import SampleView, SDDataset
from loratui.train.sd.latent_cache import LatentSource
from loratui.train.sd.loss_weights import pixel_weights, sample_weights
from loratui.train.sd.setup import setup_accelerator, setup_dataset
from loratui.train.sd.validation import split_datasets, validation_due

VAL_HINT = (
    "Validation runs the transformer at batch_size; lower batch_size or leave val_split/val_data_dir out."
)

SAMPLE_HINT = (
    "Sampling brings the AE (and uncached text encoders) back to the GPU; render samples after training "
    "instead (`loratui sample`), or leave sample_prompts out."
)


# --- one micro-batch ------------------------------------------------------------------------------------


@dataclass
class FluxLossContext:
    """Everything `micro_loss` reads."""

    cfg: Any
    models: FluxModels
    dataset: SDDataset
    latents: LatentSource
    text: FluxTextConditioner

    def micro_loss(self, indices: Sequence[int], epoch: int, step_samples: int) -> torch.Tensor:
        """Sum of per-sample losses of this micro-batch / samples in the whole optimizer step."""
        groups: dict[tuple[int, int], list[SampleView]] = {}
        for view in (self.dataset.view(i, epoch) for i in indices):
            groups.setdefault(view.bucket, []).append(view)
        total = None
        for group in groups.values():
            losses = self.group_loss(group, epoch)
            total = losses.sum() if total is None else total + losses.sum()
        return total / step_samples

    def group_loss(self, views: list[SampleView], epoch: int) -> torch.Tensor:
        """Per-sample losses [B] of views of one bucket size."""
        cfg, models = self.cfg, self.models
        latents = self.latents.latents(views)
        sigmas, noise = sample_sigmas_and_noise(
            latents,
            [v.index for v in views],
            seed=cfg.seed,
            epoch=epoch,
            method=cfg.timestep_sampling,
            sigmoid_scale=cfg.sigmoid_scale,
            discrete_flow_shift=cfg.discrete_flow_shift,
            noise_offset=cfg.noise_offset,
        )
        grad = torch.enable_grad() if models.forward_clip is not None else torch.no_grad()
        with grad:
            cond = self.text.encode([v.caption for v in views])
        prediction = self.predict(noisy_latents(latents, noise, sigmas), sigmas, cond)
        losses = per_sample_mse(
            prediction, velocity_target(latents, noise), _pixel_weights(self.dataset, views, latents)
        )
        weights = sample_weights(self.dataset, views, losses.device)  # prior_loss_weight of reg images
        return losses if weights is None else losses * weights

    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Any) -> torch.Tensor:
        """The transformer's velocity for latents [B, C, h, w] at `sigmas`, as latents [B, C, h, w]."""
        models, dtype = self.models, self.models.dtype
        batch, _, height, width = noisy.shape
        device = noisy.device
        kwargs: dict[str, Any] = {
            "hidden_states": pack_latents(noisy).to(dtype),
            "encoder_hidden_states": cond.t5.to(dtype),
            "timestep": sigmas.to(dtype),
            "img_ids": image_ids(height, width, device, dtype),
            "txt_ids": text_ids(cond.t5.shape[1], device, dtype),
            "return_dict": False,
        }
        if models.parts.is_chroma:
            image_tokens = torch.ones(batch, (height // 2) * (width // 2), device=device, dtype=torch.bool)
            kwargs["attention_mask"] = torch.cat([cond.mask.to(dtype), image_tokens], dim=1)
        else:
            kwargs["pooled_projections"] = cond.pooled.to(dtype)
            if models.parts.has_guidance:
                kwargs["guidance"] = torch.full((batch,), models.guidance_scale, device=device, dtype=dtype)
        tokens = models.forward_transformer(**kwargs)[0]
        return unpack_latents(tokens, height, width)


def _pixel_weights(dataset: SDDataset, views: list[SampleView], latents: torch.Tensor) -> torch.Tensor | None:
    weights = pixel_weights(dataset, views, latents)
    return None if weights is None else weights.expand_as(latents)


# --- the loop ----------------------------------------------------------------------------------------------


def train(job: WorkerJob, *, stop_after_step: int | None = None) -> str:
    """Train a LoRA for `job`; "finished" or "stopped". `stop_after_step` acts like Ctrl-C at that step."""
    loggers = LoggerSettings.from_config(job.resolved.config)
    with training_session(job.run, loggers=loggers) as session:
        return _train(job, session.reporter, session.stop, stop_after_step)


def _train(job: WorkerJob, reporter: Reporter, stop: StopFlag, stop_after_step: int | None) -> str:
    cfg = job.resolved.config
    output = output_path(job)
    accelerator, precision = setup_accelerator(cfg)
    dataset = setup_dataset(cfg, reporter, allow_errors=job.skip_checks)
    dataset, val_dataset = split_datasets(cfg, dataset, reporter)
    models = setup_models(job, precision, accelerator.device)
    for note in models.notes:
        reporter.event("warning", message=note)
    validation = None  # encoded once, before the caches fill and T5 is released (rank 0 evaluates)
    if val_dataset is not None and is_main():
        validation = build_flux_validation_set(cfg, models, val_dataset)

    latents = setup_latents(cfg, models, dataset, reporter)  # before the transformer takes the device
    lora, params = setup_lora(cfg, models, reporter)
    text = setup_text(cfg, models, dataset, reporter, cfg.sample_prompts)
    converted = setup_base_storage(models)
    place_transformer(models)
    ema = setup_ema(cfg, models, lora)
    processes = accelerator.num_processes
    global_batch = plan_batch(cfg.batch_size, cfg.gradient_accumulation_steps, processes, job.resume_from)
    step_plan = StepPlan(len(dataset), global_batch, cfg.epochs, cfg.max_steps, cfg.seed)
    optimizer, scheduler = setup_optimizer(cfg, models, lora, step_plan.total_steps)
    optimizer = setup_wrappers(cfg, accelerator, models, text, optimizer)
    context = FluxLossContext(cfg, models, dataset, latents, text)
    checkpoints = FluxCheckpointer(
        job,
        models,
        dataset,
        lora,
        optimizer,
        scheduler,
        accelerator,
        step_plan,
        precision,
        time.time(),
        reporter,
        inputs=input_fingerprints(cfg),
        ema=ema,
    )

    start = 0
    if job.resume_from is not None:
        start = checkpoints.restore(Path(job.resume_from))
        reporter.resumed_from(start)
    batch = batch_info(cfg.batch_size, cfg.gradient_accumulation_steps, processes, global_batch)
    note = resume_note(job.resume_from, processes, batch)
    if note:
        reporter.event("warning", start, message=note)
    reporter.status.total_steps = step_plan.total_steps
    reporter.started(
        family=models.family,
        variant=models.variant,
        device=str(accelerator.device),
        precision=precision,
        base_weights_dtype=models.base_weights_dtype,
        base_layers_converted=converted,
        blocks_to_swap=models.blocks_to_swap,
        timestep_sampling=cfg.timestep_sampling,
        guidance_scale=models.guidance_scale if models.parts.has_guidance else None,
        t5_max_length=models.t5_max_length,
        images=dataset.num_images,
        reg_samples=dataset.num_reg_samples,
        samples_per_epoch=len(dataset),
        resumed_from=start or None,
        lora_modules={k: len(v) for k, v in lora.targets.items()},
        validation_images=len(validation) if validation is not None else None,
        ema_decay=cfg.ema_decay,
        **batch,
    )

    recovering = RecoveringStep(
        job,
        reporter,
        apply=flux_rung_applier(job, models, context, reporter, checkpoints),
        meter_modules=flux_meter_modules(models, context),
        can_cache_latents=not cfg.random_crop,
        can_cache_text=dataset.options.captions_fixed,
        accelerator=accelerator,
        optimizer=optimizer,
        scheduler=scheduler,
        params=params,
        max_grad_norm=cfg.max_grad_norm,
        model=[models.forward_transformer, *([models.forward_clip] if models.forward_clip else [])],
    )
    step, unlogged = start, 0
    main = is_main()

    def save_now() -> Path | None:
        return checkpoints.save(step) if step != checkpoints.last_saved and step > start else None

    with checkpoint_on_peer_loss(save_now):
        for global_step, epoch, indices in step_plan.iter_steps(start):
            loss = functools.partial(context.micro_loss, epoch=epoch, step_samples=len(indices))
            result = recovering.run(global_step + 1, indices, loss)
            step, unlogged = global_step + 1, unlogged + len(indices)
            if ema is not None:
                ema.update(step)
            if step % cfg.log_every_steps == 0 or step == step_plan.total_steps:
                extra = {"step_samples": unlogged, "process_cpu_s": time.process_time()}
                if result.grad_norm is not None:
                    extra["grad_norm"] = result.grad_norm
                reporter.step(
                    step, epoch, result.loss, result.lr, unlogged, **extra, **recovering.step_fields()
                )
                unlogged = 0
            stopping = stop.requested or (stop_after_step is not None and step >= stop_after_step)
            if (cfg.save_steps and step % cfg.save_steps == 0) or stop.checkpoint_now.is_set() or stopping:
                stop.checkpoint_now.clear()
                if checkpoints.last_saved != step:
                    checkpoints.save(step)
            leaving = stopping and step < step_plan.total_steps  # save at once: no validation on the way out
            if (
                validation is not None
                and not leaving
                and validation_due(
                    step, cfg.val_every_steps, step_plan.steps_per_epoch, step_plan.total_steps
                )
            ):
                with skipped_when_out_of_memory(reporter, "validation", step, VAL_HINT), eval_mode(optimizer):
                    report_validation(reporter, step, epoch, validation.loss(context, cfg.batch_size))
            if main and cfg.sample_prompts and cfg.sample_every_steps and step % cfg.sample_every_steps == 0:
                with skipped_when_out_of_memory(reporter, "samples", step, SAMPLE_HINT), eval_mode(optimizer):
                    with ema.applied() if ema is not None else contextlib.nullcontext():
                        paths = render_samples(
                            models, context.text, cfg.sample_prompts, step, job.run.samples_dir, cfg
                        )
                    for path in paths:
                        reporter.event("sample", step, path=str(path), ema=ema is not None)
            if stopping and step < step_plan.total_steps:
                reporter.stopped(stop.signal_name or "requested", checkpoint=str(job.run.latest_checkpoint()))
                return "stopped"

    final_weights(optimizer)
    if checkpoints.last_saved != step:
        checkpoints.save(step)
    if main:
        export_lora(checkpoints, output, ema=cfg.export_ema)
    reporter.finished(steps=step, **recovering.summary())
    return "finished"
