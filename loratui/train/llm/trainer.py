"""LoRA / QLoRA training of causal language models (task_type: text-generation).

One straight loop over the shared pieces: `StepPlan` (data order and position), `optimizer_step` (accumulated
micro-batches, loss normalised by the target tokens of the whole optimizer step), `Reporter` (events, status,
TensorBoard), `save_checkpoint`/`load_checkpoint` (exact resume) and `StopRequest` (Ctrl-C/SIGTERM: checkpoint,
then stop). The `_setup_*` functions build what the loop needs; the loop itself is `run_training`.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loratui.config import TrainConfig
from loratui.models.llm.batches import LLMData, build_llm_data, collate
from loratui.models.llm.chat import choose_template
from loratui.models.llm.lora import setup_lora
from loratui.models.llm.loss import chunked_token_loss_sum, token_loss_sum
from loratui.train.job import WorkerJob

SAMPLE_TOKENS = 64
SAMPLE_HINT = "Try samples after training instead (`loratui sample --compare`), or fewer sample_prompts."
EVAL_HINT = "Evaluation runs at batch_size on one GPU; set val_split: 0 to turn it off."


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


def train(job: WorkerJob) -> str:
    """Worker entry point: 'finished' or 'stopped' (errors raise; the worker records them)."""
    from loratui.train.loop.signals import StopRequest

    return run_training(job, stop=StopRequest().install()).state


# --- setup -----------------------------------------------------------------------------------------------


def _setup_accelerator(cfg: TrainConfig) -> tuple[Any, str]:
    """A fresh `Accelerator` (no accelerate-side accumulation; one per process when several train) and the
    precision in use."""
    from loratui.train.loop.precision import pick_device, resolve_precision
    from loratui.train.process.distributed import make_accelerator

    precision = resolve_precision(cfg.mixed_precision, pick_device().type)
    return make_accelerator(precision, cpu=pick_device().type == "cpu"), precision


def _setup_base(cfg: TrainConfig, precision: str) -> tuple[Any, Any, Any]:
    """(model, tokenizer, source) with frozen base weights in the precision's dtype (or 4-bit NF4)."""
    from loratui.models.llm.loading import load_base
    from loratui.train.loop.precision import weight_dtype

    model, tokenizer, source = load_base(
        cfg.base_model,
        dtype=weight_dtype(precision),
        load_in_4bit=cfg.load_in_4bit,
        allow_pickle=cfg.allow_pickle,
        trust_remote_code=cfg.trust_remote_code,
    )
    model.config.use_cache = False
    return model, tokenizer, source


def _setup_data(cfg: TrainConfig, tokenizer: Any, template: str, max_seq_len: int | None = None) -> LLMData:
    return build_llm_data(
        cfg.train_data_dir,
        tokenizer,
        template,
        max_seq_len=max_seq_len or cfg.max_seq_len,
        train_on_prompt=cfg.train_on_prompt,
        packing=cfg.packing,
        val_split=cfg.val_split,
        seed=cfg.seed,
    )


def _settings(cfg: TrainConfig, data: LLMData, precision: str) -> dict[str, Any]:
    """Settings a resumed run must share with its checkpoint (recorded in meta.json)."""
    return {
        "rows": len(data.train),
        "effective_batch": cfg.effective_batch,
        "batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "seed": cfg.seed,
        "max_seq_len": cfg.max_seq_len,
        "packing": cfg.packing,
        "precision": precision,
    }


def _restore(
    checkpoint_path: Path, model: Any, optimizer: Any, scheduler: Any, settings: dict
) -> tuple[int, dict]:
    """Load LoRA weights and optimizer/scheduler state; returns (step, saved training state for RNG etc.)."""
    from peft import set_peft_model_state_dict

    from loratui.runs.checkpoints import load_checkpoint

    ckpt = load_checkpoint(checkpoint_path)
    result = set_peft_model_state_dict(model, ckpt.lora_state)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(
            f"checkpoint {checkpoint_path} does not match this LoRA: {result.unexpected_keys[:3]}"
        )
    optimizer.load_state_dict(ckpt.training_state["optimizer"])
    scheduler.load_state_dict(ckpt.training_state["scheduler"])
    state = dict(ckpt.training_state)
    saved = ckpt.meta.get("settings", {})
    state["mismatch"] = {k: (saved.get(k), v) for k, v in settings.items() if k in saved and saved[k] != v}
    return ckpt.step, state


# --- loss and evaluation ---------------------------------------------------------------------------------


