"""Stable Diffusion LoRA training (SD 1.x, SD 2.x incl. v-prediction, SDXL).

One readable trainer: small `_setup_*` functions, then one straight loop over optimizer steps. The shared
pieces do the bookkeeping: `StepPlan` (which samples each step uses), `optimizer_step` (gradient
accumulation), `Reporter` (events, TensorBoard, console), `save_checkpoint`/`load_checkpoint` (exact
resume) and `StopRequest` (Ctrl-C / SIGTERM: checkpoint, then stop).

Entry point: `train(job)` -> "finished" | "stopped" (errors raise; the worker records them).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from loratui.models.sd.conditioning import TextConditioner, sdxl_added_conditions
from loratui.models.sd.kohya import KohyaInfo
from loratui.models.sd.lora import (
    LoraPlan,
    lora_state,
)
from loratui.models.sd.lora_files import export_checkpoint, usage_string
from loratui.models.sd.loss import batch_noise, per_sample_loss, training_target
from loratui.runs.checkpoints import load_checkpoint
from loratui.train.job import WorkerJob
from loratui.train.loop.checkpointing import restore_rng_state, rng_state, save_checkpoint
from loratui.train.loop.plan import StepPlan
from loratui.train.loop.reporting import Reporter
from loratui.train.loop.signals import StopRequest
from loratui.train.oom.recovering import RecoveringStep, skipped_when_out_of_memory
from loratui.train.sd.dataset import SampleView, SDDataset
from loratui.train.sd.latent_cache import LatentSource
from loratui.train.sd.oom import sd_meter_modules, sd_rung_applier
from loratui.train.sd.setup import (
    Models,
    place_unet,
    setup_accelerator,
    setup_caches,
    setup_dataset,
    setup_lora,
    setup_models,
    setup_optimizer,
    setup_output,
)

SAMPLE_STEPS = 20
SAMPLE_HINT = (
    "Sampling brings the VAE and text encoders back to the GPU; render samples after training instead "
    "(`loratui sample`), or leave sample_prompts out."
)


# --- setup ------------------------------------------------------------------------------------------------


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
        return per_sample_loss(
            prediction,
            target,
            timesteps,
            alphas_cumprod=models.noise_scheduler.alphas_cumprod,
            prediction_type=models.prediction_type,
            min_snr_gamma=cfg.min_snr_gamma,
        )


# --- checkpoints, samples, export ---------------------------------------------------------------------------


def _kohya_info(
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
        dropout=plan.dropout,
        learning_rate=cfg.learning_rate,
        text_encoder_lr=cfg.text_encoder_lr,
        train_text_encoder=cfg.train_text_encoder,
        num_train_images=len(dataset),
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
        network_args={
            "target_modules": ",".join(sorted({_short_name(p) for ps in plan.targets.values() for p in ps}))
        },
    )


def _short_name(path: str) -> str:
    parts = path.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]


@dataclass
class Session:
    """The loop's mutable state and the objects checkpoints save."""

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

    def save(self, step: int) -> Path:
        cfg = self.job.resolved.config
        scaler = getattr(self.accelerator, "scaler", None)
        training_state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng_state(),
        }
        epochs_done = self.step_plan.epoch_of(step - 1) + 1 if step else 0
        processes = self.accelerator.num_processes
        info = _kohya_info(
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
            "precision": self.precision,
            "run": self.job.run.name,
            "name": cfg.name,
            "output_dir": str(Path(cfg.output_dir).expanduser()),
            "kohya_alpha": self.lora.kohya_alpha,
            "lora": {"rank": self.lora.rank, "alpha": self.lora.alpha, "targets": self.lora.targets},
            "unet_layers_per_block": int(self.models.unet.config.layers_per_block),
            "started_at": self.started_at,
            "num_samples": len(self.dataset),
            "global_batch": self.step_plan.effective_batch,
            "processes": processes,
            "kohya": asdict(info),
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
        from loratui.models.sd.lora import load_lora_state

        ckpt = load_checkpoint(checkpoint_path, map_location="cpu")
        load_lora_state(self.models.components(), ckpt.lora_state)
        state = ckpt.training_state
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"])
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
def render_samples(models: Models, prompts: list[str], step: int, folder: Path, cfg) -> list[Path]:
    """Render `prompts` (fixed seed) with the LoRA as it is now; returns the PNG paths."""
    from loratui.data.image_io import save_png

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
            ).images[0]
            paths.append(save_png(image, folder / f"step-{step:06d}-{number}.png"))
    finally:
        models.unet.train()
        models.vae.to(vae_device)
        for encoder, device in zip(models.text_encoders, text_devices, strict=True):
            encoder.to(device)
    return paths


