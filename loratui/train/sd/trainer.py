"""Stable Diffusion LoRA training (SD 1.x, SD 2.x incl. v-prediction, SDXL).

Same shape as the LLM trainer: `training_session` (stop request and Reporter, undone on every exit), the
`setup_*` functions of `loratui.train.sd.setup`, then one straight loop over optimizer steps. The shared pieces
do the bookkeeping: `StepPlan` (which samples each step uses), `RecoveringStep` (gradient accumulation with
out-of-memory recovery), `Reporter` (events, TensorBoard, console) and `StopRequest` (Ctrl-C / SIGTERM:
checkpoint, then stop); checkpoints, samples and the kohya export are in `loratui.train.sd.outputs`.

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
from loratui.models.sd.conditioning import TextConditioner, sdxl_added_conditions
from loratui.models.sd.loss import batch_noise, per_sample_loss, training_target
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
from loratui.train.sd.oom import sd_meter_modules, sd_rung_applier
from loratui.train.sd.outputs import Checkpointer, export_lora, render_samples
from loratui.train.sd.setup import (
    Models,
    place_unet,
    setup_accelerator,
    setup_caches,
    setup_dataset,
    setup_ema,
    setup_lora,
    setup_models,
    setup_optimizer,
    setup_output,
    setup_wrappers,
)
from loratui.train.sd.validation import VAL_HINT, build_validation_set, split_datasets, validation_due

SAMPLE_HINT = (
    "Sampling brings the VAE and text encoders back to the GPU; render samples after training instead "
    "(`loratui sample`), or leave sample_prompts out."
)


# --- one micro-batch ------------------------------------------------------------------------------------


@dataclass
class LossContext:
    """Everything `micro_loss` reads."""

    cfg: Any
    models: Models
    dataset: SDDataset
    latents: LatentSource
    text: TextConditioner

    def micro_loss(self, indices: Sequence[int], epoch: int, step_samples: int) -> torch.Tensor:
        """Sum of per-sample losses of this micro-batch / samples in the whole optimizer step."""
        views = [self.dataset.view(i, epoch) for i in indices]
        groups: dict[tuple[int, int], list[SampleView]] = {}
        for view in views:
            groups.setdefault(view.bucket, []).append(view)
        total = None
        for group in groups.values():
            losses = self._group_loss(group, epoch)
            total = losses.sum() if total is None else total + losses.sum()
        return total / step_samples

    def _group_loss(self, views: list[SampleView], epoch: int) -> torch.Tensor:
        cfg, models = self.cfg, self.models
        latents = self.latents.latents(views)
        noise, timesteps = batch_noise(
            latents,
            [v.index for v in views],
            seed=cfg.seed,
            epoch=epoch,
            num_timesteps=models.noise_scheduler.config.num_train_timesteps,
            noise_offset=cfg.noise_offset,
        )
        noisy = models.noise_scheduler.add_noise(latents, noise, timesteps)
        grad = torch.enable_grad() if cfg.train_text_encoder else torch.no_grad()
        with grad:
            embeds, pooled = self.text.encode([v.caption for v in views])
        kwargs = {}
        if models.sdxl:
            kwargs["added_cond_kwargs"] = sdxl_added_conditions(
                pooled, [v.sdxl_time_ids for v in views], models.dtype
            )
        prediction = models.forward_unet(
            noisy.to(models.dtype), timesteps, embeds.to(models.dtype), **kwargs
        ).sample
        target = training_target(models.noise_scheduler, latents, noise, timesteps, models.prediction_type)
        losses = per_sample_loss(
            prediction,
            target,
            timesteps,
            alphas_cumprod=models.noise_scheduler.alphas_cumprod,
            prediction_type=models.prediction_type,
            min_snr_gamma=cfg.min_snr_gamma,
            pixel_weights=pixel_weights(self.dataset, views, latents),
        )
        weights = sample_weights(self.dataset, views, losses.device)  # prior_loss_weight of reg images
        return losses if weights is None else losses * weights


# --- the loop ----------------------------------------------------------------------------------------------


def report_validation(reporter: Reporter, step: int, epoch: int, loss: float) -> None:
    """The validation loss as an `eval` event (the LLM trainer's kind) and a TensorBoard scalar."""
    reporter.event("eval", step, eval_loss=loss, epoch=epoch)
    if reporter.tensorboard is not None:
        reporter.tensorboard.add_scalar("eval_loss", loss, step)


def train(job: WorkerJob, *, stop_after_step: int | None = None) -> str:
    """Train a LoRA for `job`; "finished" or "stopped". `stop_after_step` acts like Ctrl-C at that step."""
    loggers = LoggerSettings.from_config(job.resolved.config)
    with training_session(job.run, loggers=loggers) as session:
        return _train(job, session.reporter, session.stop, stop_after_step)


def _train(job: WorkerJob, reporter: Reporter, stop: StopFlag, stop_after_step: int | None) -> str:
    cfg = job.resolved.config
    output = setup_output(job)
    accelerator, precision = setup_accelerator(cfg)
    dataset = setup_dataset(cfg, reporter, allow_errors=job.skip_checks)
    dataset, val_dataset = split_datasets(cfg, dataset, reporter)
    models = setup_models(job, precision, accelerator.device)
    for note in models.notes:
        reporter.event("warning", message=note)
    validation = None  # encoded once, before the caches and the UNet take the device (rank 0 evaluates)
    if val_dataset is not None and is_main():
        validation = build_validation_set(cfg, models, val_dataset)
    latents, text = setup_caches(cfg, job, models, dataset, reporter)  # before the UNet takes the device
    lora, params = setup_lora(cfg, models, reporter)
    place_unet(models)
    ema = setup_ema(cfg, models, lora)
    processes = accelerator.num_processes  # each takes a disjoint share of every step's samples
    global_batch = plan_batch(cfg.batch_size, cfg.gradient_accumulation_steps, processes, job.resume_from)
    step_plan = StepPlan(len(dataset), global_batch, cfg.epochs, cfg.max_steps, cfg.seed)
    optimizer, scheduler = setup_optimizer(cfg, models, lora, step_plan.total_steps)
    optimizer = setup_wrappers(cfg, accelerator, models, text, optimizer)
    context = LossContext(cfg, models, dataset, latents, text)
    checkpoints = Checkpointer(
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
        device=str(accelerator.device),
        precision=precision,
        prediction_type=models.prediction_type,
        zero_terminal_snr=models.zero_terminal_snr,
        images=dataset.num_images,
        reg_samples=dataset.num_reg_samples,
        samples_per_epoch=len(dataset),
        resumed_from=start or None,
        lora_modules={k: len(v) for k, v in lora.targets.items()},
        validation_images=len(validation) if validation is not None else None,
        ema_decay=cfg.ema_decay,
        **batch,
    )

    recovering = RecoveringStep(  # optimizer_step with out-of-memory recovery (loratui.train.oom.recovering)
        job,
        reporter,
        apply=sd_rung_applier(job, models, context, reporter, checkpoints),
        meter_modules=sd_meter_modules(models, context),
        can_cache_latents=not cfg.random_crop,
        can_cache_text=not cfg.train_text_encoder and dataset.options.captions_fixed,
        accelerator=accelerator,
        optimizer=optimizer,
        scheduler=scheduler,
        params=params,
        max_grad_norm=cfg.max_grad_norm,
        model=[models.forward_unet, *(models.forward_text_encoders or [])],
    )
    step, unlogged = start, 0
    main = is_main()

    def save_now() -> Path | None:  # a lost peer: keep the last completed step (rank 0, local state only)
        return checkpoints.save(step) if step != checkpoints.last_saved and step > start else None

    with checkpoint_on_peer_loss(save_now):
        for global_step, epoch, indices in step_plan.iter_steps(start):
            loss = functools.partial(context.micro_loss, epoch=epoch, step_samples=len(indices))
            result = recovering.run(global_step + 1, indices, loss)
            step, unlogged = global_step + 1, unlogged + len(indices)
            if ema is not None:
                ema.update(step)
            if step % cfg.log_every_steps == 0 or step == step_plan.total_steps:
                # step_samples: samples since the previous step event; process_cpu_s: for benchmarks on shared machines
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
                # schedule-free AdamW: measured on its averaged weights, as samples and checkpoints are
                with skipped_when_out_of_memory(reporter, "validation", step, VAL_HINT), eval_mode(optimizer):
                    loss_now = validation.loss(models, text, accelerator.autocast, cfg.batch_size)
                    report_validation(reporter, step, epoch, loss_now)
            if main and cfg.sample_prompts and cfg.sample_every_steps and step % cfg.sample_every_steps == 0:
                with skipped_when_out_of_memory(reporter, "samples", step, SAMPLE_HINT), eval_mode(optimizer):
                    with ema.applied() if ema is not None else contextlib.nullcontext():  # drawn with the EMA
                        paths = render_samples(models, cfg.sample_prompts, step, job.run.samples_dir, cfg)
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