def evaluate(model: Any, data: LLMData, batch_size: int, pad_id: int, device: Any) -> float:
    """Mean token loss over the validation units."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data.val), batch_size):
            batch = collate(data.val[start : start + batch_size], pad_id).to(device)
            total += float(token_loss_sum(model, batch))
            count += batch.num_targets
    model.train(was_training)
    return total / max(1, count)


# --- side outputs: samples, checkpoints, export ----------------------------------------------------------


def _write_samples(
    cfg: TrainConfig, job: WorkerJob, reporter: Any, model: Any, tokenizer: Any, template: str, step: int
) -> None:
    from loratui.models.llm.generate import generate_answer
    from loratui.util.atomic import atomic_write_text

    lines = []
    for prompt in cfg.sample_prompts:
        text = generate_answer(
            model, tokenizer, template, prompt, max_new_tokens=SAMPLE_TOKENS, seed=cfg.seed
        )
        lines.append(f"### prompt\n{prompt}\n### answer\n{text}\n")
        path = job.run.samples_dir / f"step-{step:06d}.txt"
        reporter.event("sample", step, prompt=prompt, text=text, path=str(path))
    atomic_write_text(job.run.samples_dir / f"step-{step:06d}.txt", "\n".join(lines))


def _save(
    job: WorkerJob,
    step: int,
    epoch: int,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    accelerator: Any,
    meta: dict[str, Any],
) -> Path:
    from loratui.models.llm.adapter_files import lora_tensors
    from loratui.train.loop.checkpointing import rng_state, save_checkpoint

    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()}
    if getattr(accelerator, "scaler", None) is not None:
        state["scaler"] = accelerator.scaler.state_dict()
    return save_checkpoint(
        job.run,
        step,
        lora_state=lora_tensors(accelerator.unwrap_model(model)),
        training_state=state,
        meta={"epoch": epoch, "data_position": step, **meta},
        config_yaml=job.resolved.to_yaml(),
        keep_last_n=job.resolved.config.keep_last_n,
    )


def _live_settings(cfg: TrainConfig, batch: dict[str, Any] | None = None) -> dict[str, Any]:
    """Memory-related settings as really used (the OOM ladder may have changed them) and how the batch was
    spread over processes (`batch_size` is per device), for the adapter."""
    from loratui.train.oom.ladder import settings_of

    batch = batch or {}
    spread = {k: batch[k] for k in ("processes", "global_batch") if k in batch}
    return {**settings_of(cfg, "llm"), "effective_batch": cfg.effective_batch, **spread}


def _export(job: WorkerJob, model: Any, meta: dict[str, Any], step: int, reporter: Any) -> Path:
    """Write the adapter to output_dir (or into the run directory when output_dir belongs to another run)."""
    from loratui.models.llm.adapter_files import OutputConflict, save_trained_adapter, usage_snippet

    args = {
        "base_model": meta["base_model"],
        "chat_template": meta["chat_template"],
        "run_name": job.run.name,
        "step": step,
        "overwrite": job.overwrite,
        "training": _live_settings(job.resolved.config, meta.get("batch")),
    }
    try:
        path = save_trained_adapter(model, Path(job.resolved.config.output_dir), **args)
    except OutputConflict as exc:
        path = save_trained_adapter(model, job.run.path / "adapter", **{**args, "overwrite": True})
        reporter.event("warning", step, message=f"{exc}; the adapter was written to {path} instead")
    reporter.event(
        "export",
        step,
        path=str(path.resolve()),
        usage=usage_snippet(path.resolve(), meta["base_model"]),
        format="peft",
    )
    return path


# --- the loop --------------------------------------------------------------------------------------------


def run_training(job: WorkerJob, *, stop: Any = None, console: bool = True) -> TrainResult:
    """Train, checkpoint, and export; returns how the run ended. Raises on errors."""
    from loratui.models.llm.adapter_files import adapter_config_dict, check_output
    from loratui.models.llm.loading import base_model_reference
    from loratui.train.llm.oom import cut_data, data_seq_len, llm_rung_applier
    from loratui.train.loop.checkpointing import restore_rng_state
    from loratui.train.loop.optim import build_optimizer, build_scheduler
    from loratui.train.loop.plan import StepPlan
    from loratui.train.loop.reporting import Reporter
    from loratui.train.loop.signals import StopRequest
    from loratui.train.oom.recovering import RecoveringStep, skipped_when_out_of_memory
    from loratui.train.process.distributed import (
        batch_info,
        checkpoint_on_peer_loss,
        is_main,
        plan_batch,
        resume_note,
    )

    cfg = job.resolved.config
    stop = stop or StopRequest()
    check_output(Path(cfg.output_dir), run_name=job.run.name, overwrite=job.overwrite)
    accelerator, precision = _setup_accelerator(cfg)
    model, tokenizer, source = _setup_base(cfg, precision)
    template, template_origin = choose_template(tokenizer, cfg.chat_template)
    data = _setup_data(cfg, tokenizer, template, data_seq_len(job))
    cut_data(data, cfg.max_seq_len)  # a worker restarted after the OOM ladder lowered max_seq_len
    model = setup_lora(cfg, model)
    params = [p for p in model.parameters() if p.requires_grad]
    processes = accelerator.num_processes
    global_batch = plan_batch(cfg.batch_size, cfg.gradient_accumulation_steps, processes, job.resume_from)
    plan = StepPlan(len(data.train), global_batch, cfg.epochs, cfg.max_steps, cfg.seed)
    batch = batch_info(cfg.batch_size, cfg.gradient_accumulation_steps, processes, global_batch)
    optimizer = build_optimizer(params, cfg.optimizer, cfg.learning_rate, cfg.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.lr_scheduler, cfg.lr_warmup_steps, plan.total_steps)
    settings = _settings(cfg, data, precision)
    start, saved_state = 0, None
    if job.resume_from:
        start, saved_state = _restore(Path(job.resume_from), model, optimizer, scheduler, settings)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model.train()
    base_ref = base_model_reference(source)
    meta = {
        "family": "llm",
        "task_type": "text-generation",
        "base_model": base_ref,
        "settings": settings,
        "adapter_config": adapter_config_dict(
            accelerator.unwrap_model(model).peft_config["default"], base_ref
        ),
        "chat_template": template,
        "global_batch": global_batch,
        "processes": processes,
        "batch": batch,
    }
    pad_id = tokenizer.pad_token_id
    device = accelerator.device

    reporter = Reporter(job.run, plan.total_steps, console=console)
    if start:
        reporter.resumed_from(start)
    for message in data.warnings:
        reporter.event("warning", start, message=message)
    if saved_state and saved_state["mismatch"]:
        reporter.event(
            "warning", start, message=f"settings differ from the checkpoint: {saved_state['mismatch']}"
        )
    note = resume_note(job.resume_from, processes, batch)
    if note:
        reporter.event("warning", start, message=note)
    reporter.started(
        family="llm",
        device=str(device),
        precision=precision,
        resumed_from=start or None,
        chat_template=template_origin,
        trainable_params=sum(p.numel() for p in params),
        **batch,
        **data.stats,
    )
    if saved_state:
        restore_rng_state(saved_state["rng"])
        if "scaler" in saved_state and getattr(accelerator, "scaler", None) is not None:
            accelerator.scaler.load_state_dict(saved_state["scaler"])

    def micro_loss(indices: list[int], step_indices: list[int]) -> torch.Tensor:
        """Token-loss sum of one micro-batch over the target tokens of the WHOLE optimizer step."""
        batch = collate([data.train[i] for i in indices], pad_id).to(device)
        chunked = cfg.chunked_loss  # set by the OOM ladder (rung 3) or the config
        loss_sum = (
            chunked_token_loss_sum(model, batch, autocast=accelerator.autocast)
            if chunked
            else (token_loss_sum(model, batch))
        )
        return loss_sum / max(1, data.target_tokens(step_indices))

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
        if step == start:
            return None
        path = _save(job, step, epoch, model, optimizer, scheduler, accelerator, meta)
        reporter.checkpoint(step, path)
        return path

    with checkpoint_on_peer_loss(save_now):
        for step_index, epoch, indices in plan.iter_steps(start):
            result = recovering.run(
                step_index + 1, indices, functools.partial(micro_loss, step_indices=indices)
            )
            step_targets = data.target_tokens(indices)
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
                    target_tokens=step_targets,
                    process_cpu_s=time.process_time(),
                    **recovering.step_fields(),
                )
                last_log, tokens_since_log, samples_since_log = now, 0, 0
            stopping = stop.requested and not last_step  # save at once: no eval or samples on the way out
            if main and not stopping and data.val and (step % plan.steps_per_epoch == 0 or last_step):
                with skipped_when_out_of_memory(reporter, "evaluation", step, EVAL_HINT):
                    with accelerator.autocast():
                        eval_loss = evaluate(side_model, data, cfg.batch_size, pad_id, device)
                    reporter.event("eval", step, eval_loss=eval_loss, epoch=epoch)
                    if reporter.tensorboard is not None:
                        reporter.tensorboard.add_scalar("eval_loss", eval_loss, step)
            sample_due = (
                cfg.sample_prompts
                and cfg.sample_every_steps
                and (step % cfg.sample_every_steps == 0 or last_step)
            )
            if main and sample_due and not stopping:
                with skipped_when_out_of_memory(reporter, "samples", step, SAMPLE_HINT):
                    _write_samples(cfg, job, reporter, side_model, tokenizer, template, step)
            save_due = bool(cfg.save_steps and step % cfg.save_steps == 0) or stop.checkpoint_now.is_set()
            if (save_due or stopping) and not last_step:
                stop.checkpoint_now.clear()
                reporter.checkpoint(
                    step, _save(job, step, epoch, model, optimizer, scheduler, accelerator, meta)
                )
            if stopping:
                reporter.stopped(stop.signal_name or "requested")
                reporter.close()
                return TrainResult(
                    "stopped", step, None, accelerator.unwrap_model(model), tokenizer, template, data
                )

    reporter.checkpoint(step, _save(job, step, epoch, model, optimizer, scheduler, accelerator, meta))
    unwrapped = accelerator.unwrap_model(model)
    adapter = _export(job, unwrapped, meta, step, reporter) if main else None
    reporter.finished(adapter=str(adapter.resolve()) if adapter else None, **recovering.summary())
    reporter.close()
    return TrainResult("finished", step, adapter, unwrapped, tokenizer, template, data)