def _export(session: Session, output: Path) -> Path:
    """Write the kohya file from the newest checkpoint and announce it."""
    job = session.job
    written = export_checkpoint(
        job.run.latest_checkpoint(),
        fmt="kohya",
        out=output,
        overwrite=job.overwrite,
        resuming=job.resume_from is not None,
        finished_at=time.time(),
    )
    name = written.stem
    session.reporter.event(
        "export", session.last_saved, path=str(written), usage=usage_string(name), format="kohya"
    )
    return written


# --- the loop ----------------------------------------------------------------------------------------------


def train(job: WorkerJob, *, stop_after_step: int | None = None) -> str:
    """Train a LoRA for `job`; "finished" or "stopped". `stop_after_step` acts like Ctrl-C at that step."""
    reporter = Reporter(job.run, total_steps=0)
    handlers = _signal_handlers()
    try:
        return _train(job, reporter, stop_after_step)
    finally:
        reporter.close()
        _restore_signal_handlers(handlers)


def _signal_handlers() -> dict:
    import signal

    names = ("SIGINT", "SIGTERM", "SIGUSR1", "SIGHUP")
    return {
        sig: signal.getsignal(sig) for sig in (getattr(signal, n, None) for n in names) if sig is not None
    }


def _restore_signal_handlers(handlers: dict) -> None:
    """Put back the handlers `StopRequest.install` replaced (matters when training runs in-process)."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        for sig, handler in handlers.items():
            if handler is not None:
                signal.signal(sig, handler)


def _train(job: WorkerJob, reporter: Reporter, stop_after_step: int | None) -> str:
    from loratui.train.process.distributed import (
        batch_info,
        checkpoint_on_peer_loss,
        is_main,
        plan_batch,
        resume_note,
    )

    cfg = job.resolved.config
    stop = StopRequest().install()
    output = setup_output(job)
    accelerator, precision = setup_accelerator(cfg)
    dataset = setup_dataset(cfg, reporter, allow_errors=job.skip_checks)
    models = setup_models(job, precision, accelerator.device)
    for note in models.notes:
        reporter.event("warning", message=note)
    latents, text = setup_caches(cfg, job, models, dataset, reporter)  # before the UNet takes the device
    lora, params = setup_lora(cfg, models, reporter)
    place_unet(models)
    processes = accelerator.num_processes  # each takes a disjoint share of every step's samples
    global_batch = plan_batch(cfg.batch_size, cfg.gradient_accumulation_steps, processes, job.resume_from)
    step_plan = StepPlan(len(dataset), global_batch, cfg.epochs, cfg.max_steps, cfg.seed)
    optimizer, scheduler = setup_optimizer(cfg, models, lora, step_plan.total_steps)
    models.unet.train()
    models.forward_unet = accelerator.prepare(models.unet)  # autocast (and DDP) wrapper; state stays on .unet
    if cfg.train_text_encoder:
        models.forward_text_encoders = [accelerator.prepare(encoder) for encoder in models.text_encoders]
        text.text_encoders = models.forward_text_encoders
    optimizer = accelerator.prepare(optimizer)
    context = LossContext(cfg, models, dataset, latents, text)
    session = Session(
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
    )

    start = 0
    if job.resume_from is not None:
        start = session.restore(Path(job.resume_from))
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
        images=dataset.num_images,
        samples_per_epoch=len(dataset),
        resumed_from=start or None,
        lora_modules={k: len(v) for k, v in lora.targets.items()},
        **batch,
    )

    recovering = RecoveringStep(  # optimizer_step with out-of-memory recovery (loratui.train.oom.recovering)
        job,
        reporter,
        apply=sd_rung_applier(job, models, context, reporter, session),
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
        return session.save(step) if step != session.last_saved and step > start else None

    with checkpoint_on_peer_loss(save_now):
        for global_step, epoch, indices in step_plan.iter_steps(start):
            loss = functools.partial(context.micro_loss, epoch=epoch, step_samples=len(indices))
            result = recovering.run(global_step + 1, indices, loss)
            step, unlogged = global_step + 1, unlogged + len(indices)
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
                if session.last_saved != step:
                    session.save(step)
            if main and cfg.sample_prompts and cfg.sample_every_steps and step % cfg.sample_every_steps == 0:
                with skipped_when_out_of_memory(reporter, "samples", step, SAMPLE_HINT):
                    for path in render_samples(models, cfg.sample_prompts, step, job.run.samples_dir, cfg):
                        reporter.event("sample", step, path=str(path))
            if stopping and step < step_plan.total_steps:
                reporter.stopped(stop.signal_name or "requested", checkpoint=str(job.run.latest_checkpoint()))
                return "stopped"

    if session.last_saved != step:
        session.save(step)
    if main:
        _export(session, output)
    reporter.finished(steps=step, **recovering.summary())
    return "finished"
