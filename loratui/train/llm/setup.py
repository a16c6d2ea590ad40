"""The LLM trainer's setup: output check, accelerator, base model, data, optimizer, resume.

Each `setup_*` function builds one thing the loop in `loratui.train.llm.trainer` needs (the LoRA itself is
injected by `loratui.models.llm.lora.setup_lora`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loratui.config import TrainConfig
from loratui.models.llm.adapter_files import adapter_config_dict, check_output
from loratui.models.llm.batches import LLMData, build_llm_data
from loratui.models.llm.loading import base_model_reference
from loratui.runs.checkpoints import load_checkpoint
from loratui.train.job import WorkerJob
from loratui.train.llm.oom import cut_data, data_seq_len
from loratui.train.loop.optim import (
    apply_configured_hyperparameters,
    check_resumable,
    configured_hyperparameters,
    optimizer_from_config,
    resume_train_mode,
)
from loratui.train.loop.precision import pick_device, resolve_precision, weight_dtype
from loratui.train.loop.resume_inputs import shape_mismatch_message


def setup_output(job: WorkerJob) -> Path:
    """The adapter folder; refuses early when it belongs to a different run."""
    output = Path(job.resolved.config.output_dir)
    check_output(output, run_name=job.run.name, overwrite=job.overwrite)
    return output


def setup_accelerator(cfg: TrainConfig) -> tuple[Any, str]:
    """A fresh `Accelerator` (no accelerate-side accumulation; one per process when several train) and the
    precision in use."""
    from loratui.train.process.distributed import make_accelerator
    from loratui.train.process.fsdp import check_fsdp_settings, check_precision, close_own_group

    precision = resolve_precision(cfg.mixed_precision, pick_device().type)
    if cfg.fsdp:
        check_fsdp_settings(cfg)
        check_precision(precision)
    close_own_group()  # an earlier FSDP run in this process
    return make_accelerator(precision, cpu=pick_device().type == "cpu"), precision


def setup_sharding(cfg: TrainConfig, model: Any, accelerator: Any) -> Any:
    """With `fsdp`: the model (base and LoRA) sharded over the processes, its shards on this process's
    device (`loratui.train.process.fsdp`); otherwise the model as it is."""
    if not cfg.fsdp:
        return model
    from loratui.train.process.fsdp import shard_model

    return shard_model(model, accelerator.device)


def prepare(accelerator: Any, model: Any, optimizer: Any, scheduler: Any) -> tuple[Any, Any, Any]:
    """accelerate's `prepare` (DDP with several processes); an FSDP-sharded model is left as it is."""
    from loratui.train.process.fsdp import autocast_forward, is_sharded

    if is_sharded(model):
        autocast_forward(model, accelerator)
        optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
        return model, optimizer, scheduler
    return accelerator.prepare(model, optimizer, scheduler)


def setup_base(cfg: TrainConfig, precision: str) -> tuple[Any, Any, Any]:
    """(model, tokenizer, source) with frozen base weights in the precision's dtype (or 4-bit NF4)."""
    from loratui.models.llm.loading import load_base

    model, tokenizer, source = load_base(
        cfg.base_model,
        dtype=weight_dtype(precision),
        load_in_4bit=cfg.load_in_4bit,
        allow_pickle=cfg.allow_pickle,
        trust_remote_code=cfg.trust_remote_code,
        shard=cfg.fsdp,
    )
    model.config.use_cache = False
    return model, tokenizer, source


def setup_data(job: WorkerJob, tokenizer: Any, template: str) -> LLMData:
    """Training and validation units. A worker restarted after the OOM ladder lowered max_seq_len builds the
    units at the length the run started with and cuts them, so it trains on the same units."""
    cfg = job.resolved.config
    if cfg.method != "sft":  # DPO/ORPO: prompt/chosen/rejected pairs; KTO: labelled answers
        from loratui.models.llm.preference_data import build_method_data

        pairs = build_method_data(
            cfg.method, cfg.train_data_dir, tokenizer, template, max_seq_len=data_seq_len(job)
        )
        cut_data(pairs, cfg.max_seq_len)
        return pairs
    data = build_llm_data(
        cfg.train_data_dir,
        tokenizer,
        template,
        max_seq_len=data_seq_len(job),
        train_on_prompt=cfg.train_on_prompt,
        packing=cfg.packing,
        val_split=cfg.val_split,
        seed=cfg.seed,
    )
    cut_data(data, cfg.max_seq_len)
    return data


