"""What the LLM loop writes besides training: evaluation, samples, checkpoints (exact resume), the adapter.

`Checkpointer` saves the LoRA with the optimizer, scheduler, scaler and RNG states; `export_adapter` writes the
PEFT folder at the end (or into the run directory when output_dir belongs to another run).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loratui.config import TrainConfig
from loratui.models.llm.adapter_files import OutputConflict, lora_tensors, save_trained_adapter, usage_snippet
from loratui.models.llm.batches import LLMData, collate
from loratui.models.llm.loss import causal_loss_sum
from loratui.train.job import WorkerJob
from loratui.train.llm.preference_step import preference_settings
from loratui.train.loop.checkpointing import refuse_nonfinite, rng_state, save_checkpoint
from loratui.train.loop.optim import eval_mode, optimizer_kind
from loratui.train.loop.reporting import Reporter
from loratui.train.oom.ladder import settings_of
from loratui.train.process.fsdp import full_lora_state, full_optimizer_state, is_sharded
from loratui.util.atomic import atomic_write_text

SAMPLE_TOKENS = 64


def evaluate(
    model: Any, data: LLMData, batch_size: int, pad_id: int, device: Any, *, chunked: bool = True
) -> float:
    """Mean token loss over the validation units (by the chunked loss unless `chunked` is off, as in training)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data.val), batch_size):
            batch = collate(data.val[start : start + batch_size], pad_id).to(device)
            total += float(causal_loss_sum(model, batch, chunked=chunked))
            count += batch.num_targets
    model.train(was_training)
    return total / max(1, count)


def write_samples(
    cfg: TrainConfig, job: WorkerJob, reporter: Reporter, model: Any, tokenizer: Any, template: str, step: int
) -> None:
    """Answer each sample prompt with the LoRA as it is now: one text file per step, one event per prompt."""
    from loratui.models.llm.generate import generate_answer

    path = job.run.samples_dir / f"step-{step:06d}.txt"
    lines = []
    for prompt in cfg.sample_prompts:
        text = generate_answer(
            model, tokenizer, template, prompt, max_new_tokens=SAMPLE_TOKENS, seed=cfg.seed
        )
        lines.append(f"### prompt\n{prompt}\n### answer\n{text}\n")
        reporter.event("sample", step, prompt=prompt, text=text, path=str(path))
    atomic_write_text(path, "\n".join(lines))


@dataclass
class Checkpointer:
    """The objects a checkpoint saves, and what its meta.json records."""

    job: WorkerJob
    model: Any
    optimizer: Any
    scheduler: Any
    accelerator: Any
    meta: dict[str, Any]
    reporter: Reporter

    def save(self, step: int, epoch: int) -> Path:
        """Every rank calls it (FSDP gathers the LoRA and the optimizer state); rank 0 writes. Schedule-free
        optimizers: the averaged weights are saved (`eval_mode`)."""
        with eval_mode(self.optimizer):
            return self._save(step, epoch)

    def _save(self, step: int, epoch: int) -> Path:
        sharded = is_sharded(self.model)
        state = {
            "optimizer": full_optimizer_state(self.model, self.optimizer)
            if sharded
            else self.optimizer.state_dict(),
            "optimizer_class": optimizer_kind(self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
        }
        if getattr(self.accelerator, "scaler", None) is not None:
            state["scaler"] = self.accelerator.scaler.state_dict()
        path = save_checkpoint(
            self.job.run,
            step,
            lora_state=full_lora_state(self.model)
            if sharded
            else lora_tensors(self.accelerator.unwrap_model(self.model)),
            training_state=state,
            meta={"epoch": epoch, "data_position": step, **self.meta},
            config_yaml=self.job.resolved.to_yaml(),
            keep_last_n=self.job.resolved.config.keep_last_n,
        )
        self.reporter.checkpoint(step, path)
        return path


def live_settings(cfg: TrainConfig, batch: dict[str, Any] | None = None) -> dict[str, Any]:
    """Memory-related settings as really used (the OOM ladder may have changed them) and how the batch was
    spread over processes (`batch_size` is per device), for the adapter."""
    batch = batch or {}
    spread = {k: batch[k] for k in ("processes", "global_batch") if k in batch}
    return {
        **settings_of(cfg, "llm"),
        "effective_batch": cfg.effective_batch,
        **spread,
        **preference_settings(cfg),
    }


def export_adapter(
    job: WorkerJob,
    model: Any,
    meta: dict[str, Any],
    step: int,
    reporter: Reporter,
    *,
    tensors: dict[str, Any] | None = None,
) -> Path:
    """Write the adapter to output_dir (or into the run directory when output_dir belongs to another run).
    `tensors`: the LoRA already gathered (FSDP), else taken from the model."""
    tensors = tensors if tensors is not None else lora_tensors(model)
    refuse_nonfinite(tensors, job.run)
    args = {
        "tensors": tensors,
        "base_model": meta["base_model"],
        "chat_template": meta["chat_template"],
        "run_name": job.run.name,
        "step": step,
        "overwrite": job.overwrite,
        "training": live_settings(job.resolved.config, meta.get("batch")),
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
