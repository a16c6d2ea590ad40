"""LoRA / QLoRA training of causal language models (task_type: text-generation).

Same shape as the SD trainer: `training_session` (stop request and Reporter, undone on every exit), the
`setup_*` functions of `loratui.train.llm.setup`, then one straight loop over optimizer steps. The shared pieces
do the bookkeeping: `StepPlan` (data order and position), `RecoveringStep` (accumulated micro-batches with
out-of-memory recovery; the loss is normalised by the target tokens of the whole optimizer step), `Reporter`
(events, status, TensorBoard) and `StopRequest` (Ctrl-C/SIGTERM: checkpoint, then stop); evaluation,
samples, checkpoints and the adapter export are in `loratui.train.llm.outputs`.

Entry points: `train(job)` -> "finished" | "stopped" (the worker), `run_training(job)` -> `TrainResult` (in-process
callers: tests, the demo, benchmarks). Errors raise; the worker records them.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loratui.config import TrainConfig
from loratui.data.fingerprint import input_fingerprints
from loratui.models.checkpointing import offloaded_activations
from loratui.models.llm.batches import LLMData, collate
from loratui.models.llm.chat import choose_template
from loratui.models.llm.lora import apply_lora_dtype, setup_lora
from loratui.models.llm.loss import causal_loss_sum
from loratui.train.job import WorkerJob
from loratui.train.llm.oom import llm_rung_applier
from loratui.train.llm.outputs import Checkpointer, evaluate, export_adapter, write_samples
from loratui.train.llm.preference_step import PreferenceStep, Reference, preference_fields
from loratui.train.llm.setup import (
    checkpoint_meta,
    checkpoint_settings,
    prepare,
    restore,
    restore_lora,
    setup_accelerator,
    setup_base,
    setup_data,
    setup_optimizer,
    setup_output,
    setup_sharding,
)
from loratui.train.loop.checkpointing import restore_rng_state
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
from loratui.train.process.fsdp import full_lora_state
from loratui.train.process.oom_dist import any_rank

SAMPLE_HINT = "Try samples after training instead (`loratui sample --compare`), or fewer sample_prompts."
EVAL_HINT = "Evaluation runs at batch_size on one GPU; set val_split: 0 to turn it off."
FSDP_SAMPLES = (
    "sample_prompts are not answered during training with fsdp (generation would need every process); "
    "after training: loratui sample --lora ADAPTER --prompt ..."
)


@dataclass
class TrainResult:
    """How a run ended, plus the trained model (in-process callers: tests, demo, benchmarks)."""

    state: str  # finished | stopped
    step: int
    adapter_dir: Path | None
    model: Any
    tokenizer: Any
    template: str
    data: LLMData


# --- one micro-batch ------------------------------------------------------------------------------------


@dataclass
class LossContext:
    """Everything `micro_loss` reads."""

    cfg: TrainConfig
    model: Any
    data: LLMData
    pad_id: int
    accelerator: Any

    def micro_loss(self, indices: list[int], step_indices: list[int]) -> torch.Tensor:
        """Token-loss sum of one micro-batch over the target tokens of the WHOLE optimizer step."""
        device = self.accelerator.device
        batch = collate([self.data.train[i] for i in indices], self.pad_id).to(device)
        # chunked_loss (default; OOM rung 3) and activation_offload (rung 4) are read at every micro-batch
        with offloaded_activations(device, self.cfg.activation_offload):
            loss_sum = causal_loss_sum(
                self.model, batch, chunked=self.cfg.chunked_loss, autocast=self.accelerator.autocast
            )
        return loss_sum / max(1, self.data.target_tokens(step_indices))


# --- the loop --------------------------------------------------------------------------------------------


def train(job: WorkerJob) -> str:
    """Worker entry point: 'finished' or 'stopped' (errors raise; the worker records them)."""
    return run_training(job).state


def run_training(job: WorkerJob, *, stop: StopFlag | None = None, console: bool = True) -> TrainResult:
    """Train, checkpoint, and export; returns how the run ended. Raises on errors.

    Without `stop`, Ctrl-C/SIGTERM checkpoint and stop the run (the caller's handlers come back afterwards)."""
    loggers = LoggerSettings.from_config(job.resolved.config)
    with training_session(job.run, stop=stop, console=console, loggers=loggers) as session:
        return _train(job, session.reporter, session.stop)


def _train(job: WorkerJob, reporter: Reporter, stop: StopFlag) -> TrainResult:
    cfg = job.resolved.config
    setup_output(job)
    accelerator, precision = setup_accelerator(cfg)
    model, tokenizer, source = setup_base(cfg, precision)
    template, template_origin = choose_template(tokenizer, cfg.chat_template)
    data = setup_data(job, tokenizer, template)
    model = setup_lora(cfg, model, notify=lambda level, text: reporter.event(level, message=text))
    model = apply_lora_dtype(cfg, model)
    reference = Reference.at_start(cfg, model)  # DPO/KTO: taken before a resume loads later weights
    sharded = cfg.fsdp  # FSDP: LoRA restored before sharding, gathered for checkpoints and export
    if sharded and job.resume_from:
        restore_lora(Path(job.resume_from), model)
    model = setup_sharding(cfg, model, accelerator)
    params = [p for p in model.parameters() if p.requires_grad]
    processes = accelerator.num_processes  # each takes a disjoint share of every step's samples
    global_batch = plan_batch(cfg.batch_size, cfg.gradient_accumulation_steps, processes, job.resume_from)
    plan = StepPlan(len(data.train), global_batch, cfg.epochs, cfg.max_steps, cfg.seed)
    batch = batch_info(cfg.batch_size, cfg.gradient_accumulation_steps, processes, global_batch)
    optimizer, scheduler = setup_optimizer(cfg, params, plan.total_steps)
    settings = checkpoint_settings(cfg, data, precision)
    start, saved_state = 0, None
    if job.resume_from:
        start, saved_state = restore(
            Path(job.resume_from), model, optimizer, scheduler, settings, lora_loaded=sharded
        )
    model, optimizer, scheduler = prepare(accelerator, model, optimizer, scheduler)
    model.train()
    meta = checkpoint_meta(accelerator, model, source, template, settings, batch, global_batch)
    meta["learning_rate"] = cfg.learning_rate  # really used (a resume applies a changed one)
    meta["inputs"] = input_fingerprints(cfg)
    checkpoints = Checkpointer(job, model, optimizer, scheduler, accelerator, meta, reporter)
    context = LossContext(cfg, model, data, tokenizer.pad_token_id, accelerator)
    if cfg.method != "sft":  # DPO/ORPO: pairs of sequences per sample, rewards in the step events
        context = PreferenceStep(cfg, model, data, tokenizer.pad_token_id, accelerator, reference)

    reporter.status.total_steps = plan.total_steps
    if start:
        reporter.resumed_from(start)
    for message in data.warnings:
        reporter.event("warning", start, message=message)
    for change in (saved_state or {}).get("hyperparameter_changes", []):
        reporter.event(
            "warning",
            start,
            message=f"resumed with a changed setting: {change} (applied from step {start + 1})",
        )
    if saved_state and saved_state["mismatch"]:
        reporter.event(
            "warning", start, message=f"settings differ from the checkpoint: {saved_state['mismatch']}"
        )
    if sharded and cfg.sample_prompts and cfg.sample_every_steps:
        reporter.event("warning", start, message=FSDP_SAMPLES)
    note = resume_note(job.resume_from, processes, batch)
    if note:
        reporter.event("warning", start, message=note)
    reporter.started(
        family="llm",
        device=str(accelerator.device),
        precision=precision,
        resumed_from=start or None,
        chat_template=template_origin,
        trainable_params=sum(p.numel() for p in params),
        fsdp=sharded,
        **batch,
        **data.stats,
    )
    if saved_state:
        restore_rng_state(saved_state["rng"])
        if "scaler" in saved_state and getattr(accelerator, "scaler", None) is not None:
            accelerator.scaler.load_state_dict(saved_state["scaler"])

    recovering = RecoveringStep(  # optimizer_step with out-of-memory recovery (loratui.train.oom.recovering)
        job,
        reporter,
        apply=llm_rung_applier(model, data, settings),
        accelerator=accelerator,
        optimizer=optimizer,
        scheduler=scheduler,
        params=params,
        max_grad_norm=cfg.max_grad_norm,
        model=model,
    )
    step, epoch, last_log = start, plan.epoch_of(start), time.perf_counter()
    tokens_since_log = samples_since_log = 0
    main = is_main()
    side_model = model if processes == 1 else accelerator.unwrap_model(model)  # rank 0's eval and samples

    def save_now() -> Path | None:  # a lost peer: keep the last completed step (rank 0, local state only)
        return checkpoints.save(step, epoch) if step != start and not sharded else None  # FSDP: shards only

    with checkpoint_on_peer_loss(save_now):
        for step_index, epoch, indices in plan.iter_steps(start):
            loss = functools.partial(context.micro_loss, step_indices=indices)
            result = recovering.run(step_index + 1, indices, loss)
            step = step_index + 1
            tokens_since_log += sum(len(data.train[i].input_ids) for i in indices)
            samples_since_log += sum(data.train[i].num_samples for i in indices)
            last_step = step == plan.total_steps
            if step % cfg.log_every_steps == 0 or last_step:
                now = time.perf_counter()
                reporter.step(
                    step,
                    epoch,
                    result.loss,
                    result.lr,
                    samples_since_log,
                    grad_norm=result.grad_norm,
                    tokens=tokens_since_log,
                    tokens_per_s=tokens_since_log / max(1e-9, now - last_log),
                    target_tokens=data.target_tokens(indices),
                    process_cpu_s=time.process_time(),
                    **recovering.step_fields(),
                    **preference_fields(context, indices),
                )
                last_log, tokens_since_log, samples_since_log = now, 0, 0
            stopping = stop.requested and not last_step  # save at once: no eval or samples on the way out
            evaluating = main or sharded  # FSDP: every rank takes part in each forward
            if evaluating and not stopping and data.val and (step % plan.steps_per_epoch == 0 or last_step):
                with skipped_when_out_of_memory(reporter, "evaluation", step, EVAL_HINT):
                    with accelerator.autocast(), eval_mode(optimizer):
                        eval_loss = evaluate(
                            side_model,
                            data,
                            cfg.batch_size,
                            tokenizer.pad_token_id,
                            accelerator.device,
                            chunked=cfg.chunked_loss,
                        )
                    reporter.event("eval", step, eval_loss=eval_loss, epoch=epoch)
                    if reporter.tensorboard is not None:
                        reporter.tensorboard.add_scalar("eval_loss", eval_loss, step)
            sample_due = cfg.sample_prompts and cfg.sample_every_steps
            sampling = main and sample_due and not sharded and not stopping
            if sampling and (step % cfg.sample_every_steps == 0 or last_step):
                with skipped_when_out_of_memory(reporter, "samples", step, SAMPLE_HINT), eval_mode(optimizer):
                    write_samples(cfg, job, reporter, side_model, tokenizer, template, step)
            save_due = bool(cfg.save_steps and step % cfg.save_steps == 0) or stop.checkpoint_now.is_set()
            if sharded:  # every rank takes part in gathering a checkpoint; a save request reaches rank 0 only
                save_due = any_rank(save_due)
            if (save_due or stopping) and not last_step:
                stop.checkpoint_now.clear()
                checkpoints.save(step, epoch)
            if stopping:
                reporter.stopped(stop.signal_name or "requested")
                unwrapped = accelerator.unwrap_model(model)
                return TrainResult("stopped", step, None, unwrapped, tokenizer, template, data)

    final_weights(optimizer)
    checkpoints.save(step, epoch)
    unwrapped = accelerator.unwrap_model(model)
    tensors = full_lora_state(unwrapped) if sharded else None  # FSDP: every rank takes part in the gather
    adapter = export_adapter(job, unwrapped, meta, step, reporter, tensors=tensors) if main else None
    reporter.finished(adapter=str(adapter.resolve()) if adapter else None, **recovering.summary())
    return TrainResult("finished", step, adapter, unwrapped, tokenizer, template, data)