def setup_optimizer(cfg: TrainConfig, params: list[Any], total_steps: int) -> tuple[Any, Any]:
    optimizer, scheduler = optimizer_from_config(cfg, params, total_steps)
    return optimizer, scheduler


def checkpoint_settings(cfg: TrainConfig, data: LLMData, precision: str) -> dict[str, Any]:
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
        "method": cfg.method,
    }


def checkpoint_meta(
    accelerator: Any,
    model: Any,
    source: Any,
    template: str,
    settings: dict[str, Any],
    batch: dict[str, Any],
    global_batch: int,
) -> dict[str, Any]:
    """What every checkpoint's meta.json records about the model, the adapter and the batch."""
    base_ref = base_model_reference(source)
    return {
        "family": "llm",
        "task_type": "text-generation",
        "base_model": base_ref,
        "settings": settings,
        "adapter_config": adapter_config_dict(
            accelerator.unwrap_model(model).peft_config["default"], base_ref
        ),
        "chat_template": template,
        "global_batch": global_batch,
        "processes": accelerator.num_processes,
        "batch": batch,
    }


def restore_lora(checkpoint_path: Path, model: Any, ckpt: Any = None) -> None:
    """Load a checkpoint's LoRA weights into the (not yet sharded) model."""
    from peft import set_peft_model_state_dict

    ckpt = ckpt or load_checkpoint(checkpoint_path)
    try:
        result = set_peft_model_state_dict(model, ckpt.lora_state)
    except RuntimeError as exc:
        if "size mismatch" not in str(exc):
            raise
        raise ValueError(shape_mismatch_message(checkpoint_path, ckpt.meta, model.peft_config)) from None
    if getattr(result, "unexpected_keys", None):
        raise ValueError(
            f"checkpoint {checkpoint_path} does not match this LoRA: {result.unexpected_keys[:3]}"
        )
    missing = [k for k in getattr(result, "missing_keys", None) or [] if ".lora_" in k]
    if missing:
        saved = ckpt.meta.get("adapter_config", {})
        targets = list(saved.get("target_modules") or []) + list(saved.get("target_parameters") or [])
        raise ValueError(
            f"checkpoint {checkpoint_path} does not cover this LoRA: {len(missing)} of its tensors are not in it "
            f"(e.g. {missing[0]}). The checkpoint adapts {sorted(targets)}; set target_modules: {sorted(targets)} "
            "in the config to resume it"
        )


def restore(
    checkpoint_path: Path,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    settings: dict[str, Any],
    *,
    lora_loaded: bool = False,
) -> tuple[int, dict[str, Any]]:
    """Load LoRA weights (unless `lora_loaded`: `restore_lora` before sharding) and optimizer/scheduler state;
    returns (step, saved training state for RNG etc.)."""
    from loratui.train.process.fsdp import is_sharded, load_optimizer_state

    ckpt = load_checkpoint(checkpoint_path)
    if not lora_loaded:
        restore_lora(checkpoint_path, model, ckpt)
    check_resumable(ckpt.training_state.get("optimizer_class"), optimizer, checkpoint_path)
    wanted = configured_hyperparameters(optimizer, scheduler)
    if is_sharded(model):
        load_optimizer_state(model, optimizer, ckpt.training_state["optimizer"])
    else:
        optimizer.load_state_dict(ckpt.training_state["optimizer"])
    resume_train_mode(optimizer)  # schedule-free: the checkpoint holds the averaged weights
    scheduler.load_state_dict(ckpt.training_state["scheduler"])
    state = dict(ckpt.training_state)
    state["hyperparameter_changes"] = apply_configured_hyperparameters(optimizer, scheduler, wanted)
    saved = ckpt.meta.get("settings", {})
    state["mismatch"] = {k: (saved.get(k), v) for k, v in settings.items() if k in saved and saved[k] != v}
    return ckpt.step, state
